"""On an accelerator the non-finite loss check is queued on the device (no host sync per step)
and read at the logging interval and before checkpoints. The CPU takes the same path here under
torchplug.testing.syncs.accelerator_path, so the bookkeeping is tested without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchplug import NonFiniteLossError, Trainer, TrainingModule
from torchplug.testing.syncs import accelerator_path


class NaNAtStep(TrainingModule):
    def __init__(self, bad_batch: int) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.bad_batch = bad_batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss * float("nan") if batch_idx == self.bad_batch else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 4, generator=gen), torch.randint(0, 2, (64,), generator=gen)),
                      batch_size=4)


def test_deferred_check_names_the_first_bad_step_and_writes_no_checkpoint(tmp_path: Path) -> None:
    with accelerator_path():
        trainer = Trainer(max_epochs=1, log_every_n_steps=8, default_root_dir=tmp_path, enable_progress_bar=False,
                          autoload_plugins=False)
        with pytest.raises(NonFiniteLossError, match=r"batch 5 \(global step 5.*detected at global step 8"):
            trainer.fit(NaNAtStep(bad_batch=5), loader())
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint was written after a non-finite loss"


def test_deferred_check_passes_clean_runs(tmp_path: Path) -> None:
    with accelerator_path():
        trainer = Trainer(max_epochs=1, log_every_n_steps=8, default_root_dir=tmp_path, enable_progress_bar=False,
                          autoload_plugins=False)
        trainer.fit(NaNAtStep(bad_batch=-1), loader())
    assert trainer.global_step == 16
