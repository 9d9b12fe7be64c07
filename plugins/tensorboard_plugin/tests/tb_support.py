"""What the tests share, importable by spawned workers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import torchplug
from torchplug.testing.models import TinyMLP

#: val_loss per epoch: best at epoch 2, then no improvement
SCHEDULE = (1.0, 0.8, 0.5, 0.6, 0.55, 0.7, 0.9, 0.95, 1.0, 1.1)


class Scripted(TinyMLP):
    """Trains like TinyMLP; logs a scripted val_loss per epoch (one validation batch per rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams = {"lr": self.lr, "hidden": 16, "schedule": "scripted"}
        self.calls = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", SCHEDULE[self.calls])
        self.calls += 1


class RankReport(torchplug.Plugin):
    """Writes where each rank stopped to ``out/rank<N>.json``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer: Any) -> None:
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "epoch": trainer.current_epoch, "step": trainer.global_step, "should_stop": trainer.should_stop,
            "pid": os.getpid()}))


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder``, read back with tensorboard's own reader."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
