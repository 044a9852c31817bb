"""report.md: what a run did, in tables and short sentences, next to the figures.

Every number is read from the logs or computed from them by :mod:`.stats` (the same functions the
figures use), and every sentence is built from those numbers: nothing is estimated. Epochs are
numbered as in metrics.jsonl (from 0); an eval belongs to the epoch of the last step before it.
"""
from __future__ import annotations

import datetime
import math
import os
from typing import Optional

import pandas as pd

from . import stats
from .figures import Options
from .logs import Run


def write_report(runs: list[Run], out_dir: str, figures: list[str], opts: Options) -> str:
    """Write ``<out_dir>/report.md`` for ``runs``, linking ``figures``; return its path."""
    sources = ", ".join(f"`{run.source}`" for run in runs)
    lines = ["# Training report", "",
             f"Written by ddp-plot from {sources} (and eval.jsonl where present). Epochs are "
             "numbered from 0 as in metrics.jsonl; loss, acc and macro-F1 are as logged.", ""]
    for run in runs:
        lines += run_section(run, opts)
    lines += ["## Figures", ""]
    lines += [f"![{name[:-4]}]({name})" for name in figures] + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def run_section(run: Run, opts: Options) -> list[str]:
    """The report's section for one run."""
    table = stats.epoch_table(run)
    split = stats.main_split(run)
    evals = stats.eval_frame(run, split) if split else pd.DataFrame()
    best = stats.best_row(evals, opts.best_metric) if len(evals) else None
    best_epoch = None if best is None else stats.eval_at(evals, best)["epoch"]
    return [f"## {run.name}", "", *_summary(run),
            *_epoch_table(table, split, best_epoch, stats.initial_text(run.steps)),
            *_best_and_final(run, evals, best, opts), *_overfitting(table, evals, split),
            *_per_class(run, opts), "### Observations", "",
            *[f"* {sentence}" for sentence in observations(run, table, evals, best, opts)], ""]


# ----------------------------------------------------------------------------- formatting

def _num(value, digits: int = 4) -> str:
    value = stats.number(value)
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _int(value) -> str:
    value = stats.number(value)
    return "–" if math.isnan(value) else f"{value:,.0f}"


def _duration(seconds: float) -> str:
    return "–" if math.isnan(seconds) else str(datetime.timedelta(seconds=round(seconds)))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _launch_values(run: Run, key: str) -> Optional[str]:
    """A start-event field over the launches: ``4``, or ``4 → 8`` when a resume changed it."""
    values = [f"{start[key]:,}" if isinstance(start[key], int) else str(start[key])
              for start in run.starts if start.get(key) is not None]
    unique = list(dict.fromkeys(values))
    return " → ".join(unique) if unique else None


# ----------------------------------------------------------------------------- sections

def _summary(run: Run) -> list[str]:
    steps, start = run.steps, run.starts[-1] if run.starts else {}
    rows = [["model", _launch_values(run, "model")],
            ["engine / precision", " / ".join(filter(None, (_launch_values(run, "engine"),
                                                            _launch_values(run, "precision"))))],
            ["data", _launch_values(run, "shards")],
            ["train samples", _launch_values(run, "train_samples")],
            ["classes", str(len(start["classes"])) if start.get("classes") else None],
            ["world size", _launch_values(run, "world_size")]]
    if all(start.get(k) for k in ("batch_size", "grad_accum", "world_size")):
        total = start["batch_size"] * start["grad_accum"] * start["world_size"]
        rows.append(["batch", f"{start['batch_size']} per rank × {start['grad_accum']} "
                              f"accumulation × {start['world_size']} rank(s) = "
                              f"{total:,} per step"])
    last = int(steps["step"].iloc[-1])
    planned = f" of {start['total_steps']:,} planned" if start.get("total_steps") else ""
    rows += [["steps", f"{last:,}{planned}; {len(steps):,} logged, epochs "
                       f"{steps['epoch'].iloc[0]}–{steps['epoch'].iloc[-1]}"],
             ["launches", _launches(run)],
             ["wall time", f"{_duration(stats.wall_time(run))} (first to last "
                           f"{'stamped line' if run.text_wall_s is not None else 'record'})"]]
    speed = stats.throughput(steps)
    if "median" in speed:
        rows.append(["throughput", f"median {speed['median']:,.0f} samples/s (5th–95th "
                                   f"percentile {speed['p5']:,.0f}–{speed['p95']:,.0f})"])
    if "step_s" in speed:
        rows.append(["step time", f"mean {speed['step_s']:.3f} s; "
                                  f"{_duration(speed['step_s_total'])} in logged steps"])
    rows.append(["end", _outcome(run)])
    sparse = (" (a text log: one line every `log.interval` steps, values rounded as printed)"
              if run.text_wall_s is not None else "")
    rows.append(["log", f"`{run.source}`{sparse}"])
    return ["### Run summary", "", *_table(["", ""], [r for r in rows if r[1]])]


