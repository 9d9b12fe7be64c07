"""What a ``Trainer(devices=2).fit`` hands back to the launching process besides the weights: the
rank-0 state of the plugin objects passed in ``plugins=``/``callbacks=`` (``state_dict`` →
``load_state_dict``, torchplug.handback), and, composed with ZeRO-1, an EMA plugin's average
(swapped in at ``on_fit_end``, before the core gathers the final weights) in a complete,
loadable checkpoint. One spawned ``ddp_zero`` fit serves every check.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import torchplug
from torchplug import Trainer
from torchplug import checkpoint as ckpt
from torchplug.callbacks import EarlyStopping, ModelCheckpoint
from torchplug.testing.ema import KEY, EMAWeights
from torchplug.testing.models import TinyMLP, tiny_loader


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    return Trainer(accelerator="cpu", enable_progress_bar=False, logger=False, autoload_plugins=False,
                   default_root_dir=str(root), **kwargs)


@pytest.fixture(scope="module")
def zero_fit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("handback")
    model = TinyMLP()
    ema, best, stop = EMAWeights(decay=0.8), ModelCheckpoint(monitor="val_loss"), EarlyStopping("val_loss", patience=9)
    trainer = _trainer(root, devices=2, strategy="ddp_zero", max_epochs=3, plugins=[ema], callbacks=[best, stop])
    trainer.fit(model, tiny_loader(n=64, shuffle=True), tiny_loader(n=32, seed=1))
    return {"model": model, "trainer": trainer, "ema": ema, "best": best, "stop": stop, "root": root}


@pytest.mark.timeout(240)
def test_the_launching_process_gets_the_plugins_rank_zero_state(zero_fit: dict[str, Any]) -> None:
    best, stop, ema = zero_fit["best"], zero_fit["stop"], zero_fit["ema"]
    assert best.best_model_path
    assert Path(best.best_model_path).is_file()
    assert best.best_model_score is not None
    assert math.isclose(best.best_model_score, stop.best_score)  # both saw rank 0's reduced val_loss
    assert set(ema.average) == {name for name, _ in zero_fit["model"].named_parameters()}


@pytest.mark.timeout(240)
def test_ema_with_zero_hands_back_the_average_and_checkpoints_it_whole(zero_fit: dict[str, Any]) -> None:
    model, ema, trainer = zero_fit["model"], zero_fit["ema"], zero_fit["trainer"]
    for name, param in model.named_parameters():  # the weights handed back are the average ...
        assert torch.equal(param.detach(), ema.average[name])
    saved = ckpt.load(trainer.checkpoint_path)
    assert any(not torch.equal(saved["state_dict"][name], ema.average[name]) for name in ema.average)  # ... not these
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {name: tuple(t.shape) for name, t in saved[KEY]["average"].items()} == shapes
    # loadable: a one-process fit resumes from it with the average restored, and trains it on
    resumed_ema, resumed = RestoredEMA(), TinyMLP(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchplug.PlanChangedWarning)  # 2 ZeRO ranks -> 1 process
        _trainer(zero_fit["root"] / "resumed", max_epochs=4, plugins=[resumed_ema]).fit(
            resumed, tiny_loader(n=64, shuffle=True), ckpt_path=trainer.checkpoint_path)
    for name, param in resumed.named_parameters():
        assert torch.equal(resumed_ema.at_start[name], saved[KEY]["average"][name])
        assert torch.equal(param.detach(), resumed_ema.average[name])


class RestoredEMA(EMAWeights):
    """Notes the average it starts training with."""

    def on_train_start(self, trainer: Any) -> None:
        super().on_train_start(trainer)
        self.at_start = {name: value.clone() for name, value in self.average.items()}
