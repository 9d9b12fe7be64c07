"""Lightning's names for torchplug's classes: ``import torchplug.lightning as pl`` in place of
``import pytorch_lightning as pl``. Aliases only, no behaviour of their own: ``pl.LightningModule``
is :class:`torchplug.TrainingModule`, ``pl.Trainer`` is :class:`torchplug.Trainer`, and so on.
``pl.callbacks`` (also ``from torchplug.lightning.callbacks import ModelCheckpoint``) is
:mod:`torchplug.callbacks`. Where torchplug differs from Lightning: README, "Coming from Lightning".
"""

from __future__ import annotations

import sys

from torchplug import callbacks
from torchplug.callbacks import Callback
from torchplug.datamodule import DataModule as LightningDataModule
from torchplug.module import TrainingModule as LightningModule
from torchplug.seed import seed_everything
from torchplug.trainer import Trainer

# `from torchplug.lightning.callbacks import EarlyStopping`, as from pytorch_lightning.callbacks
sys.modules[f"{__name__}.callbacks"] = callbacks

__all__ = ["Callback", "LightningDataModule", "LightningModule", "Trainer", "callbacks", "seed_everything"]
