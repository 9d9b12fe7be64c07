"""torchplug-fsdp: FSDP2 (``torch.distributed.fsdp.fully_shard``) for torchplug.

Selected by ``Trainer(strategy="fsdp")`` (entry point ``fsdp`` in ``torchplug.plugins``), or
passed as an object::

    Trainer(devices=2, plugins=[FSDPPlugin(wrap=(TransformerBlock,))])
"""

from __future__ import annotations

__version__ = "0.1.0"

from torchplug_fsdp.plugin import FSDPPlugin

__all__ = ["FSDPPlugin", "__version__"]
