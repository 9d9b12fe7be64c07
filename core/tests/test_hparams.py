"""``save_hyperparameters``, ``self.hparams``, ``checkpoint["hyper_parameters"]`` and
``TrainingModule.load_from_checkpoint`` (torchplug.hparams)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchplug
from torchplug import checkpoint as ckpt


class Sized(torchplug.TrainingModule):
    def __init__(self, hidden: int, lr: float = 0.1, activation: str = "relu", **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU() if activation == "relu" else nn.Tanh(),
                                 nn.Linear(hidden, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class NoHparams(torchplug.TrainingModule):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lin = nn.Linear(8, hidden)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_init_arguments_are_captured_and_reachable_as_attributes_and_keys() -> None:
    model = Sized(12, activation="tanh", note="x")
    assert model.hparams == {"hidden": 12, "lr": 0.1, "activation": "tanh", "note": "x"}
    assert model.hparams.hidden == model.hparams["hidden"] == 12
    with pytest.raises(AttributeError, match="no hyperparameter 'missing'"):
        _ = model.hparams.missing


def test_named_ignored_dict_and_lightning_1_1_assignment() -> None:
    class Picky(torchplug.TrainingModule):
        def __init__(self, a: int, b: int, module: nn.Module | None = None) -> None:
            super().__init__()
            self.save_hyperparameters("a")

    class Ignoring(Picky):
        def __init__(self, a: int, b: int, module: nn.Module | None = None) -> None:
            torchplug.TrainingModule.__init__(self)
            self.save_hyperparameters(ignore=["module"])

    class Assigned(torchplug.TrainingModule):
        def __init__(self, hparams: argparse.Namespace) -> None:
            super().__init__()
            self.hparams = hparams  # Lightning 1.1

    assert Picky(1, 2).hparams == {"a": 1}
    assert Ignoring(1, 2, nn.Linear(1, 1)).hparams == {"a": 1, "b": 2}
    assert Assigned(argparse.Namespace(lr=0.5, layers=3)).hparams == {"lr": 0.5, "layers": 3}

    class Unsafe(torchplug.TrainingModule):
        def __init__(self, a: int, module: nn.Module) -> None:
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(torchplug.MisconfigurationError, match=r"module=Linear.*ignore=\['module'\]"):
        Unsafe(1, nn.Linear(1, 1))
    with pytest.raises(torchplug.MisconfigurationError, match="call it in __init__"):
        Assigned(argparse.Namespace()).save_hyperparameters()


def test_hparams_are_stored_in_checkpoints_and_rebuild_the_module(make_trainer: Any, tp: Any,
                                                                  tmp_path: Path) -> None:
    model = Sized(12, lr=0.05)
    trainer = make_trainer(max_epochs=1, logger=False)
    trainer.fit(model, tp.loader(n=16))
    saved = ckpt.load(trainer.checkpoint_path)  # weights_only=True: plain values only
    assert saved["hyper_parameters"] == {"hidden": 12, "lr": 0.05, "activation": "relu"}
    loaded = Sized.load_from_checkpoint(trainer.checkpoint_path)
    assert loaded.hparams == model.hparams
    assert tp.params_equal(loaded, model)
    with torch.no_grad():
        x = torch.randn(3, 8)
        assert torch.equal(loaded.net(x), model.net(x))
    other = Sized.load_from_checkpoint(trainer.checkpoint_path, lr=0.3)
    assert other.hparams.lr == 0.3
    with pytest.raises(torchplug.CheckpointError, match="does not match Sized"):
        Sized.load_from_checkpoint(trainer.checkpoint_path, hidden=5)


def test_load_from_checkpoint_without_stored_arguments_says_what_to_do(make_trainer: Any, tp: Any) -> None:
    trainer = make_trainer(max_epochs=1, logger=False)
    trainer.fit(NoHparams(6), tp.loader(n=16))
    assert "hyper_parameters" not in ckpt.load(trainer.checkpoint_path)
    with pytest.raises(torchplug.MisconfigurationError,
                       match=r"needs hidden, but checkpoint .* stores no hyperparameters.*save_hyperparameters"):
        NoHparams.load_from_checkpoint(trainer.checkpoint_path)
    assert NoHparams.load_from_checkpoint(trainer.checkpoint_path, hidden=6).lin.out_features == 6
    with pytest.raises(torchplug.MisconfigurationError, match="takes no width, which were passed"):
        NoHparams.load_from_checkpoint(trainer.checkpoint_path, hidden=6, width=3)
