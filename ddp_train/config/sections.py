"""The config sections: one typed dataclass per component, each checked in ``__post_init__``.

The defaults are the bundled demo (scikit-learn digits, resnet10t at 32 px, 8 epochs); the files
in ``configs/`` show real recipes. Every field carries a one-line doc in its metadata, which
``--print-config`` and ``docs/config.md`` show.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .fields import check, doc, one_of


@dataclass
class RunConfig:
    """Where a run lives."""

    name: str = doc("", "run name ('' = the data.shards folder's name, e.g. defects for "
                    "shards/defects); the run folder is <run.dir>/<name>-<YYYYmmdd-HHMMSS>")
    dir: str = doc("runs", "parent folder of run folders")
    path: str = doc("", "exact run folder to use or resume (overrides name/dir naming)")
    resume: str = doc("", "'' = new run, 'auto' = newest loadable checkpoint, or a checkpoint path")

    def __post_init__(self) -> None:
        # '' is filled in from data.shards by Config (root.py), which checks it is non-empty.
        check("/" not in self.name, "run.name", "must be a non-empty name without '/'")
        # Checked with the config, before anything is packed or created, so a typo costs nothing.
        check(self.resume in ("", "auto") or os.path.exists(self.resume), "run.resume",
              f"{self.resume} is not a checkpoint file")


@dataclass
class DataConfig:
    """Shards and the streaming loader."""

    shards: str = doc("shards/digits", "folder or URL prefix holding _info.json (from ddp-shards "
                      "pack or index)")
    image_size: int = doc(32, "square input size in pixels fed to the model")
    num_workers: int = doc(2, "DataLoader worker processes per rank (0 = read in the main process)")
    train_split: str = doc("train", "split trained on")
    val_split: str = doc("val", "split evaluated during training ('' = none)")
    test_split: str = doc("test", "split evaluated once at the end ('' = none)")
    shuffle_buffer: int = doc(1000, "samples shuffled together in one block (raw bytes, per worker)")
    mean: list[float] = doc([0.485, 0.456, 0.406], "per-channel normalisation mean (RGB)")
    std: list[float] = doc([0.229, 0.224, 0.225], "per-channel normalisation std (RGB)")
    interpolation: str = doc("bilinear", "resize interpolation: bilinear, bicubic, nearest")
    crop_pct: float = doc(1.0, "eval: resize to image_size/crop_pct then centre-crop")
    scale: list[float] = doc([0.6, 1.0], "train RandomResizedCrop area range (timm/ImageNet: [0.08, 1])")
    ratio: list[float] = doc([0.8, 1.25], "train RandomResizedCrop aspect range (timm: [0.75, 1.333])")
    hflip: float = doc(0.0, "train horizontal flip probability (0 for digits and text)")
    color_jitter: float = doc(0.0, "train colour jitter strength (0 = off)")
    pin_memory: bool = doc(True, "pin host memory for faster GPU copies (ignored on CPU)")
    prefetch_factor: int = doc(2, "batches each worker prepares ahead")
    class_balance: float = doc(0.0, "train: resample each shuffle block with class weights "
                               "count^-x from the manifest (0 = off, 1 = balanced, 0.5 = sqrt)")
    extras: list[str] = doc([], "extra per-sample members to load with the image (packed from "
                            "CSV columns, e.g. [sensor, env]); batches become dicts")
    fold: int = doc(-1, "cross-validation fold k (shards packed with --folds K): train on the "
                    "other K-1 folds, validate on fold k (-1 = no folds)")

    def __post_init__(self) -> None:
        check(bool(self.shards), "data.shards", "must name a packed dataset folder")
        check(self.image_size >= 8, "data.image_size", f"{self.image_size} is below 8 pixels")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        check(len(self.mean) == 3 and len(self.std) == 3, "data.mean/std", "need 3 values each")
        check(all(s > 0 for s in self.std), "data.std", "values must be > 0")
        one_of(self.interpolation, "data.interpolation", ("bilinear", "bicubic", "nearest"))
        check(0 < self.crop_pct <= 1, "data.crop_pct", "must be in (0, 1]")
        check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "data.scale",
               "must be [min, max] with 0 < min <= max <= 1")
        check(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "data.ratio",
               "must be [min, max] with 0 < min <= max")
        check(0 <= self.hflip <= 1, "data.hflip", "must be a probability in [0, 1]")
        check(self.color_jitter >= 0, "data.color_jitter", "must be >= 0")
        check(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        check(0 <= self.class_balance <= 1, "data.class_balance", "must be in [0, 1]")
        check("image" not in self.extras, "data.extras", "'image' is always loaded")
        check(self.fold >= -1, "data.fold", f"{self.fold} is not a fold (-1 = no folds)")
        # The folds partition the packed train split and fold k becomes the val split: other
        # split names would train on held-out data or validate on something else than fold k.
        check(self.fold < 0 or (self.train_split == "train" and self.val_split in ("val", "")),
              "data.fold", f"trains on the other folds of 'train' and validates on fold "
              f"{self.fold} as 'val'; data.train_split/val_split are "
              f"{self.train_split!r}/{self.val_split!r}")


@dataclass
class TrainConfig:
    """Length of training and the per-step recipe."""

    batch_size: int = doc(32, "samples per rank per micro-batch")
    epochs: int = doc(8, "passes over the train split")
    max_steps: int = doc(0, "stop after this many optimizer steps (0 = epochs decide)")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    clip_grad: float = doc(0.0, "clip the global gradient norm to this value (0 = off)")
    max_nonfinite_steps: int = doc(20, "stop after N consecutive steps with a non-finite gradient, "
                                   "each skipped (0 = never stop)")
    channels_last: bool = doc(False, "use channels_last memory format (faster convs on GPU)")
    compile: bool = doc(False, "torch.compile the model (slow first step)")

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.epochs >= 1, "train.epochs", "must be >= 1")
        check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        check(self.clip_grad >= 0, "train.clip_grad", "must be >= 0")
        check(self.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be >= 0")


@dataclass
class ModelConfig:
    """Which timm model to build."""

    name: str = doc("resnet10t", "any timm model name (timm.list_models())")
    pretrained: str = doc("", "local weights file to start from ('' = random init; never downloads)")
    num_classes: int = doc(0, "output classes (0 = from the shard manifest)")
    drop_rate: float = doc(0.0, "dropout before the classifier")
    drop_path_rate: float = doc(0.0, "stochastic depth rate (models that support it)")
    kwargs: dict = doc({}, "extra keyword arguments passed to timm.create_model")

    def __post_init__(self) -> None:
        check(bool(self.name), "model.name", "must name a timm model")
        check(self.num_classes >= 0, "model.num_classes", "must be >= 0")
        check(0 <= self.drop_rate < 1, "model.drop_rate", "must be in [0, 1)")
        check(0 <= self.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")


MULTIMODAL_ABLATIONS = ("none", "image_only", "sensor_only", "no_film")


@dataclass
class MultimodalConfig:
    """Image + sensor window + environment features: the FiLM fusion model (models/film.py)."""

    enabled: bool = doc(False, "build the fusion model around model.name (needs data.extras: "
                        "[sensor, env]); batches are dicts {image, sensor, env}")
    ablation: str = doc("none", "none, image_only, sensor_only or no_film (env features "
                        "concatenated instead of FiLM)")
    sensor_encoder: str = doc("conv", "sensor window encoder: conv (1-D convs over time) or mlp")
    sensor_dim: int = doc(64, "sensor encoder output features")
    fusion_dim: int = doc(128, "width of the fused features FiLM modulates")
    env_hidden: int = doc(32, "hidden width of the env MLP that computes FiLM scale/shift")
    dropout: float = doc(0.1, "dropout before the classifier")

    def __post_init__(self) -> None:
        one_of(self.ablation, "multimodal.ablation", MULTIMODAL_ABLATIONS)
        one_of(self.sensor_encoder, "multimodal.sensor_encoder", ("conv", "mlp"))
        for key in ("sensor_dim", "fusion_dim", "env_hidden"):
            check(getattr(self, key) >= 1, f"multimodal.{key}", "must be >= 1")
        check(0 <= self.dropout < 1, "multimodal.dropout", "must be in [0, 1)")


@dataclass
class OptimConfig:
    """timm optimizer (create_optimizer_v2)."""

    name: str = doc("adamw", "timm optimizer name: adamw, sgd, momentum, lamb, lion, ...")
    lr: float = doc(3e-3, "peak learning rate")
    weight_decay: float = doc(0.05, "decoupled/L2 weight decay (not applied to norms and biases)")
    momentum: float = doc(0.9, "momentum for SGD-style optimizers")
    betas: Optional[list[float]] = doc(None, "Adam-style betas [b1, b2] (null = optimizer default)")
    eps: Optional[float] = doc(None, "optimizer epsilon (null = optimizer default)")

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", "must be > 0")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(self.betas is None or len(self.betas) == 2, "optim.betas", "must be [b1, b2]")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per optimizer update."""

    name: str = doc("cosine", "cosine, step, plateau or constant")
    warmup_epochs: float = doc(0.5, "linear warmup length in epochs (may be fractional)")
    warmup_steps: int = doc(0, "linear warmup length in updates (wins over warmup_epochs)")
    warmup_lr: float = doc(1e-6, "learning rate at the start of warmup")
    min_lr: float = doc(0.0, "floor of the cosine schedule")
    step_size: float = doc(10.0, "step: epochs between decays (StepLR step_size)")
    gamma: float = doc(0.5, "step/plateau: multiply the lr by this at each decay")
    patience: int = doc(3, "plateau: evals without improvement before a decay")

    def __post_init__(self) -> None:
        one_of(self.name, "schedule.name", ("cosine", "step", "plateau", "constant"))
        check(self.warmup_epochs >= 0 and self.warmup_steps >= 0, "schedule.warmup_*",
               "must be >= 0")
        check(self.step_size > 0, "schedule.step_size", "must be > 0")
        check(0 < self.gamma <= 1, "schedule.gamma", "must be in (0, 1]")
        check(self.patience >= 0, "schedule.patience", "must be >= 0")


