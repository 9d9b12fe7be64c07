"""torchplug-apex: mixed precision for torchplug with NVIDIA apex amp (O0-O3).

``Trainer(precision=16, amp_backend="apex", amp_level="O2")`` selects :class:`ApexPlugin`
through the ``apex`` entry point; pass ``ApexPlugin(...)`` (or a subclass overriding
``configure_apex``) in ``plugins=`` to choose it directly.

NVIDIA apex is **not** a dependency and is not on PyPI (PyPI's ``apex`` is an unrelated 2013
Pyramid toolkit): build apex 25.05 or earlier from source. apex removed amp in 25.07 and
deprecates it in favour of PyTorch's native AMP (torchplug-native-amp).
"""

from __future__ import annotations

from torchplug_apex._detect import HOW_TO_GET_APEX, ApexUnavailableError, load_amp
from torchplug_apex.plugin import (
    CHECKPOINT_KEY,
    CLIP_EPS,
    ApexAmpDeprecationWarning,
    ApexPlugin,
)

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINT_KEY",
    "CLIP_EPS",
    "HOW_TO_GET_APEX",
    "ApexAmpDeprecationWarning",
    "ApexPlugin",
    "ApexUnavailableError",
    "__version__",
    "load_amp",
]