def _launches(run: Run) -> str:
    if not run.resumes:
        return "1 (never resumed)"
    text = f"{len(run.resumes) + 1}: resumed at step {', '.join(f'{s:,}' for s in run.resumes)}"
    return text + f"; {run.replaced:,} repeated step record(s) replaced by the later ones"


def _epoch_table(table: pd.DataFrame, split: Optional[str], best_epoch: Optional[int],
                 initial: str) -> list[str]:
    header = ["epoch", "steps logged", "train loss (mean)", "min", "max", "below initial"]
    if split:
        header += [f"{split} loss", f"{split} acc", f"{split} macro-F1",
                   f"{split} − train loss"]
    rows = []
    for epoch, row in table.iterrows():
        cells = [f"**{epoch} (best)**" if epoch == best_epoch else str(epoch), _int(row["steps"]),
                 _num(row["mean"]), _num(row["min"]), _num(row["max"]),
                 f"{_num(row['reduction_pct'], 1)}%"]
        if split:
            cells += [_num(row["eval_loss"]), _num(row["eval_acc"]), _num(row["eval_macro_f1"]),
                      _num(row["eval_loss"] - row["mean"])]
        rows.append(cells)
    note = (f"Each epoch shows its last {split} eval; **(best)** marks the epoch of the best one. "
            if split else "No eval.jsonl: train loss only. ")
    note += (f"\"below initial\" compares the epoch's mean loss with the initial loss "
             f"({initial}).")
    return ["### Per epoch", "", *_table(header, rows), note, ""]


def _best_and_final(run: Run, evals: pd.DataFrame, best: Optional[int],
                    opts: Options) -> list[str]:
    if best is None:
        return []
    split = stats.main_split(run)
    picks = [(f"best by {opts.best_metric}", split, stats.eval_at(evals, best)),
             ("last", split, stats.eval_at(evals, -1))]
    for other in stats.splits(run)[1:]:
        picks.append(("last", other, stats.eval_at(stats.eval_frame(run, other), -1)))
    rows = [[what, name, f"{row['step']:,}", str(row["epoch"]), _num(row["loss"]),
             _num(row["acc"]), _num(row["macro_f1"])] for what, name, row in picks]
    header = ["eval", "split", "step", "epoch", "loss", "acc", "macro-F1"]
    return ["### Best and final metrics", "", *_table(header, rows)]


def overfitting_verdict(table: pd.DataFrame, evals: pd.DataFrame, split: str) -> str:
    """One sentence on over-fitting from the losses: eval loss vs its minimum, and train loss.

    Train accuracy is not logged, so the check compares losses: an eval loss that rose more than
    :data:`stats.OVERFIT_RISE` above its minimum while the train loss kept falling.
    """
    if evals["loss"].isna().all():
        return f"No {split} loss was logged: over-fitting cannot be checked."
    low = stats.eval_at(evals, stats.best_row(evals, "loss"))
    last = stats.eval_at(evals, -1)
    if len(evals) < 2:
        return f"Only one {split} eval: no trend to check for over-fitting."
    rise = last["loss"] / low["loss"] - 1
    train_low = stats.train_loss_at(table, low["epoch"])
    train_last = stats.train_loss_at(table, last["epoch"])
    if rise <= stats.OVERFIT_RISE:
        return (f"No over-fitting seen: {split} loss at the last eval ({last['loss']:.4f}, epoch "
                f"{last['epoch']}) is within {stats.OVERFIT_RISE:.0%} of its minimum "
                f"({low['loss']:.4f}, epoch {low['epoch']}).")
    trend = (f"{split} loss rose {rise:.1%} from its minimum {low['loss']:.4f} (epoch "
             f"{low['epoch']}) to {last['loss']:.4f} at the last eval (epoch {last['epoch']})")
    if train_last < train_low:
        return (f"Over-fitting: {trend} while the train loss fell from {train_low:.4f} to "
                f"{train_last:.4f}.")
    return (f"{trend[0].upper()}{trend[1:]}, and the train loss did not fall ({train_low:.4f} → "
            f"{train_last:.4f}): not the over-fitting pattern.")


def _overfitting(table: pd.DataFrame, evals: pd.DataFrame, split: Optional[str]) -> list[str]:
    if not split or not len(evals):
        return []
    rows = []
    picks = [("lowest eval loss", stats.best_row(evals, "loss")), ("last eval", -1)]
    for what, position in picks if evals["loss"].notna().any() else ():
        row = stats.eval_at(evals, position)
        train = stats.train_loss_at(table, row["epoch"])
        rows.append([what, f"{row['step']:,}", str(row["epoch"]), _num(row["loss"]),
                     _num(train), _num(row["loss"] - train)])
    header = ["", "step", "epoch", f"{split} loss", "train loss (epoch mean)",
              f"gap ({split} − train)"]
    return ["### Over-fitting check (losses)", "", *_table(header, rows),
            overfitting_verdict(table, evals, split), "",
            "The train loss is the mean over the epoch's steps (training batches, weights "
            "changing during the epoch); the eval loss is measured on the weights at the eval.",
            ""]


