"""Callbacks: plugins for what users reach for every day, written on the public plugin API
(:mod:`torchplug.trainer_api`) that any third-party plugin gets.

Pass them as ``Trainer(callbacks=[...])`` (or ``plugins=``), or return them from
``TrainingModule.configure_callbacks()``:

* :class:`EarlyStopping`: stop when a monitored metric stops improving;
* :class:`ModelCheckpoint`: keep the best ``save_top_k`` checkpoints by a monitored metric;
* :class:`LearningRateMonitor`: log the learning rates.

Their state (patience counter, best score, top-k list) is saved in every checkpoint under
``checkpoint["callbacks"][<state key>]`` and restored when a fit resumes.
"""

from __future__ import annotations

from torchplug.callbacks.early_stopping import EarlyStopping
from torchplug.callbacks.lr_monitor import LearningRateMonitor
from torchplug.callbacks.model_checkpoint import ModelCheckpoint
from torchplug.plugin import Plugin as Callback

__all__ = ["Callback", "EarlyStopping", "LearningRateMonitor", "ModelCheckpoint"]
