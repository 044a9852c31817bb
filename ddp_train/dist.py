"""Ranks, devices and process groups: the one module that reads launcher environment variables.

Everything else receives a :class:`DistInfo` value object. Supported launchers:

* plain ``python -m ddp_train``: one process, no process group;
* ``torchrun`` (any ``--nproc_per_node`` / ``--nnodes``, c10d rendezvous): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` are set by torchrun; ``accelerate launch``
  runs torchrun underneath, and the ``deepspeed`` launcher sets the same variables (with
  ``LOCAL_SIZE`` for the local world size; its ``--local_rank`` argument is ignored);
* Slurm's ``srun`` with one task per GPU and no torchrun: ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, and the first host of ``SLURM_JOB_NODELIST`` as the rendezvous address.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. Immutable; pass it to components instead of env vars."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"  # "gloo" / "nccl" when a process group is up, "none" for one process
    launcher: str = "python"  # "python", "torchrun" (also accelerate), "deepspeed" or "srun"
    restart_count: int = 0  # torchrun --max-restarts round or Slurm requeue count
    job_id: str = ""  # Slurm job id (with array task) when under Slurm, else ""

    @property
    def is_main(self) -> bool:
        """True on global rank 0: the one process that writes logs and run files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised (world size > 1)."""
        return self.backend != "none"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (``n[1-4],gpu7`` -> ``n1``); asks scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback parser for the common forms when scontrol is not on PATH.
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    return (m.group(1) + (m.group(2) or "")) if m else "127.0.0.1"


def launch_env() -> dict[str, Any]:
    """Read rank/world/local rank and launcher identity from the environment (no side effects)."""
    env = os.environ
    job_id = env.get("SLURM_JOB_ID", "")
    if env.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    slurm_restarts = _env_int("SLURM_RESTART_COUNT", 0)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, accelerate, deepspeed (also in sbatch)
        # The deepspeed launcher is the one that sets LOCAL_SIZE instead of LOCAL_WORLD_SIZE.
        deepspeed = "LOCAL_WORLD_SIZE" not in env and "LOCAL_SIZE" in env
        return dict(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                    local_rank=_env_int("LOCAL_RANK", 0),
                    local_world_size=_env_int("LOCAL_SIZE" if deepspeed else "LOCAL_WORLD_SIZE",
                                              1),
                    launcher="deepspeed" if deepspeed else "torchrun",
                    restart_count=_env_int("TORCHELASTIC_RESTART_COUNT", 0) + slurm_restarts,
                    job_id=job_id, init_method="env://",
                    # torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT for every
                    # restart round (see setup() for why the round matters).
                    agent_store=(env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                                 and bool(env.get("MASTER_ADDR")) and bool(env.get("MASTER_PORT"))),
                    store_addr=env.get("MASTER_ADDR", ""), store_port=_env_int("MASTER_PORT", 0),
                    store_round=_env_int("TORCHELASTIC_RESTART_COUNT", 0))
    if _env_int("SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:  # srun, one task per rank
        host = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        # A port derived from the job id keeps two jobs sharing a node from colliding.
        port = 20000 + int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0) % 20000
        return dict(rank=_env_int("SLURM_PROCID", 0), world_size=_env_int("SLURM_NTASKS", 1),
                    local_rank=_env_int("SLURM_LOCALID", 0),
                    local_world_size=_env_int("SLURM_NTASKS_PER_NODE", 1), launcher="srun",
                    restart_count=slurm_restarts, job_id=job_id,
                    init_method=f"tcp://{host}:{port}")
    return dict(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="python",
                restart_count=slurm_restarts, job_id=job_id, init_method="")


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("engine.device: cuda requested but no CUDA device is visible")
        # One GPU per local rank; set it before the process group so nccl binds the right card.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def setup(device: str = "auto", backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Pick the device, start the process group when world size > 1, and return a DistInfo.

    ``device``: "auto" (CUDA when present), "cpu" or "cuda". ``backend``: "auto" (nccl on CUDA,
    else gloo), "gloo" or "nccl". ``timeout_s`` bounds every collective so a dead peer ends the
    job instead of hanging it.
    """
    env = launch_env()
    dev = _pick_device(device, env["local_rank"])
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if env["world_size"] > 1:
        if not tdist.is_initialized():
            kwargs: dict[str, Any] = dict(backend=backend, init_method=env["init_method"],
                                          timeout=datetime.timedelta(seconds=timeout_s))
            if env["init_method"] != "env://":
                kwargs.update(rank=env["rank"], world_size=env["world_size"])
            if dev.type == "cuda":
                kwargs["device_id"] = dev  # lets nccl create its communicator eagerly
            if env.get("agent_store"):
                # torchrun keeps ONE store alive across --max-restarts rounds, and env:// uses
                # it without a per-round prefix: after a restart a fast rank can read a dead
                # peer's address left by the previous round, and gloo fails with "connection
                # refused". Namespacing the keys by round makes every round start clean.
                base = tdist.TCPStore(env["store_addr"], env["store_port"], env["world_size"],
                                      is_master=False,
                                      timeout=datetime.timedelta(seconds=timeout_s))
                kwargs.update(store=tdist.PrefixStore(f"ddp_train/round{env['store_round']}",
                                                      base),
                              rank=env["rank"], world_size=env["world_size"])
                del kwargs["init_method"]
            tdist.init_process_group(**kwargs)
    else:
        backend = "none"
    return DistInfo(rank=env["rank"], world_size=env["world_size"], local_rank=env["local_rank"],
                    local_world_size=env["local_world_size"], device=dev, backend=backend,
                    launcher=env["launcher"], restart_count=env["restart_count"],
                    job_id=env["job_id"])


def teardown(info: DistInfo) -> None:
    """Destroy the process group if this process started one. Safe to call twice."""
    if info.distributed and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        tdist.barrier()


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Return rank 0's ``obj`` on every rank (no-op in a single process)."""
    if not info.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(info: DistInfo, tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (e.g. BatchNorm buffers).

    One flat broadcast per dtype instead of one per tensor: a ResNet has ~100 small buffers.
    """
    if not info.distributed:
        return
    for dtype in sorted({t.dtype for t in tensors}, key=str):  # the same order on every rank
        group = [t for t in tensors if t.dtype == dtype]
        flat = _flatten_dense_tensors(group)
        tdist.broadcast(flat, src=0)
        for t, synced in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(synced)


def all_reduce_sum(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op in a single process)."""
    if info.distributed:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Gather one picklable object per rank, in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out


def gpu_slices(parallel: int, per_trial: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each of ``parallel`` concurrent sweep trials of ``per_trial``
    GPUs each: disjoint slices of the GPUs this process sees. All None without CUDA (CPU
    trials share the cores). Raises ConfigError when the GPUs do not go round."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return [None] * parallel
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    # Slice what is visible (Slurm and users narrow it), by the ids the children must be given.
    ids = [v.strip() for v in visible.split(",") if v.strip()][:count] or \
        [str(i) for i in range(count)]
    return split_gpus(ids, parallel, per_trial)


def split_gpus(ids: list[str], parallel: int, per_trial: int) -> list[str]:
    """``ids`` cut into ``parallel`` disjoint comma-joined slices of ``per_trial`` ids."""
    if parallel * per_trial > len(ids):
        raise ConfigError(f"--parallel {parallel} x {per_trial} GPU(s) per trial needs "
                          f"{parallel * per_trial} GPUs; {len(ids)} visible ({','.join(ids)})")
    return [",".join(ids[i * per_trial:(i + 1) * per_trial]) for i in range(parallel)]
