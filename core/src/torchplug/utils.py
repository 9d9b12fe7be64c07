"""Small helpers shared by the core and plugins."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple, list or dict to ``device``; others pass through."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(move_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    return obj


def optimizer_params(optimizer: Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates, in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]
