"""torchplug-tensorboard: a TensorBoard logger for torchplug, written with
``torch.utils.tensorboard``.

``Trainer(plugins=["tensorboard"])`` selects it through the ``tensorboard`` entry point; pass
``TensorBoardLogger(...)`` in ``plugins=`` or ``callbacks=`` to set its options.
"""

from __future__ import annotations

from torchplug_tensorboard.logger import TensorBoardLogger

__version__ = "0.1.0"

__all__ = ["TensorBoardLogger", "__version__"]
