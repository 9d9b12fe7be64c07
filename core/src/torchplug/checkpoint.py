"""Checkpoint files: written atomically, read with ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings and containers only, so loading it never
runs pickled code. It is written to a temporary file in the same folder, fsynced, then
renamed over the target (and the folder fsynced): a crash or a kill mid-write leaves the
previous checkpoint intact. Reading checks the zip container's CRCs first, so a truncated
or bit-flipped file is refused instead of silently loading damaged tensors.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import random
import secrets
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchplug.errors import CheckpointError
from torchplug.shards import looks_like_a_shard, refuse_on_load
from torchplug.utils import pid_alive

FORMAT_VERSION = 1
REQUIRED_KEYS = ("torchplug_checkpoint", "state_dict", "optimizer_states", "global_step", "epoch")
TMP_SUFFIX = ".tmp"


def save(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (write, fsync, rename, fsync the folder)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    # os.open with 0o666 gives the umask's permissions (mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete temporaries of ``target`` left by writers that were killed mid-write (their
    process no longer exists); a live writer's temporary is left alone."""
    removed = []
    for tmp in target.parent.glob(f".{glob_escape(target.name)}.*{TMP_SUFFIX}"):
        pid_text = tmp.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or pid_alive(int(pid_text)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def load(path: str | os.PathLike[str], *, weights_only: bool = True) -> dict[str, Any]:
    """Read a torchplug checkpoint onto the CPU.

    :param weights_only: refuse pickled objects other than tensors and plain containers.
        Only pass ``False`` for a file you trust: unpickling can run arbitrary code.
    :raises CheckpointError: missing, truncated, corrupt, unsafe or not a torchplug checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist (or is not a file).")
    _check_container(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only and "global" in str(exc).lower():
            detail = str(exc).strip().splitlines()[-3:]
            raise CheckpointError(
                f"Checkpoint {path} holds pickled objects that weights_only loading refuses "
                f"({' '.join(line.strip() for line in detail)[:300]}). If you trust the file, "
                "load it with Trainer(checkpoint_weights_only=False): unpickling can run arbitrary code."
            ) from exc
        raise CheckpointError(f"Checkpoint {path} is corrupt: {type(exc).__name__}: {str(exc)[:300]}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or truncated: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path} is not a torchplug checkpoint (expected a dict with the keys {', '.join(REQUIRED_KEYS)})."
        )
    version = data["torchplug_checkpoint"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path} is not a torchplug checkpoint (format {version!r}).")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format {version}, newer than this torchplug reads ({FORMAT_VERSION}); "
            "upgrade torchplug."
        )
    refuse_on_load(data, path)
    return data


def _check_container(path: Path) -> None:
    """``torch.save`` writes a zip archive with a CRC per record: check them all, so a
    truncated or damaged file fails here with a clear message (a flipped byte inside a tensor
    would otherwise load silently)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        size = path.stat().st_size
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or truncated ({size} bytes; not a complete torch.save archive: {exc})."
        ) from exc
    if bad is not None:
        raise CheckpointError(f"Checkpoint {path} is corrupt: record {bad!r} fails its CRC check.")


def check_matches(checkpoint: Mapping[str, Any], model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint whose weights do not fit ``model`` (names and shapes), before any work."""
    # A sharded checkpoint (torchplug.sharded) stores the keys and shapes instead of the tensors.
    sharded = "sharded_state" in checkpoint
    saved = checkpoint.get("state_dict_shapes") if sharded else checkpoint["state_dict"]
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"Checkpoint {path} has no model {'state_dict_shapes' if sharded else 'state_dict'}.")
    saved_shapes = {k: tuple(v) if sharded else tuple(v.shape) if isinstance(v, torch.Tensor) else None
                    for k, v in saved.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k}: checkpoint {saved_shapes[k]} vs model {tuple(v.shape)}"
        + (" (a shard of it: the file was written by one rank of a sharded run without gathering the full state "
           "in collect_state)" if looks_like_a_shard(saved_shapes[k] or (), tuple(v.shape)) else "")
        for k, v in own.items()
        if saved_shapes.get(k) is not None and isinstance(v, torch.Tensor) and saved_shapes[k] != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(
            f"Checkpoint {path} does not match {type(model).__name__}: {', '.join(parts)}."
        )


def capture_rng() -> tuple[Any, ...]:
    """Every global random generator's state as it comes: what the loop keeps at each window
    start, converted by :func:`rng_states` only when a checkpoint is written (the conversion is
    the part a window start need not pay). ~20 us, most of it Python's ``random.getstate``."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        cuda = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    return torch.get_rng_state(), random.getstate(), cuda, _numpy_state(numpy) if numpy is not None else None


#: numpy's last ``get_state()`` and the raw MT19937 state it was read at (:func:`_numpy_state`)
_numpy_last: tuple[bytes, tuple[Any, ...]] | None = None
_MT19937_STATE_BYTES = 624 * 4 + 4  # mt19937_state: uint32_t key[624]; int pos


def _numpy_state(numpy: Any) -> tuple[Any, ...]:
    """``numpy.random.get_state()``, which costs ~60 us per call, reused while the generator has
    not moved: an unchanged raw MT19937 state (2.5 KB read through numpy's public ctypes
    interface, ~2 us) with no cached Gaussian at the last read means nothing drew since (a draw
    moves the state; only a cached Gaussian, consumed, changes the state without moving it).
    The one change this cannot see is a ``set_state`` to the same raw state with a cached
    Gaussian; torchplug's own restores call :func:`forget_numpy_state`."""
    global _numpy_last
    raw = None
    get_bit_generator = getattr(numpy.random, "get_bit_generator", None)  # numpy >= 1.25
    if get_bit_generator is not None:
        generator = get_bit_generator()
        if type(generator).__name__ == "MT19937":  # another generator set: its state's layout is unknown here
            raw = ctypes.string_at(generator.ctypes.state_address, _MT19937_STATE_BYTES)
    last = _numpy_last
    if raw is not None and last is not None and last[0] == raw and not last[1][3]:  # [3]: has_gauss
        return last[1]
    state: tuple[Any, ...] = numpy.random.get_state()
    _numpy_last = (raw, state) if raw is not None else None
    return state


def rng_states(captured: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """Every global random generator's state (or ``captured``'s, from :func:`capture_rng`), in a
    weights_only-loadable form."""
    torch_state, (version, internal, gauss), cuda, numpy_state = captured if captured is not None else capture_rng()
    states: dict[str, Any] = {"torch": torch_state, "python": [version, list(internal), gauss]}
    if cuda is not None:
        states["cuda"] = cuda
    if numpy_state is not None:
        kind, keys, pos, has_gauss, cached = numpy_state
        states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        forget_numpy_state()


def forget_numpy_state() -> None:
    """Make the next :func:`capture_rng` read numpy's state in full (after a ``set_state``)."""
    global _numpy_last
    _numpy_last = None
