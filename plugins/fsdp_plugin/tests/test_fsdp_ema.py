"""An EMA plugin (torchplug.testing.ema.EMAWeights, public API only) composed with FSDP2 on 2 gloo
ranks: each rank averages its own shard; the checkpoint holds the full average (gathered in
``collect_state`` on every rank) and loads in one process; the weights handed back to the
launching process are the average (swapped in at ``on_fit_end``, before the core gathers the
final weights), and the launching process's plugin object holds rank 0's full average.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torchplug_fsdp import FSDPPlugin

import torchplug
from torchplug import Trainer
from torchplug import checkpoint as ckpt
from torchplug.testing.ema import KEY, EMAWeights
from torchplug.testing.models import TinyMLP, tiny_loader


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    return Trainer(accelerator="cpu", enable_progress_bar=False, logger=False, autoload_plugins=False,
                   default_root_dir=str(root), **kwargs)


@pytest.fixture(scope="module")
def fsdp_ema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fsdp-ema")
    model, ema = TinyMLP(), EMAWeights(decay=0.8)
    trainer = _trainer(root, devices=2, max_epochs=2, plugins=[FSDPPlugin(timeout=60), ema])
    trainer.fit(model, tiny_loader(n=64, shuffle=True))
    return {"model": model, "ema": ema, "trainer": trainer, "root": root}


@pytest.mark.timeout(240)
def test_fsdp_hands_back_the_ema_weights(fsdp_ema: dict[str, Any]) -> None:
    model, ema = fsdp_ema["model"], fsdp_ema["ema"]
    assert not torch.equal(model.net[0].weight.detach(), TinyMLP().net[0].weight.detach())  # trained
    for name, param in model.named_parameters():
        assert tuple(ema.average[name].shape) == tuple(param.shape)  # rank 0's full average, not its shard
        assert torch.equal(param.detach(), ema.average[name])


@pytest.mark.timeout(240)
def test_fsdp_ema_checkpoint_is_complete_and_loads_in_one_process(fsdp_ema: dict[str, Any]) -> None:
    model, trainer = fsdp_ema["model"], fsdp_ema["trainer"]
    saved = ckpt.load(trainer.checkpoint_path)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {name: tuple(t.shape) for name, t in saved[KEY]["average"].items()} == shapes
    assert {name: tuple(t.shape) for name, t in saved["state_dict"].items()} == shapes
    resumed_ema, resumed = EMAWeights(), TinyMLP(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchplug.PlanChangedWarning)  # 2 FSDP ranks -> 1 process
        _trainer(fsdp_ema["root"] / "resumed", max_epochs=3, plugins=[resumed_ema]).fit(
            resumed, tiny_loader(n=64, shuffle=True), ckpt_path=trainer.checkpoint_path)
    for name, param in resumed.named_parameters():  # trained on from the restored average, swapped in at the end
        assert torch.equal(param.detach(), resumed_ema.average[name])
