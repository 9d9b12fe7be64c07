"""A shard where a full tensor belongs is refused with what is wrong, not as "corrupt": a plugin
storing its DTensor in a checkpoint (rank 0 alone would write its shard), a file holding one,
and weights that are a shard of the model's (their first dimension cut)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import torchplug
from torchplug import checkpoint as ckpt
from torchplug.errors import CheckpointError


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[Any]:
    """A one-rank gloo group and its CPU device mesh (DTensors need one)."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _dtensor(mesh: Any) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])


class StoresItsShard(torchplug.Plugin):
    def __init__(self, value: Any) -> None:
        self.value = value

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["naive_ema"] = {"average": {"w": self.value}}


def test_a_plugin_storing_a_dtensor_is_refused_before_the_write(tp: Any, make_trainer: Any, one_rank_group: Any,
                                                               tmp_path: Path) -> None:
    trainer = make_trainer(max_epochs=1, logger=False, plugins=[StoresItsShard(_dtensor(one_rank_group))])
    with pytest.raises(CheckpointError, match=r"checkpoint\['naive_ema'\]\['average'\]\['w'\] is a DTensor, "
                                              r"this rank's shard") as info:
        trainer.fit(tp.fresh_net(), tp.loader(n=16))
    assert "collect_state" in str(info.value)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing written


def test_a_file_holding_a_dtensor_is_incomplete_not_corrupt(tp: Any, make_trainer: Any, one_rank_group: Any,
                                                            tmp_path: Path) -> None:
    trainer = make_trainer(max_epochs=1, logger=False)
    trainer.fit(tp.fresh_net(), tp.loader(n=16))
    data = ckpt.load(trainer.checkpoint_path)
    data["naive_ema"] = {"w": _dtensor(one_rank_group)}
    torch.save(data, tmp_path / "sharded.ckpt")  # written by code that bypasses the trainer's check
    with pytest.raises(CheckpointError, match=r"intact but incomplete: checkpoint\['naive_ema'\]\['w'\] is a DTensor"):
        ckpt.load(tmp_path / "sharded.ckpt")


def test_weights_cut_along_their_first_dimension_are_named_a_shard(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    trainer = make_trainer(max_epochs=1, logger=False)
    trainer.fit(tp.fresh_net(), tp.loader(n=16))
    data = ckpt.load(trainer.checkpoint_path)
    name = "net.0.weight"
    data["state_dict"][name] = data["state_dict"][name][: data["state_dict"][name].shape[0] // 2].clone()
    ckpt.save(data, tmp_path / "half.ckpt")
    shard = r"net\.0\.weight: checkpoint \(8, 8\) vs model \(16, 8\) \(a shard of it"
    with pytest.raises(CheckpointError, match=shard):
        make_trainer(max_epochs=2, logger=False).fit(tp.fresh_net(), tp.loader(n=16), ckpt_path=tmp_path / "half.ckpt")
