"""Hyperparameter sweeps: Optuna studies whose trials are complete ddp-train runs (docs/sweeps.md).

* :mod:`.spec` reads and checks the sweep file (search space against the config schema);
* :mod:`.study` opens the study and decides which trial runs next (budget, resume, heartbeat);
* :mod:`.worker` runs trials as subprocesses (torchrun) and tells the study how they ended;
* :mod:`.link` is the training run's side: rank 0 reports val metrics and hears the pruner;
* :mod:`.results` turns the study into report.md, PNGs and best.yaml; :mod:`.cli` is
  ``ddp-train sweep``.

Importing this package imports nothing else: the trainer imports :mod:`.link`, which needs
Optuna only when a run is a sweep trial.
"""
