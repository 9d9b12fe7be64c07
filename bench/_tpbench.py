"""torchplug parts of the bench scripts, at module level so a Trainer can pickle them into the
worker processes it starts (the ddp plugin's ``devices=N`` launch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from _harness import LR, MOMENTUM, stamp
from torch import nn

import torchplug


class BenchModule(torchplug.TrainingModule):
    """The hand loops' model, loss and optimizer as a TrainingModule."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class FirstStepStamp(torchplug.Plugin):
    """Appends ``first_step <time.monotonic()>`` to ``path`` when global rank 0 ends its first
    optimizer step (``on_train_batch_end`` of batch 0 with no accumulation)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: Any, batch_idx: int) -> None:
        if batch_idx == 0 and trainer.is_global_zero:
            stamp(self.path, "first_step")



class LoggingBenchModule(BenchModule):
    """BenchModule that logs its loss each step (what EarlyStopping/ModelCheckpoint monitor)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss
