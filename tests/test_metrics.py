"""Eval metrics against scikit-learn, rank-split exactness, evaluate(), and early stopping.

sklearn is imported inside the tests that use it, so the spawned rank processes start faster.
"""
import json
import math

import pytest
import torch

from ddp_train.config import EarlyStopConfig
from ddp_train.dist import DistInfo
from ddp_train.metrics import ConfusionMatrix, EarlyStopping, evaluate

ONE = DistInfo()


def random_labels(n=500, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), targets] += 1.0  # better than chance, so the metrics are not trivial
    return logits, targets


def test_matches_sklearn():
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_score,
                                 recall_score)

    logits, targets = random_labels()
    cm = ConfusionMatrix(7)
    cm.update(logits[:200], targets[:200])
    cm.update(logits[200:], targets[200:])  # accumulates across batches
    s = cm.summary([f"c{i}" for i in range(7)])
    preds = logits.argmax(1).numpy()
    y = targets.numpy()
    assert s["count"] == 500
    assert s["confusion_matrix"] == confusion_matrix(y, preds, labels=range(7)).tolist()
    assert s["acc"] == pytest.approx(accuracy_score(y, preds))
    assert s["macro_f1"] == pytest.approx(f1_score(y, preds, average="macro"))
    per_f1 = f1_score(y, preds, average=None, labels=range(7))
    per_p = precision_score(y, preds, average=None, labels=range(7))
    per_r = recall_score(y, preds, average=None, labels=range(7))
    for i, row in enumerate(s["per_class"]):
        assert row["class"] == f"c{i}"
        assert row["support"] == int((y == i).sum())
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (per_p[i], per_r[i], per_f1[i]))


def test_classes_without_support_or_predictions():
    from sklearn.metrics import f1_score

    # Class 3 never occurs, class 2 is never predicted, class 3 is predicted once (wrongly).
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 3])
    cm = ConfusionMatrix(4)
    cm.update(preds, targets)
    s = cm.summary()
    rows = s["per_class"]
    assert rows[2]["precision"] == 0.0 and rows[2]["recall"] == 0.0 and rows[2]["f1"] == 0.0
    assert rows[3]["support"] == 0 and rows[3]["recall"] == 0.0
    assert not any(math.isnan(v) for r in rows for v in (r["precision"], r["recall"], r["f1"]))
    # Macro-F1 is over the classes with samples (0, 1, 2), not the absent class 3.
    assert s["macro_f1"] == pytest.approx(
        f1_score(targets, preds, average="macro", labels=[0, 1, 2], zero_division=0))
    assert s["acc"] == pytest.approx(3 / 6)


