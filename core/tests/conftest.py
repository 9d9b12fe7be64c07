"""Shared pieces of the core's tests: a clean plugin environment, one thread, small models.

Every test runs without ``TORCHPLUG_PLUGINS``/``TORCHPLUG_BLOCK_PLUGINS``/``TORCHPLUG_TRACE``
from the caller's shell. Trainer tests pass ``autoload_plugins=False`` (the ``make_trainer``
fixture does), so an autoload plugin installed in the environment cannot change a run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchplug

# Small models on 2 cores: one thread is fastest, and parity needs the same thread count for
# both sides of a comparison anyway.
torch.set_num_threads(1)

IN, HIDDEN, OUT = 8, 16, 4


@pytest.fixture(autouse=True)
def _clean_torchplug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCHPLUG_PLUGINS", "TORCHPLUG_BLOCK_PLUGINS", "TORCHPLUG_TRACE"):
        monkeypatch.delenv(name, raising=False)


class Net(torchplug.TrainingModule):
    """``Linear → ReLU → Dropout → Linear``, cross-entropy, SGD with momentum. Dropout makes
    the global RNG matter (resume must restore it). ``sched`` picks LR schedulers."""

    def __init__(self, dropout: float = 0.2, lr: float = 0.1, sched: str | None = None,
                 dict_loss: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Dropout(dropout), nn.Linear(HIDDEN, OUT))
        self.lr = lr
        self.sched = sched
        self.dict_loss = dict_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss, "n": len(y)} if self.dict_loss else loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return make_optimizers(self, self.lr, self.sched)


def make_optimizers(model: nn.Module, lr: float, sched: str | None) -> Any:
    """The optimizer (and schedulers) both the Trainer and the hand-written loops use."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if sched is None:
        return opt
    if sched == "step":
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7), "interval": "step"}}
    if sched == "both":
        return [opt], [
            {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7), "interval": "step"},
            torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5),  # interval "epoch"
        ]
    raise ValueError(sched)


def dataset(n: int = 56, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    rule = torch.randn(IN, OUT, generator=g)
    return TensorDataset(x, (x @ rule).argmax(1))


def loader(n: int = 56, batch_size: int = 8, shuffle: bool = True, seed: int = 0, **kwargs: Any) -> DataLoader[Any]:
    return DataLoader(dataset(n, seed), batch_size=batch_size, shuffle=shuffle, **kwargs)


def fresh_net(**kwargs: Any) -> Net:
    """A Net with fixed initial weights (seed 0), whatever the global RNG."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    net = Net(**kwargs)
    torch.set_rng_state(state)
    return net


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def clone(model: nn.Module) -> Any:
    return copy.deepcopy(model)


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., torchplug.Trainer]:
    """``make_trainer(**kwargs)``: a Trainer writing under ``tmp_path``, without progress bar
    or autoloaded plugins unless asked."""

    def make(**kwargs: Any) -> torchplug.Trainer:
        kwargs.setdefault("default_root_dir", tmp_path)
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("autoload_plugins", False)
        return torchplug.Trainer(**kwargs)

    return make


def files_under(root: Path) -> list[str]:
    """Every file and folder below ``root``, relative, sorted (for "no partial files" checks)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def tp() -> Any:
    """The helpers above as one namespace (test modules do not import conftest: several test
    folders each have one, and they share a pytest session)."""
    import types

    return types.SimpleNamespace(
        Net=Net, make_optimizers=make_optimizers, dataset=dataset, loader=loader, fresh_net=fresh_net,
        params_equal=params_equal, clone=clone, files_under=files_under, IN=IN, OUT=OUT,
    )
