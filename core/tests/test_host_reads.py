"""The loop reads nothing from the device per step (HostReads, torchplug.testing.syncs).

On an accelerator each ``.item()``/``float()``/``.cpu()`` per step makes the host wait for the
device and costs the overlap a hand-written loop keeps. The CPU run takes the accelerator's
path (the non-finite loss check queued on the device, torchplug.testing.syncs.accelerator_path) and counts the
reads at the Python level (reads_per_step: a run of 24 steps against one of 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from torchplug import Trainer
from torchplug.testing.models import TinyMLP, tiny_dataset
from torchplug.testing.syncs import accelerator_path, reads_per_step


class Scheduled(TinyMLP):
    """TinyMLP with a per-step LR scheduler."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("options", [
    {},
    {"accumulate_grad_batches": 3, "gradient_clip_val": 0.5},
    {"gradient_clip_val": 1.0, "gradient_clip_norm_type": float("inf")},
], ids=["plain", "accumulate+clip", "clip-inf-norm"])
def test_no_host_read_per_step_on_the_accelerator_path(tmp_path: Path, options: dict[str, Any]) -> None:
    def run(steps: int) -> None:
        # The defaults a user gets: CSV logger, checkpoints, progress bar (drawn from cached floats).
        trainer = Trainer(max_steps=steps, log_every_n_steps=1000, default_root_dir=tmp_path / str(steps),
                          autoload_plugins=False, **options)
        trainer.fit(Scheduled(), DataLoader(tiny_dataset(8 * 80), batch_size=8))
        assert trainer.global_step == steps

    with accelerator_path():
        per_step, reads = reads_per_step(run, (8, 24))
    assert per_step == 0, reads.report()
    # What remains is per fit: one read of the queued loss checks, one of the logged metrics.
    assert reads.total <= 6, reads.report()


def test_logging_reads_once_per_interval_whatever_the_number_of_metrics(tmp_path: Path) -> None:
    class ManyMetrics(TinyMLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            for i in range(5):
                self.log(f"m{i}", loss * i)
            return loss

    def run(steps: int) -> None:
        Trainer(max_steps=steps, log_every_n_steps=4, default_root_dir=tmp_path / str(steps),
                autoload_plugins=False).fit(ManyMetrics(), DataLoader(tiny_dataset(8 * 80), batch_size=8))

    with accelerator_path():
        per_step, reads = reads_per_step(run, (8, 24))
    # 16 more steps = 4 more logging intervals; each reads the six metrics and the queued loss
    # checks in two transfers (.cpu() then .tolist() of one stacked tensor, each).
    assert per_step * 16 == 4 * 2 * 2, reads.report()


def test_validation_reads_once_per_run_not_per_batch(tmp_path: Path) -> None:
    def run(batches: int) -> None:
        Trainer(autoload_plugins=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                default_root_dir=tmp_path).validate(TinyMLP(), DataLoader(tiny_dataset(8 * batches), batch_size=8))

    per_batch, reads = reads_per_step(run, (8, 24))
    assert per_batch == 0, reads.report()


def test_on_the_cpu_the_loss_is_checked_at_each_micro_batch(tmp_path: Path) -> None:
    """Where reading costs nothing (the CPU) the check is immediate: a NaN stops the run at once."""
    def run(steps: int) -> None:
        Trainer(max_steps=steps, accumulate_grad_batches=2, log_every_n_steps=1000, autoload_plugins=False,
                default_root_dir=tmp_path / str(steps)).fit(TinyMLP(), DataLoader(tiny_dataset(8 * 80), batch_size=8))

    per_step, reads = reads_per_step(run, (8, 24))
    assert per_step == 2, reads.report()  # one loss.item() per micro-batch
