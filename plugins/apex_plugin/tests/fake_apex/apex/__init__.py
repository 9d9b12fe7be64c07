"""FAKE of the NVIDIA apex 25.05 top-level package for CPU contract tests; not apex.

Real apex 25.05 ``apex/__init__.py`` imports ``amp``, ``fp16_utils``, ``parallel``,
``optimizers``, ``normalization`` and ``transformer`` and defines ``deprecated_warning``,
which ``apex.amp.initialize`` calls on every invocation. This fake provides only
``amp`` (see ``apex/amp/__init__.py`` here) and the deprecation helper, because the
torchplug apex plugin only touches ``apex.amp``.
"""

from __future__ import annotations

import warnings

import torch

from . import amp  # amp imports deprecated_warning lazily, so order is free

__all__ = ["amp"]


class DeprecatedFeatureWarning(FutureWarning):
    """Same class name and base as apex 25.05 (apex/__init__.py), so filters written
    for real apex (e.g. Lightning 1.9 silencing FutureWarning) behave the same."""


def deprecated_warning(msg: str) -> None:
    # Effective condition of apex 25.05: warn unless torch.distributed is initialised on
    # a non-zero rank. stacklevel=1 (apex's implicit default) points at this line, so
    # the default warning filter shows it once per process, as with real apex.
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        warnings.warn(msg, DeprecatedFeatureWarning, stacklevel=1)
