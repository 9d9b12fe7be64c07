"""``self.log(..., sync_dist=True)`` under 2 real gloo ranks: epoch values reduced over both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_test_support import RankLogger
from torch.utils.data import DataLoader, TensorDataset

from torchplug import Trainer


@pytest.mark.timeout(120)
def test_epoch_means_with_sync_dist_are_the_mean_over_both_ranks(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(32, 8), torch.randn(32, 1))  # 16 samples a rank, batch 4: 4 batches
    trainer = Trainer(devices=2, accelerator="cpu", max_epochs=1, default_root_dir=tmp_path,
                      enable_progress_bar=False, autoload_plugins=False)
    trainer.fit(RankLogger(), DataLoader(data, batch_size=4))
    metrics = trainer.callback_metrics  # rank 0's
    assert metrics["local"] == 2.5  # rank 0 alone: mean of 1, 2, 3, 4
    assert metrics["synced"] == 3.75  # the mean of rank 0's 2.5 and rank 1's 5.0
    assert metrics["synced_sum"] == 30.0  # (1+2+3+4) + (2+4+6+8)