@dataclass
class EngineConfig:
    """How forward/backward/step run: single process, DDP or DeepSpeed; device, precision."""

    name: str = doc("auto", "auto (ddp when world size > 1), local, ddp or deepspeed")
    precision: str = doc("fp32", "fp32, bf16 (autocast) or fp16 (autocast + grad scaler)")
    device: str = doc("auto", "auto (cuda when present), cuda or cpu")
    backend: str = doc("auto", "process-group backend: auto (nccl on cuda, else gloo), nccl, gloo")
    find_unused_parameters: bool = doc(False, "DDP: allow parameters that get no gradient")
    timeout_s: float = doc(1800.0, "collective timeout in seconds (a dead rank ends the job)")
    deepspeed: dict = doc({}, "engine.name=deepspeed: DeepSpeed config (zero_optimization, "
                          "offload, ...); batch sizes, accumulation, clipping and bf16/fp16 come "
                          "from train.* and engine.precision")

    def __post_init__(self) -> None:
        one_of(self.name, "engine.name", ("auto", "local", "ddp", "deepspeed"))
        one_of(self.precision, "engine.precision", ("fp32", "bf16", "fp16"))
        one_of(self.device, "engine.device", ("auto", "cuda", "cpu"))
        one_of(self.backend, "engine.backend", ("auto", "nccl", "gloo"))
        check(self.timeout_s > 0, "engine.timeout_s", "must be > 0")


