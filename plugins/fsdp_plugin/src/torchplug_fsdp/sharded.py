"""Sharded checkpoints of ``FSDPPlugin(checkpoint="sharded")`` with ``torch.distributed.checkpoint`` (DCP).

Saving (``save_sharded_state``, every rank): rank 0 names a fresh folder next to the checkpoint
file and broadcasts it; every rank writes its shards of ``{"model": ..., "optim": ...}`` (from
``get_model_state_dict``/``get_optimizer_state_dict``: sharded DTensors under the module's own
keys) with ``dcp.save``, and rank 0 the metadata. A new folder per save: the checkpoint file is
replaced atomically afterwards, so the folder the previous file names is intact until then; the
folder before it is removed then (two are kept).

Loading (``load_sharded_state``, every rank): the folder's metadata is checked against this
run's state dict first (another model's shards are refused naming the folder), then ``dcp.load``
fills this run's state dict, sharded or not, whatever the world size that wrote it, and
``set_model_state_dict``/``set_optimizer_state_dict`` load it.
"""

from __future__ import annotations

import secrets
import shutil
import warnings
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.optim import Optimizer

from torchplug import CheckpointError

if TYPE_CHECKING:
    from torchplug import Trainer

FORMAT = "torch.distributed.checkpoint"
WRITER = "fsdp (torchplug-fsdp)"
#: sharded folders kept per checkpoint file: the one its current version names, and the newest
KEEP = 2


class ShardedCheckpoints:
    """The DCP folders one fit wrote, per checkpoint file (runtime state of the plugin)."""

    def __init__(self) -> None:
        self._written: dict[str, list[Path]] = {}
        self._saved = False

    def take_saved(self) -> bool:
        """Whether a sharded save just ran (the ``collect_state`` after it need not gather); resets."""
        saved, self._saved = self._saved, False
        return saved

    def save(self, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], checkpoint_path: str | None,
             group: Any) -> dict[str, Any] | None:
        target: tuple[str, str] | None = None
        if trainer.is_global_zero and checkpoint_path is not None:
            path = Path(checkpoint_path)
            target = (str(path.parent), f"{path.name}.{trainer.global_step}-{secrets.token_hex(3)}.dcp")
        if group is not None:  # only rank 0 knows the run folder
            holder: list[Any] = [target]
            dist.broadcast_object_list(holder, src=0, group=group)
            target = holder[0]
        if target is None:
            return None
        folder = Path(target[0]) / target[1]
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if any(optimizer.state for optimizer in optimizers):
            # Before the first step there is no state to save, and get_optimizer_state_dict would
            # create it with a zero-gradient step (Adam's step count then starts at 1).
            state["optim"] = get_optimizer_state_dict(model, optimizers)
        with _one_process(group):
            dcp_save(state, checkpoint_id=folder, process_group=group, no_dist=group is None)
        self._saved = True
        if trainer.is_global_zero:
            written = self._written.setdefault(str(checkpoint_path), [])
            written.append(folder)
            for old in written[:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)
            del written[:-KEEP]
        return {"folder": target[1], "format": FORMAT, "plugin": WRITER}

    def load(self, model: nn.Module, optimizers: list[Optimizer], folder: str, reference: dict[str, Any],
             group: Any) -> bool | None:
        if reference.get("format") != FORMAT:
            return None  # another strategy's shards
        model_state = get_model_state_dict(model)
        saved_optim = _check_shards(folder, model_state)
        state: dict[str, Any] = {"model": model_state}  # dcp_load fills it in place
        if saved_optim:  # the fresh optimizers get their state (created by a zero-gradient step) overwritten
            state["optim"] = get_optimizer_state_dict(model, optimizers)
        try:
            with _one_process(group):
                dcp_load(state, checkpoint_id=folder, process_group=group, no_dist=group is None)
        except Exception as exc:  # DCP reports a missing or damaged shard file as a generic error
            raise CheckpointError(
                f"FSDPPlugin (torchplug-fsdp): the sharded checkpoint folder {folder} could not be read "
                f"({type(exc).__name__}: {str(exc)[:300]}); a shard file is missing or damaged."
            ) from exc
        set_model_state_dict(model, model_state)
        if saved_optim:
            set_optimizer_state_dict(model, optimizers, state["optim"])
        return True


@contextmanager
def _one_process(group: Any) -> Generator[None, None, None]:
    """Without a group DCP warns that it assumes one process, even with no_dist=True: here that is the intent."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _check_shards(folder: str, model_state: dict[str, Any]) -> bool:
    """Refuse, naming the folder, shards that are not DCP's or hold another model's tensors;
    returns whether they hold optimizer state."""
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as exc:
        raise CheckpointError(
            f"FSDPPlugin (torchplug-fsdp): {folder} holds no readable torch.distributed.checkpoint metadata "
            f"({type(exc).__name__}: {str(exc)[:200]}); the sharded folder is incomplete or not this checkpoint's."
        ) from exc
    saved = {k[len("model."):]: v.size for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    own = {k: v.shape for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(own) - set(saved))
    shapes = [f"{k}: shards {tuple(saved[k])} vs model {tuple(v)}" for k, v in own.items()
              if k in saved and tuple(saved[k]) != tuple(v)]
    if missing or shapes:
        parts = ([f"missing {missing[:5]}"] if missing else []) + (["shape mismatch " + "; ".join(shapes[:5])]
                                                                   if shapes else [])
        raise CheckpointError(
            f"FSDPPlugin (torchplug-fsdp): the sharded folder {folder} holds another model's state: "
            f"{', '.join(parts)}."
        )
    return any(k.startswith("optim.") for k in metadata.state_dict_metadata)


__all__ = ["FORMAT", "ShardedCheckpoints"]
