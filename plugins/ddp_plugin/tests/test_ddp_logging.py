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


@pytest.mark.timeout(120)
def test_trainer_test_on_two_ranks_averages_the_metrics_over_both(tmp_path: Path) -> None:
    from ddp_test_support import RankTester
    from torch.nn import functional as F

    torch.manual_seed(1)
    data = TensorDataset(torch.randn(32, 8), torch.randn(32, 1))  # 16 samples a rank, batch 4: 4 batches
    model = RankTester()
    trainer = Trainer(devices=2, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                      autoload_plugins=False)
    [metrics] = trainer.test(model, DataLoader(data, batch_size=4), verbose=False)
    assert metrics["rank_value"] == 3.75  # the mean of rank 0's 2.5 and rank 1's 5.0
    # By hand: each rank's shard (DistributedSampler without shuffling: every other sample), the
    # mean of its batch losses, then the mean over the ranks.
    with torch.no_grad():
        rank_means = []
        for rank in range(2):
            x, y = data.tensors[0][rank::2], data.tensors[1][rank::2]
            losses = [F.mse_loss(model.net(x[i:i + 4]), y[i:i + 4]) for i in range(0, 16, 4)]
            rank_means.append(torch.stack(losses).mean())
    assert metrics["test_loss"] == pytest.approx(float(torch.stack(rank_means).mean()), rel=1e-6)
