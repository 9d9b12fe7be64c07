"""torchplug-ddp: torch DistributedDataParallel for torchplug (gloo on CPU, nccl on CUDA).

Selected by ``Trainer(accelerator="ddp")``, ``strategy="ddp"``, ``devices>1`` or
``num_nodes>1`` (entry point ``ddp`` in ``torchplug.plugins``), or passed as an object::

    Trainer(devices=2, plugins=[DDPPlugin(timeout=60, find_unused_parameters=True)])
    Trainer(strategy="ddp_zero", devices=2)   # ZeRO-1: DDPPlugin(zero_redundancy=True)
"""

from __future__ import annotations

__version__ = "0.1.0"

from torchplug_ddp._spawn import WorkerFailedError
from torchplug_ddp.plugin import DDPPlugin, DDPZeroPlugin

__all__ = ["DDPPlugin", "DDPZeroPlugin", "WorkerFailedError", "__version__"]
