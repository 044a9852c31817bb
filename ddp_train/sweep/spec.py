"""The sweep file: typed sections, the search space, and their checks against the config schema.

A sweep file is YAML data (``yaml.safe_load``) read into :class:`SweepConfig`; unknown keys are
errors, as in a run config. Every key of ``space`` is a dotted ddp-train config key, checked
before any trial starts: it must exist, its kind (float/int/choice) must fit the key's type, and
each bound and choice must pass the key's own checks (a config is built with it). Errors are
:class:`~ddp_train.config.ConfigError` with one line naming the key and the file (exit 2).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from ..bundled import bundled_sweeps, sweep_path
from ..config import (Config, ConfigError, describe, doc, from_dict, load_config,
                      parse_override)
from ..config.fields import check, one_of

METRICS = ("acc", "macro_f1", "loss")  # what the val eval reports (as early_stop.metric)
# Keys the sweep sets for every trial itself: a value in the sweep file could only break that.
MANAGED = ("run.path", "run.resume", "run.dir", "sweep.")
KINDS = ("float", "int", "choice")


@dataclass
class SamplerConfig:
    """How the next trial's parameters are chosen (Optuna samplers)."""

    name: str = doc("tpe", "tpe, random or grid (grid: every space key a choice or an int range)")
    seed: int = doc(0, "sampler seed: the same seed gives the same sequence of parameters")
    multivariate: bool = doc(False, "tpe: model the parameters jointly instead of one by one")
    n_startup_trials: int = doc(10, "tpe: random trials before the model takes over")

    def __post_init__(self) -> None:
        one_of(self.name, "sampler.name", ("tpe", "random", "grid"))
        check(self.n_startup_trials >= 0, "sampler.n_startup_trials", "must be >= 0")


@dataclass
class PrunerConfig:
    """When a trial is stopped early on its val metric (Optuna pruners)."""

    name: str = doc("median", "median, hyperband or none")
    n_startup_trials: int = doc(5, "median: finished trials needed before any pruning")
    n_warmup_steps: int = doc(0, "median: no pruning before this optimizer step")
    interval_steps: int = doc(1, "median: check every N steps (in reported steps)")
    min_resource: int = doc(1, "hyperband: steps the smallest rung trains")
    reduction_factor: int = doc(3, "hyperband: 1 in N trials goes on to the next rung")

    def __post_init__(self) -> None:
        one_of(self.name, "pruner.name", ("median", "hyperband", "none"))
        check(self.n_startup_trials >= 0, "pruner.n_startup_trials", "must be >= 0")
        check(self.n_warmup_steps >= 0, "pruner.n_warmup_steps", "must be >= 0")
        check(self.interval_steps >= 1, "pruner.interval_steps", "must be >= 1")
        check(self.min_resource >= 1, "pruner.min_resource", "must be >= 1")
        check(self.reduction_factor >= 2, "pruner.reduction_factor", "must be >= 2")


@dataclass
class SweepConfig:
    """One sweep: the base run, what varies, what is optimised, and the budget."""

    name: str = doc("", "study name ('' = the sweep file's name); also names sweeps/<name>")
    base: str = doc("", "base run config: a file (relative to the sweep file or the working "
                        "folder) or a bundled name ('' = the bundled demo)")
    overrides: dict = doc({}, "dotted config keys set for every trial, e.g. {train.epochs: 3}")
    metric: str = doc("", "val metric to optimise: acc, macro_f1 or loss "
                          "('' = the base config's early_stop.metric)")
    direction: str = doc("", "maximize or minimize ('' = minimize for loss, else maximize)")
    ranks: int = doc(1, "processes (GPUs) per trial")
    trials: int = doc(20, "trials to finish (0 = until timeout_min; grid: at most the grid's "
                                "size, 0 = all of it)")
    timeout_min: float = doc(0.0, "start no new trial after this many minutes (0 = no limit)")
    sampler: SamplerConfig = doc(None, "parameter sampler")
    pruner: PrunerConfig = doc(None, "early stopping of bad trials")
    space: dict = doc({}, "dotted config key -> {float: [lo, hi], log: true} | {int: [lo, hi], "
                          "step: n} | {choice: [a, b]}")
    enqueue: list = doc([], "parameter sets to try first, e.g. [{optim.lr: 0.003}]")
    heartbeat_s: float = doc(60.0, "how often a worker marks its trial alive in the storage")
    grace_s: float = doc(600.0, "a running trial unmarked this long lost its worker: failed, "
                                "and its parameters queued again")

    def __post_init__(self) -> None:
        self.sampler = self.sampler or SamplerConfig()
        self.pruner = self.pruner or PrunerConfig()
        if self.metric:
            one_of(self.metric, "metric", METRICS)
        if self.direction:
            one_of(self.direction, "direction", ("maximize", "minimize"))
        check(self.ranks >= 1, "ranks", "must be >= 1")
        check(self.trials >= 0, "trials", "must be >= 0")
        check(self.timeout_min >= 0, "timeout_min", "must be >= 0")
        check(self.heartbeat_s > 0, "heartbeat_s", "must be > 0")
        check(self.grace_s >= 2 * self.heartbeat_s, "grace_s",
              f"must be at least twice heartbeat_s ({self.heartbeat_s:g} s): one late beat "
              "must not fail a live trial")
        check(isinstance(self.enqueue, list) and all(isinstance(e, dict) for e in self.enqueue),
              "enqueue", "expected a list of {key: value} mappings")


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a config key and the values it may take."""

    key: str
    kind: str  # "float", "int" or "choice"
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        """The value of this key for Optuna ``trial`` (sampled, or fixed when enqueued)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log,
                                     step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def grid(self) -> list:
        """Every value, for the grid sampler (choices, or an int range)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        raise ConfigError(f"space.{self.key}: the grid sampler needs choices or an int range, "
                          "not a float range")

    def edges(self) -> list:
        """The values checked against the config before the sweep starts."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


