"""Evaluation metrics (confusion matrix, accuracy, macro-F1) and the early-stopping tracker.

Every eval sample is seen by exactly one rank, so summing per-rank counts gives the exact global
metrics: no sample is double counted, and nothing is averaged over ranks.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from .config import EarlyStopConfig
from .dist import DistInfo, all_gather_objects, all_reduce_sum


class ConfusionMatrix:
    """Counts of (true class, predicted class) pairs, as an int64 tensor on the CPU."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits_or_preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``(N, C)`` logits (argmax taken) or ``(N,)`` predicted classes."""
        preds = logits_or_preds.argmax(dim=1) if logits_or_preds.ndim == 2 else logits_or_preds
        preds = preds.detach().long().cpu().flatten()
        targets = targets.detach().long().cpu().flatten()
        n = self.num_classes
        if targets.numel() and (targets.min() < 0 or targets.max() >= n):
            raise ValueError(f"targets must lie in [0, {n}); got {targets.min()}..{targets.max()}")
        # Each (true, pred) pair maps to one cell index, so one bincount fills the whole matrix.
        cells = torch.bincount(targets * n + preds, minlength=n * n)
        self.matrix += cells.view(n, n)

    def all_reduce(self, dist: DistInfo) -> "ConfusionMatrix":
        """Sum the matrix over ranks (exact: every sample was counted on one rank only)."""
        # nccl only reduces tensors on the GPU, so the matrix travels via this rank's device.
        self.matrix = all_reduce_sum(dist, self.matrix.to(dist.device)).cpu()
        return self

    def summary(self, class_names: Optional[Sequence[str]] = None) -> dict:
        """Accuracy, macro-F1, per-class precision/recall/F1/support and the matrix itself.

        A class never predicted has precision 0 and one without samples has recall 0 (never NaN).
        ``macro_f1`` is the mean F1 over the classes that have samples (support > 0): a class
        absent from the split says nothing about the model. That equals
        ``sklearn.metrics.f1_score(average="macro", labels=<classes present>)``, and plain
        ``average="macro"`` whenever predictions stay within the classes present.
        """
        names = list(class_names) if class_names is not None else [str(i) for i in
                                                                   range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        m = self.matrix.double()
        correct = m.diag()
        support = m.sum(dim=1)  # rows are true classes
        predicted = m.sum(dim=0)
        precision = correct / predicted.clamp(min=1)
        recall = correct / support.clamp(min=1)
        f1 = 2 * correct / (support + predicted).clamp(min=1)  # = 2PR / (P + R), 0 when both are 0
        count = int(self.matrix.sum())
        present = support > 0
        per_class = [dict(zip(("class", "precision", "recall", "f1", "support"), row))
                     for row in zip(names, precision.tolist(), recall.tolist(), f1.tolist(),
                                    self.matrix.sum(dim=1).tolist())]
        return {
            "acc": float(correct.sum() / count) if count else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class": per_class,
            "confusion_matrix": self.matrix.tolist(),
            "count": count,
        }


def to_device(x: Any, device: torch.device) -> Any:
    """A batch tensor, or a dict of them (multimodal inputs), moved to ``device``."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def evaluate(model: torch.nn.Module, batches: Iterable, criterion: Callable, *, num_classes: int,
             class_names: Optional[Sequence[str]], device: torch.device, dist: DistInfo,
             autocast: Callable[[], Any] = contextlib.nullcontext,
             equal_forwards: bool = False) -> dict:
    """Evaluate ``model`` on this rank's ``(images, targets)`` batches; return global metrics.

    The result is :meth:`ConfusionMatrix.summary` plus ``loss``, the exact mean over all samples
    of all ranks. ``criterion`` returns the batch mean (e.g. ``nn.CrossEntropyLoss()``). Pass the
    bare model, not its DDP wrapper, whose forward may run collectives. ``autocast`` is a
    zero-argument context factory, e.g. ``lambda: torch.autocast("cuda", torch.bfloat16)``.
    ``equal_forwards``: the model's forward is itself collective (DeepSpeed ZeRO-3 gathers each
    layer's weights from all ranks), so ranks step through their batches in lockstep and a rank
    that ran out runs discarded forwards until every rank has (see :func:`_lockstep`).
    """
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    if equal_forwards and dist.distributed:
        batches = _lockstep(batches, dist)
    try:
        with torch.inference_mode():
            # No collectives in this loop (but _lockstep's, taken by all ranks at the same
            # point): ranks may hold different numbers of batches, or none, and a per-batch
            # all-reduce would then hang. Everything is summed once afterwards.
            for images, targets in batches:
                images = to_device(images, device)
                with autocast():
                    logits = model(images)
                if targets is None:  # a padding forward: its output is not a sample
                    continue
                targets = targets.to(device, non_blocking=True)
                with autocast():
                    loss = criterion(logits, targets)
                # Sum of per-sample losses, so uneven batches and ranks weigh every sample once.
                loss_sum += loss.double() * targets.numel()
                matrix.update(logits, targets)
    finally:
        model.train(was_training)
    matrix.all_reduce(dist)
    loss_sum = all_reduce_sum(dist, loss_sum)
    result = matrix.summary(class_names)
    result["loss"] = loss_sum.item() / result["count"] if result["count"] else math.nan
    return result


def _lockstep(batches: Iterable, dist: DistInfo) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield this rank's batches so that every rank yields the same number, in step.

    Before each forward all ranks exchange whether they still have a batch (and its shape).
    When none has, the stream ends on every rank together; a rank that ran out meanwhile yields
    ``(padding_images, None)``: its last batch again, or zeros shaped like another rank's batch
    if it had none. The exchange must sit *between* forwards: DeepSpeed ZeRO-3 runs its own
    collectives inside and at the end of each forward, so a count exchanged after the loop
    would meet another rank's forward and the collectives would mismatch.
    """
    it, last = iter(batches), None
    while True:
        batch = next(it, None)
        if batch is not None:
            last = batch[0]
        specs = all_gather_objects(dist, None if batch is None else _spec(batch[0]))
        if all(s is None for s in specs):
            return
        if batch is not None:
            yield batch
            continue
        if last is None:  # this rank had no batch at all: zeros like another rank's batch
            last = _zeros(next(s for s in specs if s is not None))
        yield last, None


def _spec(x: Any) -> Any:
    """Shape and dtype of a batch tensor, or of each tensor of a dict batch (multimodal)."""
    if isinstance(x, dict):
        return {k: _spec(v) for k, v in x.items()}
    return tuple(x.shape), str(x.dtype).split(".")[-1]


def _zeros(spec: Any) -> Any:
    if isinstance(spec, dict):
        return {k: _zeros(v) for k, v in spec.items()}
    return torch.zeros(spec[0], dtype=getattr(torch, spec[1]))


class EarlyStopping:
    """Tracks the best value of ``early_stop.metric`` and decides when training should stop.

    ``loss`` is minimised, ``acc`` and ``macro_f1`` maximised; an eval counts as a new best only
    when it beats the best by more than ``min_delta``. Stop when ``patience`` > 0 evals in a row
    brought no new best, or when the best reaches ``target``.
    """

    def __init__(self, cfg: EarlyStopConfig) -> None:
        self.metric, self.patience = cfg.metric, cfg.patience
        self.target, self.min_delta = cfg.target, cfg.min_delta
        self.minimize = cfg.metric == "loss"
        self.best: Optional[float] = None
        self.evals_since_best = 0

    def update(self, metrics: dict) -> bool:
        """Record one eval's metrics; True when it is a new best (worth saving best.pt)."""
        value = float(metrics[self.metric])
        if self._improves(value):
            self.best, self.evals_since_best = value, 0
            return True
        self.evals_since_best += 1
        return False

    def _improves(self, value: float) -> bool:
        if math.isnan(value):  # a diverged eval is never a best
            return False
        if self.best is None:
            return True
        if self.minimize:
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _target_reached(self) -> bool:
        if self.target is None or self.best is None:
            return False
        return self.best <= self.target if self.minimize else self.best >= self.target

    @property
    def should_stop(self) -> bool:
        """True once the target is reached or patience has run out."""
        return bool(self.reason)

    @property
    def reason(self) -> str:
        """Why training should stop, for the log; '' while it should go on."""
        best = "none" if self.best is None else f"{self.best:.4f}"
        if self._target_reached():
            return f"{self.metric} reached the target {self.target:g} (best {best})"
        if self.patience > 0 and self.evals_since_best >= self.patience:
            return f"{self.metric} did not improve for {self.evals_since_best} evals (best {best})"
        return ""

    def state_dict(self) -> dict:
        """What a checkpoint needs to carry the tracker across a resume."""
        return {"metric": self.metric, "best": self.best, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a state for a different metric is ignored (fresh start)."""
        if state.get("metric") != self.metric:
            return  # the run switched early_stop.metric: the old best is not comparable
        self.best, self.evals_since_best = state["best"], int(state["evals_since_best"])
