"""FAKE of NVIDIA apex 25.07 and later (top-level package only); not apex.

What it imitates: NVIDIA/apex commit cb65b8e ("remove old features: amp, ddp, and
rnn", 2025-05-08) deleted ``apex/amp``; from tag 25.07 on, ``import apex`` works but
the package only imports ``optimizers``, ``normalization`` and ``transformer``
(``__all__`` in apex/__init__.py @25.07), so ``import apex.amp`` raises
``ModuleNotFoundError: No module named 'apex.amp'`` and ``apex.amp`` is an
AttributeError.

Why: the torchplug apex plugin must tell this case apart ("apex.amp was removed
upstream in 25.07; use native AMP"). The submodules here are empty stand-ins
registered in ``sys.modules`` so ``import apex.optimizers`` works without CUDA.
``transformer`` is included because real 25.07 exports it too.
"""

from __future__ import annotations

import sys
import types

__all__ = ["normalization", "optimizers", "transformer"]


def _stub(name: str) -> types.ModuleType:
    mod = types.ModuleType(f"{__name__}.{name}", f"Empty stand-in for apex.{name} (fake).")
    sys.modules[mod.__name__] = mod
    return mod


optimizers = _stub("optimizers")
normalization = _stub("normalization")
transformer = _stub("transformer")
