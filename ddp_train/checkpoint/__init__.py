"""Checkpoints: the one home for writing, finding, verifying and reading them.

* ``files.py``: atomic ``.pt`` files and JSON sidecars, DeepSpeed folder swaps, verified loads;
* ``manager.py``: a run's last / step / best checkpoints, pruning, the one to resume from;
* ``state.py``: the trainer's stateful parts in and out of a checkpoint, RNG states, config
  hashes and the config diff reported on resume;
* ``weights.py``: the model weights of any checkpoint kind (ddp-train, DeepSpeed, exported).
"""
from .files import (BEST, FORMAT, LAST, TMP_SUFFIX, CheckpointError, load, loadable, read_meta,
                    recover_folder_swaps, replace_folder, save_atomic, write_sidecar)
from .manager import CheckpointManager
from .state import (RngStates, Stateful, capture, config_diff, config_hash, describe_diff,
                    restore, rng_state, set_rng_state)
from .weights import consolidated_state_dict, find_checkpoint, read_weights

__all__ = ["BEST", "FORMAT", "LAST", "TMP_SUFFIX", "CheckpointError", "CheckpointManager",
           "RngStates", "Stateful", "capture", "config_diff", "config_hash",
           "consolidated_state_dict", "describe_diff", "find_checkpoint", "load", "loadable",
           "read_meta", "read_weights", "recover_folder_swaps", "replace_folder", "restore",
           "rng_state", "save_atomic", "set_rng_state", "write_sidecar"]
