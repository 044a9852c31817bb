"""A training run's link to its sweep trial: report each val metric, hear the pruner's verdict.

Only rank 0 talks to the study; the other ranks get :class:`NoTrial` (a null object), and the
trainer spreads rank 0's verdict with one all-reduce, so every rank stops at the same step.
Optuna is imported only when the run is a sweep trial (``sweep.storage`` set).
"""
from __future__ import annotations

import math
from typing import Any

from ..config import SweepTrialConfig


class NoTrial:
    """Not a sweep trial (or not rank 0): reports nothing and never prunes."""

    def report(self, step: int, metrics: dict) -> str:
        """Report ``metrics`` at optimizer ``step``; the reason to prune, '' to go on."""
        return ""


class OptunaTrial(NoTrial):
    """Rank 0 of a sweep trial: reports to the Optuna study named in ``sweep.*``."""

    def __init__(self, cfg: SweepTrialConfig) -> None:
        import optuna

        from .study import PRUNED, build_pruner, open_storage

        self._pruned_attr = PRUNED
        storage = open_storage(cfg.storage)
        study = optuna.load_study(study_name=cfg.study, storage=storage,
                                  sampler=optuna.samplers.RandomSampler())
        settings = study.user_attrs["sweep"]  # written by the sweep before any trial starts
        study.pruner = build_pruner(settings["pruner"])
        self.metric, self.direction = settings["metric"], settings["direction"]
        self.pruner_name = settings["pruner"]["name"]
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, cfg.trial)
        self.study, self.trial = study, optuna.trial.Trial(study, trial_id)

    def report(self, step: int, metrics: dict) -> str:
        """Report the sweep's metric; on a prune verdict, store and return why."""
        value = float(metrics[self.metric])
        self.trial.report(value, step)
        if not self.trial.should_prune():
            return ""
        # MedianPruner judges the trial's best value so far, not the latest one.
        values = [v for v in self.study._storage.get_trial(self.trial._trial_id)
                  .intermediate_values.values() if not math.isnan(v)] or [value]
        best = max(values) if self.direction == "maximize" else min(values)
        reason = self._why(step, best)
        self.study._storage.set_trial_user_attr(self.trial._trial_id, self._pruned_attr, reason)
        return reason

    def _why(self, step: int, value: float) -> str:
        text = f"best val {self.metric} {value:.4g} by step {step}"
        if self.pruner_name != "median":
            return f"{text}: stopped by the {self.pruner_name} pruner"
        # The median MedianPruner compared against: complete trials' values at this step.
        import optuna

        others = [t.intermediate_values[step] for t in self.study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if step in t.intermediate_values and not math.isnan(t.intermediate_values[step])]
        if not others:
            return f"{text}: stopped by the median pruner"
        others.sort()
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
        worse = "below" if self.direction == "maximize" else "above"
        return (f"{text} is {worse} the median {median:.4g} of {len(others)} complete trials "
                "at that step")


def connect_trial(cfg: SweepTrialConfig, is_main: bool) -> NoTrial:
    """:class:`OptunaTrial` on rank 0 of a sweep trial, else :class:`NoTrial`."""
    return OptunaTrial(cfg) if cfg.storage and is_main else NoTrial()
