"""Checkpoints that hold a shard where a full tensor belongs: refused with what is wrong.

Under a sharding strategy (FSDP2) every rank holds a shard of each parameter, as a ``DTensor``.
A checkpoint is written by rank 0 alone, so a tensor that was not gathered first (in
``collect_state``, on every rank) would be rank 0's shard: the file is intact, but incomplete.
Rank 0 refuses to write one (before writing: the previous file stays), and a file that holds one
anyway (written by other code, or a shard-sized weight) is refused on load with the same words,
instead of a shape error or "corrupt".
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torchplug.errors import CheckpointError

GATHER_FIX = ("gather it in collect_state, which runs on every rank before rank 0 builds the checkpoint "
              "(DTensor.full_tensor() there), and store the full tensor")


def find_dtensor(value: Any, where: str = "checkpoint") -> str | None:
    """Where in ``value`` the first ``DTensor`` is (``"checkpoint['ema']['w']"``), or ``None``."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:  # never imported: no DTensor exists in this process
        return None
    return _find(value, where, module.DTensor)


def _find(value: Any, where: str, kind: type) -> str | None:
    if isinstance(value, kind):
        return where
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _find(item, f"{where}[{key!r}]", kind)
        if found is not None:
            return found
    return None


def refuse_before_save(checkpoint: Mapping[str, Any], strategy: str) -> None:
    """Rank 0, before writing: a ``DTensor`` in the checkpoint is its own shard only."""
    found = find_dtensor(checkpoint)
    if found is not None:
        raise CheckpointError(
            f"Not writing the checkpoint: {found} is a DTensor, this rank's shard of a tensor sharded by the "
            f"strategy {strategy!r}, not the full tensor (the file would hold rank 0's shard alone). The plugin "
            f"that stores it (in on_save_checkpoint, or get_state_dicts for the weights) must {GATHER_FIX}."
        )


def refuse_on_load(data: Mapping[str, Any], path: Any) -> None:
    """A loaded checkpoint holding a ``DTensor`` is one rank's shard: say so, not "corrupt"."""
    found = find_dtensor(data)
    if found is not None:
        raise CheckpointError(
            f"Checkpoint {path} is intact but incomplete: {found} is a DTensor, one rank's shard of a sharded "
            f"tensor, saved without gathering the full tensor. Write it again with a plugin that does: {GATHER_FIX}."
        )


def looks_like_a_shard(saved: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether ``saved`` is ``expected`` cut along its first dimension (FSDP2's ``Shard(0)``)."""
    return (len(saved) == len(expected) > 0 and tuple(saved[1:]) == tuple(expected[1:]) and 0 < saved[0] < expected[0])


__all__ = ["find_dtensor", "looks_like_a_shard", "refuse_before_save", "refuse_on_load"]