def parse_param(key: str, spec: Any) -> Param:
    """``{float: [lo, hi], log: true}`` etc. -> :class:`Param`; ConfigError naming ``space.key``."""
    where = f"space.{key}"
    check(isinstance(spec, dict), where, f"expected {{float|int|choice: ...}}, got {spec!r}")
    kinds = [k for k in KINDS if k in spec]
    check(len(kinds) == 1, where, "needs exactly one of float: [lo, hi], int: [lo, hi] or "
                                  "choice: [values]")
    kind = kinds[0]
    allowed = {"choice": {"choice"}, "float": {"float", "log", "step"},
               "int": {"int", "log", "step"}}[kind]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r} for a {kind} range "
                          f"(allowed: {', '.join(sorted(allowed))})")
    values = spec[kind]
    if kind == "choice":
        check(isinstance(values, list) and values, where, "choice: expected a non-empty list")
        for v in values:  # what Optuna can store as a categorical
            check(v is None or isinstance(v, (bool, int, float, str)), where,
                  f"choice {v!r}: only numbers, strings, booleans and null can be choices")
        return Param(key, kind, choices=tuple(values))
    check(isinstance(values, list) and len(values) == 2, where, f"{kind}: expected [low, high]")
    number = (int,) if kind == "int" else (int, float)
    low, high = values
    for v in (low, high):
        check(isinstance(v, number) and not isinstance(v, bool), where,
              f"{kind}: bound {v!r} is not {'an integer' if kind == 'int' else 'a number'}")
    check(low < high, where, f"low {low} must be below high {high}")
    log, step = spec.get("log", False), spec.get("step")
    check(isinstance(log, bool), where, "log: expected true/false")
    check(not log or low > 0, where, f"log: needs low > 0, got {low}")
    if step is not None:
        check(isinstance(step, number) and not isinstance(step, bool) and step > 0, where,
              f"step: expected a positive {'integer' if kind == 'int' else 'number'}")
        check(not log, where, "log and step cannot be combined (Optuna refuses it)")
    if kind == "float":
        low, high = float(low), float(high)
        step = None if step is None else float(step)
    return Param(key, kind, low, high, log, step)


@dataclass
class Sweep:
    """A loaded, checked sweep: its settings, the resolved base and the parsed space."""

    cfg: SweepConfig
    path: str  # the sweep file
    base: str  # resolved base config path ('' = the bundled demo)
    base_overrides: list[str]  # the sweep's ``overrides`` as key=value strings
    space: list[Param]
    metric: str  # resolved
    direction: str  # resolved

    @property
    def name(self) -> str:
        """The study name."""
        return self.cfg.name or os.path.splitext(os.path.basename(self.path))[0]

    @property
    def budget(self) -> int:
        """Trials to finish (0 = until the time budget)."""
        if self.cfg.sampler.name == "grid":  # a grid point twice would be a wasted trial
            size = math.prod(len(p.grid()) for p in self.space)
            return min(self.cfg.trials, size) if self.cfg.trials else size
        return self.cfg.trials

    def trial_config(self, params: dict, overrides: list[str] = ()) -> Config:
        """The run config of a trial with ``params`` (plus managed ``overrides``)."""
        return load_config(self.base or None, [*self.base_overrides, *as_overrides(params),
                                               *overrides])

    def identity(self) -> dict:
        """What must not change when a sweep is continued (the budget and storage may)."""
        data = dataclasses.asdict(self.cfg)
        for key in ("trials", "timeout_min", "heartbeat_s", "grace_s"):
            data.pop(key)
        data["base"] = self.base
        return json.loads(json.dumps(data))  # plain data, comparable with a stored copy


