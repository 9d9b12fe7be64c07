"""torchplug-compile: ``torch.compile`` of the training step as a torchplug model transform.

Selected by ``Trainer(plugins=["compile"])`` (entry point ``compile`` in ``torchplug.plugins``),
or passed as an object with ``torch.compile`` options::

    Trainer(devices=2, precision="bf16", plugins=[CompilePlugin(mode="max-autotune")])
"""

from __future__ import annotations

__version__ = "0.1.0"

from torchplug_compile.plugin import CompilePlugin

__all__ = ["CompilePlugin", "__version__"]
