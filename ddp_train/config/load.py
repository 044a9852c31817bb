"""Load a Config from YAML plus dotted overrides, and write it back out.

YAML is data only (``yaml.safe_load``). Unknown keys, wrong types and impossible values raise
:class:`ConfigError` with one line naming the key and where it came from (the file or the
command line); ``python -m ddp_train`` turns that into exit code 2 without a traceback.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any

import yaml

from ..bundled import bundled_configs, config_path
from .fields import ConfigError, check
from .root import Config


# Keys that moved to another section: old dotted name -> new one (named in the error).
MOVED = {"train.label_smoothing": "loss.label_smoothing"}


def _close(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotated type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for arm in args[:-1]:  # Union[str, list[float]]: the first arm the value fits
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        return _coerce(value, args[-1], key)
    if hint is bool:
        check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
    elif hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    elif hint is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
    elif hint is list or origin is list:
        check(isinstance(value, list), key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (None,)
        if item is not None:
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif hint is dict or origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            if full in MOVED:
                raise ConfigError(f"{full}: moved to {MOVED[full]}")
            raise ConfigError(f"{full}: unknown key{_close(str(key), names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, {} if value is None else value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, hint, full)
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable for malformed nested values
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section in the file ("train:")
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value) with the value read as YAML (so 1e-3, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_config_path(path: str) -> str:
    """The file ``--config path`` means: ``path`` itself, or the bundled config of that name.

    A bare name (no folder, no ``.yaml``) that is not an existing file names a bundled config,
    so ``--config digits`` works from any directory and after a non-editable install; an
    existing file always wins, so a local ``digits`` file is never shadowed.
    """
    if os.path.isfile(path) or os.sep in path or "/" in path or path.endswith((".yaml", ".yml")):
        return path
    found = config_path(path)
    if found is None:
        names = ", ".join(bundled_configs()) or "none installed"
        raise ConfigError(f"--config {path}: no such file, and not a bundled config "
                          f"(bundled: {names})")
    return found


def load_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read YAML ``path`` (or the defaults), apply ``key=value`` overrides, validate, return Config.

    ``path`` is a file or a bundled config name (:func:`resolve_config_path`). Errors are
    :class:`ConfigError` with one line that names the key and, for file keys, the file.
    """
    tree: dict = {}
    where = "defaults"
    if path:
        path = resolve_config_path(path)
        where = path
        try:
            with open(path, encoding="utf-8") as f:
                tree = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        from_dict(Config, tree)  # report file errors against the file before overrides mix in
    except ConfigError as e:
        raise ConfigError(f"{e} [in {where}]") from None
    try:
        for text in overrides:
            _set_dotted(tree, *parse_override(text))
        return from_dict(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{e} [in command-line override]") from None


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what is written to <run>/config.yaml)."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings with flow-style lists: ``mean: [0.485, 0.456, 0.406]``."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v,
                                                                flow_style=True))


def dump_yaml(cfg: Any) -> str:
    """YAML text of the resolved config, sections in declaration order."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def annotated_yaml(cfg: Any) -> str:
    """The resolved config as YAML with each field's one-line doc as a comment."""
    lines, section = [], None
    docs = {key: text for key, _, text in describe(type(cfg))}
    for key, _, _ in describe(type(cfg)):
        parts = key.split(".")
        value = cfg
        for part in parts:
            value = getattr(value, part)
        if len(parts) == 2 and parts[0] != section:
            section = parts[0]
            lines.append(f"{section}:")
        text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True,
                         width=float("inf")).strip()  # no wrapping: one key, one line
        text = text.removesuffix("\n...").strip()
        indent = "  " * (len(parts) - 1)
        lines.append(f"{indent}{parts[-1]}: {text}  # {docs[key]}")
    return "\n".join(lines) + "\n"


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, one-line doc) for every leaf field: source of docs/config.md."""
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", getattr(defaults, f.name), f.metadata.get("doc", "")))
    return rows
