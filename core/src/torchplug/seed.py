"""Seeding every generator a training run draws from."""

from __future__ import annotations

import random
import sys

import torch


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, torch (CPU and CUDA) and numpy if it is imported; returns ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed_everything needs an integer seed, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    return seed
