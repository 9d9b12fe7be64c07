"""Checkpoint files: written atomically, read with ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings and containers only, so loading it never
runs pickled code. It is written to a temporary file in the same folder, fsynced, then
renamed over the target: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from torchplug.errors import CheckpointError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("torchplug_checkpoint", "state_dict", "optimizer_states", "global_step", "epoch")


def save(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (write, fsync, rename, fsync the folder)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def load(path: str | os.PathLike[str], *, weights_only: bool = True) -> dict[str, Any]:
    """Read a torchplug checkpoint onto the CPU.

    :param weights_only: refuse pickled objects other than tensors and plain containers.
        Only pass ``False`` for a file you trust: unpickling can run arbitrary code.
    :raises CheckpointError: missing, truncated, corrupt, unsafe or not a torchplug checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Checkpoint {path} holds objects that weights_only loading refuses ({exc}). "
            "If you trust the file, load it with Trainer(checkpoint_weights_only=False)."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint {path} is corrupt or truncated: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path} is not a torchplug checkpoint (expected the keys {', '.join(REQUIRED_KEYS)})."
        )
    if data["torchplug_checkpoint"] > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format {data['torchplug_checkpoint']}, newer than this torchplug "
            f"reads ({FORMAT_VERSION}); upgrade torchplug."
        )
    return data


def rng_states() -> dict[str, Any]:
    """Every random generator's state, in a weights_only-loadable form."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
