"""torchplug-native-amp: mixed precision for torchplug with ``torch.autocast`` and
``torch.amp.GradScaler``, on CPU and CUDA.

``Trainer(precision=16)`` or ``Trainer(precision="bf16")`` selects it through the
``native_amp`` entry point; pass ``NativeAMPPlugin(...)`` in ``plugins=`` to set its options.
"""

from __future__ import annotations

from torchplug_native_amp.plugin import NativeAMPPlugin

__version__ = "0.1.0"

__all__ = ["NativeAMPPlugin", "__version__"]
