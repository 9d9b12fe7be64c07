"""``torchplug demo``: an MLP on real data, trained from the command line.

``torchplug demo`` trains :class:`DigitsClassifier`, an MLP on scikit-learn's bundled 8x8
digits (1,797 images, no download), on the CPU in seconds to >= 95% validation accuracy, with
any plugins, devices and precision (the options and outputs it shares with ``torchplug fit``
are in :mod:`torchplug.fitcmd`).

The demo needs the ``demo`` extra (scikit-learn, matplotlib): ``pip install "torchplug[demo]"``.
:class:`DigitsClassifier` lives at module level so that it pickles into spawned DDP workers.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchplug.fitcmd import DEMO_EXTRA, DemoDependencyError, one_thread_unless_set, require, run_command, sayer
from torchplug.fitcmd import train as train_model
from torchplug.module import TrainingModule


def load_digits_split(seed: int = 0, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits, split once (stratified, fixed ``seed``) and standardised with
    the training split's statistics."""
    datasets = require("sklearn.datasets", "torchplug demo")
    model_selection = require("sklearn.model_selection", "torchplug demo")
    digits = datasets.load_digits()
    x_train, x_val, y_train, y_val = model_selection.train_test_split(
        digits.data, digits.target, test_size=val_fraction, random_state=seed, stratify=digits.target
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # the always-blank corner pixels

    def tensors(x: Any, y: Any) -> TensorDataset:
        return TensorDataset(torch.tensor((x - mean) / std, dtype=torch.float32), torch.tensor(y, dtype=torch.long))

    return tensors(x_train, y_train), tensors(x_val, y_val)


class DigitsClassifier(TrainingModule):
    """MLP 64-128-64-10 with dropout, Adam; logs ``train_loss``, ``val_loss`` and ``val_acc``."""

    def __init__(self, hidden: int = 128, lr: float = 3e-3, batch_size: int = 64, data_seed: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, 10),
        )
        self.lr = lr
        self.batch_size = batch_size
        self.data_seed = data_seed
        self._data: tuple[TensorDataset, TensorDataset] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def datasets(self) -> tuple[TensorDataset, TensorDataset]:
        if self._data is None:
            self._data = load_digits_split(self.data_seed)
        return self._data

    def train_dataloader(self) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.data_seed)
        return DataLoader(self.datasets()[0], batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader[Any]:
        val = self.datasets()[1]
        return DataLoader(val, batch_size=len(val))  # one batch: the logged val_acc is exact

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits.float(), y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def accuracy(self) -> float:
        """Accuracy on the whole validation split, in this process."""
        x, y = self.datasets()[1].tensors
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            return float((self(x.to(device)).argmax(dim=1).cpu() == y).float().mean())
        finally:
            self.train(was_training)


def run_demo(args: argparse.Namespace) -> int:
    return run_command("demo", _demo, args)


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    require("sklearn", "torchplug demo")
    require("matplotlib", "torchplug demo")
    from torchplug.seed import seed_everything

    one_thread_unless_set()
    seed_everything(args.seed)
    model = DigitsClassifier(hidden=args.hidden, data_seed=args.seed)
    train, val = model.datasets()
    say = sayer(args)
    say(f"torchplug demo: MLP 64-{args.hidden}-{args.hidden // 2}-10 on scikit-learn digits "
        f"({len(train)} train / {len(val)} validation images)")
    summary = train_model(model, args, say)
    summary["val_acc"] = model.accuracy()
    say(f"validation accuracy {summary['val_acc']:.4f} after {summary['global_step']} steps, "
        f"{summary['seconds']:.1f} s")
    return summary


__all__ = ["DEMO_EXTRA", "DemoDependencyError", "DigitsClassifier", "load_digits_split", "run_demo"]