def test_empty_matrix_and_bad_targets():
    s = ConfusionMatrix(3).summary()
    assert (s["count"], s["acc"], s["macro_f1"]) == (0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ConfusionMatrix(3).update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 class names"):
        ConfusionMatrix(3).summary(["a", "b"])


def test_two_ranks_sum_to_one():
    logits, targets = random_labels(seed=1)
    whole = ConfusionMatrix(7)
    whole.update(logits, targets)
    rank0, rank1 = ConfusionMatrix(7), ConfusionMatrix(7)
    rank0.update(logits[:123], targets[:123])  # uneven shares, as with uneven shards
    rank1.update(logits[123:], targets[123:])
    summed = ConfusionMatrix(7)
    summed.matrix = rank0.matrix + rank1.matrix  # what all_reduce computes across two ranks
    assert torch.equal(summed.matrix, whole.matrix)
    assert summed.summary() == whole.summary()
    assert torch.equal(rank0.all_reduce(ONE).matrix, rank0.matrix)  # one process: unchanged


def test_evaluate_exact_mean_loss_and_restores_train_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(12, 3))
    model.train()
    images = torch.randn(10, 3, 2, 2)
    targets = torch.randint(0, 3, (10,))
    # Uneven batches: a plain mean of batch means would be wrong here.
    batches = [(images[:7], targets[:7]), (images[7:], targets[7:])]
    out = evaluate(model, batches, torch.nn.CrossEntropyLoss(), num_classes=3,
                   class_names=["a", "b", "c"], device=torch.device("cpu"), dist=ONE)
    assert model.training
    model.eval()  # dropout off, as evaluate() had it
    with torch.no_grad():
        logits = model(images)
    expected = torch.nn.functional.cross_entropy(logits, targets).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-6)
    assert out["count"] == 10
    assert out["acc"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert [r["class"] for r in out["per_class"]] == ["a", "b", "c"]


def test_evaluate_no_batches_on_this_rank():
    model = torch.nn.Linear(4, 2)
    out = evaluate(model, [], torch.nn.CrossEntropyLoss(), num_classes=2, class_names=None,
                   device=torch.device("cpu"), dist=ONE)
    assert out["count"] == 0 and math.isnan(out["loss"])


def feed(stopper, values, metric):
    return [stopper.update({metric: v}) for v in values]


def test_early_stopping_patience_max_mode():
    stopper = EarlyStopping(EarlyStopConfig(metric="acc", patience=2, min_delta=0.01))
    assert feed(stopper, [0.50, 0.60, 0.605], "acc") == [True, True, False]  # +0.005 < min_delta
    assert not stopper.should_stop and stopper.reason == ""
    assert feed(stopper, [0.59], "acc") == [False]
    assert stopper.should_stop and "did not improve for 2 evals" in stopper.reason
    assert stopper.best == 0.60


def test_early_stopping_min_mode_and_target():
    stopper = EarlyStopping(EarlyStopConfig(metric="loss", target=0.1))
    assert feed(stopper, [1.0, 0.5, 0.7, float("nan")], "loss") == [True, True, False, False]
    assert not stopper.should_stop  # patience 0 never stops
    assert feed(stopper, [0.09], "loss") == [True]
    assert stopper.should_stop and "reached the target" in stopper.reason


def test_early_stopping_target_max_mode():
    stopper = EarlyStopping(EarlyStopConfig(metric="macro_f1", target=0.9))
    feed(stopper, [0.89], "macro_f1")
    assert not stopper.should_stop
    feed(stopper, [0.9], "macro_f1")
    assert stopper.should_stop


def test_early_stopping_state_round_trip():
    cfg = EarlyStopConfig(metric="acc", patience=3)
    first = EarlyStopping(cfg)
    feed(first, [0.7, 0.6, 0.65], "acc")
    resumed = EarlyStopping(cfg)
    resumed.load_state_dict(first.state_dict())
    assert (resumed.best, resumed.evals_since_best) == (0.7, 2)
    assert feed(resumed, [0.69], "acc") == [False] and resumed.should_stop
    other = EarlyStopping(EarlyStopConfig(metric="loss"))
    other.load_state_dict(first.state_dict())  # a different metric's best is not comparable
    assert other.best is None


def _eval_on_rank(rank, init_file, out_dir):
    """One of two gloo ranks: rank 0 gets 3 uneven batches, rank 1 gets none."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model and data on both ranks
        model = torch.nn.Linear(5, 4)
        images, targets = torch.randn(11, 5), torch.randint(0, 4, (11,))
        batches = [(images[i:j], targets[i:j]) for i, j in ((0, 4), (4, 9), (9, 11))]
        out = evaluate(model, batches if rank == 0 else [], torch.nn.CrossEntropyLoss(),
                       num_classes=4, class_names=None, device=torch.device("cpu"),
                       dist=DistInfo(rank=rank, world_size=2, backend="gloo"))
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"distributed": out, "single": evaluate(
                model, batches, torch.nn.CrossEntropyLoss(), num_classes=4, class_names=None,
                device=torch.device("cpu"), dist=ONE)}, f)
    finally:
        tdist.destroy_process_group()


def test_evaluate_across_two_gloo_ranks_with_an_empty_rank(tmp_path):
    # spawn, not fork: a forked child can hang in the OpenMP pool that earlier tests started.
    torch.multiprocessing.spawn(_eval_on_rank, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    rank0, rank1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert rank0["distributed"] == rank1["distributed"]  # every rank gets the global result
    assert rank0["distributed"]["count"] == 11
    assert rank0["distributed"]["confusion_matrix"] == rank0["single"]["confusion_matrix"]
    assert rank0["distributed"]["loss"] == pytest.approx(rank0["single"]["loss"], rel=1e-12)