def as_overrides(values: dict) -> list[str]:
    """``{"optim.lr": 1e-3}`` -> ``["optim.lr=0.001"]`` (JSON values read back as YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _leaf_types() -> dict[str, Any]:
    types = {}
    for key, _, _ in describe(Config):
        node: Any = Config
        for part in key.split("."):
            hint = typing.get_type_hints(node)[part]
            node = hint
        types[key] = node
    return types


def _base_path(base: str, sweep_path: str) -> str:
    if not base:
        return ""
    beside = os.path.join(os.path.dirname(os.path.abspath(sweep_path)), base)
    return beside if os.path.isfile(beside) else base  # else: working folder or a bundled name


def check_space(sweep: Sweep) -> None:
    """Check every space key and bound against the config schema (see the module docstring)."""
    types = _leaf_types()
    for param in sweep.space:
        key, where = param.key, f"space.{param.key}"
        if key not in types:
            import difflib

            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: not a ddp-train config key{hint}")
        check(not key.startswith(MANAGED), where, "is set by the sweep for each trial")
        hint = types[key]
        if param.kind == "float":
            check(hint in (float, Optional[float]), where,
                  f"is {getattr(hint, '__name__', hint)}-valued: a float range does not fit it"
                  + (" (use int: [lo, hi])" if hint is int else ""))
        if param.kind == "int":
            check(hint in (int, float, Optional[int], Optional[float]), where,
                  f"is {getattr(hint, '__name__', hint)}-valued: an int range does not fit it")
        for value in param.edges():
            try:
                sweep.trial_config({key: value})
            except ConfigError as e:
                raise ConfigError(f"{where}: {value!r} is refused: "
                                  f"{str(e).removesuffix(' [in command-line override]')}") \
                    from None


def resolve_sweep_path(path: str) -> str:
    """``path`` itself, or the bundled sweep of that name (``ddp-train sweep digits``)."""
    if os.path.isfile(path) or os.sep in path or "/" in path or path.endswith((".yaml", ".yml")):
        return path
    found = sweep_path(path)
    if found is None:
        raise ConfigError(f"{path}: no such sweep file, and not a bundled sweep "
                          f"(bundled: {', '.join(bundled_sweeps()) or 'none installed'})")
    return found


def load_sweep(path: str, trials: Optional[int] = None, overrides: list[str] = ()) -> Sweep:
    """Read and check sweep file ``path``; ConfigError. ``trials`` replaces its ``trials``;
    ``overrides`` (``key=value``, from the command line) join its ``overrides``."""
    path = resolve_sweep_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        if not isinstance(tree, dict):
            raise ConfigError("the top level must be a mapping")
        if trials is not None:
            tree["trials"] = trials
        extra = dict(parse_override(text) for text in overrides)
        if extra:
            tree["overrides"] = {**(tree.get("overrides") or {}), **extra}
        cfg = from_dict(SweepConfig, tree)
        for key in cfg.overrides:
            check(not str(key).startswith(MANAGED), f"overrides.{key}",
                  "is set by the sweep for each trial")
        check(bool(cfg.space), "space", "is empty: name at least one config key to search")
        space = [parse_param(str(k), v) for k, v in cfg.space.items()]
        sweep = Sweep(cfg, path, _base_path(cfg.base, path), as_overrides(cfg.overrides), space,
                      metric="", direction="")
        try:
            base = sweep.trial_config({})
        except ConfigError as e:
            raise ConfigError(f"base/overrides: {e}") from None
        check(bool(base.data.val_split) and (base.eval.every_steps or base.eval.every_epoch),
              "base", "trials are judged on val evals: the base config needs data.val_split and "
                      "eval.every_steps or eval.every_epoch")
        sweep.metric = cfg.metric or base.early_stop.metric
        sweep.direction = cfg.direction or ("minimize" if sweep.metric == "loss" else "maximize")
        check_space(sweep)
        if cfg.sampler.name == "grid":
            for p in space:
                p.grid()
        check(sweep.budget > 0 or cfg.timeout_min > 0, "trials",
              "0 needs timeout_min (or the grid sampler): the sweep would never end")
        names = {p.key for p in space}
        for i, params in enumerate(cfg.enqueue):
            extra = sorted(set(map(str, params)) - names)
            if extra:
                raise ConfigError(f"enqueue[{i}]: {extra[0]!r} is not a space key")
            try:
                sweep.trial_config(params)
            except ConfigError as e:
                raise ConfigError(f"enqueue[{i}]: "
                                  f"{str(e).removesuffix(' [in command-line override]')}") \
                    from None
    except ConfigError as e:
        raise ConfigError(f"{e} [in {path}]") from None
    return sweep
