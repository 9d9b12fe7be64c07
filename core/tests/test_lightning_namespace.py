"""``torchplug.lightning``: Lightning's names are aliases of torchplug's own classes."""

from __future__ import annotations

import torchplug
import torchplug.callbacks
import torchplug.lightning as pl


def test_the_names_are_the_real_classes() -> None:
    assert pl.LightningModule is torchplug.TrainingModule
    assert pl.LightningDataModule is torchplug.DataModule
    assert pl.Trainer is torchplug.Trainer
    assert pl.Callback is torchplug.Plugin
    assert pl.seed_everything is torchplug.seed_everything
    assert pl.callbacks is torchplug.callbacks
    assert pl.callbacks.EarlyStopping is torchplug.callbacks.EarlyStopping
    from torchplug.lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    assert ModelCheckpoint is torchplug.callbacks.ModelCheckpoint
    assert LearningRateMonitor is torchplug.callbacks.LearningRateMonitor
