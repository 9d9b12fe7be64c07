"""Checkpoints whose model and optimizer state a strategy saved sharded (``save_sharded_state``).

The checkpoint file keeps the run state (counters, RNG, loader position, plan) and, under
``"sharded_state"``, the strategy's reference to its shards' folder, next to the file; under
``"state_dict_shapes"`` the module's state-dict keys and shapes, so a resume is matched
against the model before any work, as with full state dicts. Resuming, :func:`resolve_folder`
finds the folder (before any work) and every process loads it with ``load_sharded_state``;
:func:`remove_checkpoint` deletes a file with the folder it names (``ModelCheckpoint``'s top k).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchplug.errors import CheckpointError
from torchplug.manager import DEFAULTS_NAME

if TYPE_CHECKING:
    import pluggy

#: the resume dict's key for the resolved shards' folder (set by :func:`resolve_folder`)
FOLDER_KEY = "sharded_state_folder"


def state_dict_shapes(module: nn.Module) -> dict[str, list[int]]:
    """The module's state-dict keys and full shapes (a sharded tensor, a DTensor, has its global
    shape): read without a collective."""
    return {k: list(v.shape) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def resolve_folder(checkpoint: dict[str, Any], path: str | os.PathLike[str], pm: pluggy.PluginManager) -> None:
    """For a checkpoint with sharded state: refuse it, naming the folder, when the folder is
    missing or no plugin of this run reads shards; else note the folder in ``checkpoint``."""
    reference = checkpoint.get("sharded_state")
    if reference is None:
        return
    if not isinstance(reference, Mapping) or not isinstance(reference.get("folder"), str):
        raise CheckpointError(f"Checkpoint {path} has a sharded_state without a folder: {reference!r}.")
    folder = Path(path).parent / reference["folder"]
    writer = f"written by {reference.get('plugin', 'an unnamed plugin')}"
    if not folder.is_dir():
        raise CheckpointError(
            f"Checkpoint {path} keeps its model and optimizer state in the sharded folder {folder} ({writer}), "
            "which does not exist: copy the folder next to the checkpoint file with it."
        )
    readers = [impl.plugin_name for impl in pm.hook.load_sharded_state.get_hookimpls()
               if impl.plugin_name != DEFAULTS_NAME]
    if not readers:
        raise CheckpointError(
            f"Checkpoint {path} keeps its model and optimizer state in the sharded folder {folder} ({writer}); "
            "no plugin of this run reads sharded state (load_sharded_state): resume with the strategy that "
            "wrote it, e.g. Trainer(strategy='fsdp') with FSDPPlugin(checkpoint='sharded') (torchplug-fsdp)."
        )
    checkpoint[FOLDER_KEY] = str(folder)


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete a checkpoint file and, when it names a sharded state folder, that folder (a file
    that cannot be read is deleted alone). Memory-mapped: the file's tensors are not read."""
    target = Path(path)
    try:
        data = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing or damaged: nothing it names can be found
        data = None
    reference = data.get("sharded_state") if isinstance(data, dict) else None
    if isinstance(reference, Mapping) and isinstance(reference.get("folder"), str):
        folder = target.parent / reference["folder"]
        if folder.parent == target.parent and folder.is_dir():  # a name next to the file, never elsewhere
            shutil.rmtree(folder, ignore_errors=True)
    target.unlink(missing_ok=True)


__all__ = ["FOLDER_KEY", "remove_checkpoint", "resolve_folder", "state_dict_shapes"]
