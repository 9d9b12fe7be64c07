"""Per-rank optimizer-state bytes of a fit (importable by spawned workers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from torchplug import Plugin
from torchplug.testing.models import TinyMLP


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state tensors this rank holds (ZeRO: its local optimizer's)."""
    local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard's optimizer there
    return sum(t.numel() * t.element_size() for s in local.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.ndim > 0)


class StateBytes(Plugin):
    plugin_name = "state_bytes"

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer: Any) -> None:
        report = {"bytes": sum(state_bytes(o) for o in trainer.optimizers),
                  "optimizers": [type(o).__name__ for o in trainer.optimizers]}
        Path(self.out_dir, f"state-rank{trainer.global_rank}.json").write_text(json.dumps(report))


class AdamMLP(TinyMLP):
    """TinyMLP with Adam: two state tensors per parameter, the state ZeRO-1 shards."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)
