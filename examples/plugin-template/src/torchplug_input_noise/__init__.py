"""torchplug-input-noise: Gaussian noise on training inputs, as a torchplug plugin.

Select it by name once installed (``Trainer(plugins=["input_noise"])`` or
``TORCHPLUG_PLUGINS=input_noise``), or pass ``InputNoisePlugin(std=0.05)`` to set options.
"""

from __future__ import annotations

from torchplug_input_noise.plugin import STD_ENV, InputNoisePlugin

__version__ = "0.1.0"

__all__ = ["STD_ENV", "InputNoisePlugin", "__version__"]