def _per_class(run: Run, opts: Options) -> list[str]:
    record = stats.best_eval(run, opts.best_metric)
    if not record or not record.get("per_class"):
        return []
    rows = [[str(c.get("class")), _num(c.get("precision"), 3), _num(c.get("recall"), 3),
             _num(c.get("f1"), 3), _int(c.get("support"))] for c in record["per_class"]]
    return [f"### Per class, best {record['split']} eval (step {record['step']:,})", "",
            *_table(["class", "precision", "recall", "F1", "support"], rows)]


# ----------------------------------------------------------------------------- observations

def observations(run: Run, table: pd.DataFrame, evals: pd.DataFrame, best: Optional[int],
                 opts: Options) -> list[str]:
    """Short plain sentences, each computed from the logs."""
    steps, out = run.steps, []
    last_epoch = table.index[-1]
    reduction = table["reduction_pct"].iloc[-1]
    out.append(f"Train loss {'fell' if reduction >= 0 else 'rose'} {abs(reduction):.1f}% from "
               f"{stats.initial_loss(steps):.4f} ({stats.initial_text(steps)}) to "
               f"{table['mean'].iloc[-1]:.4f} (mean of epoch {last_epoch}).")
    if best is not None:
        split = stats.main_split(run)
        row, last = stats.eval_at(evals, best), stats.eval_at(evals, -1)
        out.append(f"Best {split} {opts.best_metric}: {row[opts.best_metric]:.4f} at epoch "
                   f"{row['epoch']} (step {row['step']:,}); at the last eval "
                   f"{last[opts.best_metric]:.4f}.")
        out += _plateau_sentences(evals, split)
        out.append(overfitting_verdict(table, evals, split))
        out += _class_extremes(run, opts)
    for other in stats.splits(run)[1:]:
        last = stats.eval_at(stats.eval_frame(run, other), -1)
        out.append(f"Last {other} eval (step {last['step']:,}): loss {_num(last['loss'])}, acc "
                   f"{_num(last['acc'])}, macro-F1 {_num(last['macro_f1'])}.")
    nonfinite = steps["step"][steps["loss"].isna()]
    if len(nonfinite):
        out.append(f"{len(nonfinite):,} step(s) logged a non-finite loss (null), the first at "
                   f"step {nonfinite.iloc[0]:,}.")
    if run.resumes:
        out.append(f"The run was resumed {len(run.resumes)} time(s); {run.replaced:,} step "
                   "records were logged twice and the later values are used.")
    speed = stats.throughput(steps)
    if "data_share" in speed:
        out.append(f"Steps spent {speed['data_share']:.1%} of their time waiting for data.")
    last_step = int(steps["step"].iloc[-1])
    if run.end:
        out.append(f"Training ended at step {last_step:,}: {run.end.get('reason', 'end record')}.")
    elif run.preempted:
        out.append(f"The last launch was {_outcome(run)}.")
    else:
        out.append(f"No end record after step {last_step:,}: the run is still going or was "
                   "killed.")
    return out


def _outcome(run: Run) -> str:
    """How the last launch ended, from its end / preempted record."""
    if run.end:
        return run.end.get("reason", "end record")
    if run.preempted:
        # metrics.jsonl: {"event": "preempted", "step", "signal"}; train.log: the stop line.
        signal, step = run.preempted.get("signal"), run.preempted.get("step")
        what = run.preempted.get("reason") or "preempted" + (f" by {signal}" if signal else "")
        where = f" after step {step:,}" if isinstance(step, int) else ""
        return f"{what}{where}: not finished, resume it to continue"
    return "no end record: still running, or killed"


def _plateau_sentences(evals: pd.DataFrame, split: str) -> list[str]:
    found = stats.plateau(evals, "acc")
    if found is None:
        return []
    row, after = found
    reached, best = evals["acc"][:row + 1].max(), evals["acc"].max()
    epoch = stats.eval_at(evals, row)["epoch"]
    points = stats.PLATEAU_GAIN * 100
    if after >= stats.PLATEAU_EVALS:
        return [f"{split.capitalize()} accuracy plateaued after epoch {epoch}: the {after} "
                f"later evals raised its best by at most {points:g} points ({reached:.4f} → "
                f"{best:.4f})."]
    when = (f"{after} eval(s) before the end: too few to call it a plateau" if after else
            "the last eval: it was still improving")
    return [f"{split.capitalize()} accuracy came within {points:g} points of its best "
            f"({best:.4f}) only at epoch {epoch}, {when}."]


def _class_extremes(run: Run, opts: Options) -> list[str]:
    record = stats.best_eval(run, opts.best_metric)
    per_class = [c for c in (record or {}).get("per_class") or [] if c.get("support")]
    if len(per_class) < 2:
        return []
    low = min(per_class, key=lambda c: stats.number(c.get("f1")))
    high = max(per_class, key=lambda c: stats.number(c.get("f1")))
    return [f"At the best eval, class {low['class']} has the lowest F1 "
            f"({_num(low.get('f1'), 3)}) and class {high['class']} the highest "
            f"({_num(high.get('f1'), 3)})."]
