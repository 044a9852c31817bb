"""The model weights of any checkpoint kind, for eval, predict and export (no process group).

Kinds: a ddp-train ``.pt`` (local/DDP), a DeepSpeed checkpoint folder (ZeRO partitions are
consolidated into fp32) and ``ddp-train export-weights`` output; a run folder stands for its
``checkpoints/last``.
"""
from __future__ import annotations

import glob
import os

import torch

from .files import LAST, load


def find_checkpoint(run: str) -> str:
    """``run`` itself when it is a checkpoint, else ``<run>/checkpoints/last`` (.pt or folder).

    Raises FileNotFoundError naming what is missing.
    """
    folder = os.path.join(run, "checkpoints")
    if os.path.isdir(folder):
        for name in (LAST + ".pt", LAST):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise FileNotFoundError(f"{folder} holds no last checkpoint")
    if not os.path.exists(run):
        raise FileNotFoundError(f"{run}: no such run folder or checkpoint")
    return run


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The plain model state dict of checkpoint ``path`` (a file or a DeepSpeed folder), on CPU.

    Raises :class:`~ddp_train.checkpoint.files.CheckpointError` for an unreadable file.
    """
    if os.path.isdir(path):
        return consolidated_state_dict(path)
    return load(path)["model"]


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The whole model in fp32 from DeepSpeed checkpoint folder ``path`` (no process group).

    ZeRO 1-3 keep the fp32 master weights partitioned in the per-rank optimizer files, so
    DeepSpeed's zero_to_fp32 stitches them together. ZeRO-0 has no partitions: its model file
    holds the whole module (bf16/fp16 weights when mixed precision was on, so cast up).
    """
    parent, tag = os.path.split(os.path.abspath(path))
    if glob.glob(os.path.join(path, "*zero_pp_rank_*_optim_states.pt")):
        # deepspeed only here, lazily: it is an optional extra, and only its folders need it
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
    else:
        # DeepSpeed's own files pickle its config objects: not weights_only-loadable.
        state = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=False)["module"]
    # Floating tensors (weights and BatchNorm stats cast to bf16 for training) back to fp32.
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