@dataclass
class EvalConfig:
    """When and how to evaluate."""

    every_steps: int = doc(0, "evaluate val every N optimizer steps (0 = off)")
    every_epoch: bool = doc(True, "evaluate val at the end of every epoch")
    test_at_end: bool = doc(True, "evaluate the test split with the final model")
    batch_size: int = doc(0, "eval samples per rank per batch (0 = train.batch_size)")

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        check(self.batch_size >= 0, "eval.batch_size", "must be >= 0")


@dataclass
class CheckpointConfig:
    """Checkpoints in <run>/checkpoints/."""

    every_steps: int = doc(0, "write last.pt every N optimizer steps (0 = only at epoch ends)")
    every_minutes: float = doc(0.0, "also write last.pt when this many minutes passed since the "
                               "previous save (0 = off)")
    keep_last: int = doc(0, "also keep the newest K step_XXXXXXXX.pt files (0 = none)")
    save_best: bool = doc(True, "write best.pt when early_stop.metric improves")

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        check(self.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0")
        check(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")


@dataclass
class LogConfig:
    """Console and log-file output (rank 0 only)."""

    interval: int = doc(10, "plain console line every N steps when not on a terminal")
    progress: str = doc("auto", "auto (rich bar on a terminal, plain lines otherwise), rich, "
                        "plain or none")
    tensorboard: bool = doc(False, "also write TensorBoard event files to <run>/tb")
    wandb: bool = doc(False, "also log to Weights & Biases in offline mode (<run>/wandb)")

    def __post_init__(self) -> None:
        check(self.interval >= 1, "log.interval", "must be >= 1")
        one_of(self.progress, "log.progress", ("auto", "rich", "plain", "none"))


@dataclass
class EarlyStopConfig:
    """The metric that picks best.pt, and when to stop early on it."""

    metric: str = doc("acc", "val metric for best.pt and early stopping: acc, macro_f1 or loss")
    patience: int = doc(0, "stop after N evals without improvement (0 = never)")
    target: Optional[float] = doc(None, "stop once the metric reaches this value (null = never)")
    min_delta: float = doc(0.0, "smallest change that counts as an improvement")
    use_ema: bool = doc(False, "select best.pt and stop early on the EMA weights' val metrics "
                        "(needs ema.decay > 0)")

    def __post_init__(self) -> None:
        one_of(self.metric, "early_stop.metric", ("acc", "macro_f1", "loss"))
        check(self.patience >= 0, "early_stop.patience", "must be >= 0")
        check(self.min_delta >= 0, "early_stop.min_delta", "must be >= 0")


@dataclass
class WatchdogConfig:
    """Hang detection: a rank that makes no progress dumps its stacks and exits."""

    timeout: float = doc(1800.0, "seconds without a finished step or eval batch before the rank "
                         "dumps stacks to the run folder and exits 124 (0 = off)")

    def __post_init__(self) -> None:
        check(self.timeout == 0 or self.timeout >= 10, "watchdog.timeout",
              f"{self.timeout} s is too short (0 = off, else >= 10)")


@dataclass
class SweepTrialConfig:
    """Set by ``ddp-train sweep`` on the runs it starts: the Optuna trial this run reports to."""

    storage: str = doc("", "the sweep's Optuna storage: a journal file or an SQLAlchemy URL "
                       "('' = not a sweep trial)")
    study: str = doc("", "study name in that storage")
    trial: int = doc(-1, "trial number in that study")

    def __post_init__(self) -> None:
        if self.storage:
            check(bool(self.study), "sweep.study", "is empty but sweep.storage is set")
            check(self.trial >= 0, "sweep.trial", "must be >= 0 when sweep.storage is set")
