"""A tiny model and data set for plugin tests: fast, deterministic and picklable.

Defined at module level in an importable module, so spawned worker processes (``devices=2``,
``torch.multiprocessing`` with ``spawn``) can unpickle them. Weights and data come from their
own ``torch.Generator``: they do not depend on, or disturb, the global RNG.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchplug.module import TrainingModule

IN_FEATURES = 8
CLASSES = 3


class TinyMLP(TrainingModule):
    """``Linear(8, 16) → ReLU → Linear(16, 3)``, cross-entropy, SGD with momentum.

    Logs ``train_loss`` in ``training_step`` and ``val_loss`` in ``validation_step``.
    """

    def __init__(self, seed: int = 0, hidden: int = 16, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x).float(), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def tiny_dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    """``n`` random inputs with labels from a fixed linear rule (learnable, deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=generator)
    rule = torch.randn(IN_FEATURES, CLASSES, generator=torch.Generator().manual_seed(1234))
    return TensorDataset(x, (x @ rule).argmax(dim=1))


def tiny_loader(n: int = 64, batch_size: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader[Any]:
    """A DataLoader over :func:`tiny_dataset`; shuffling (if asked) uses its own seeded generator."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(tiny_dataset(n, seed), batch_size=batch_size, shuffle=shuffle, generator=generator)


def parameters_vector(module: nn.Module) -> torch.Tensor:
    """All parameters as one flat float64 CPU vector (to compare trained weights)."""
    return torch.cat([p.detach().to("cpu", torch.float64).flatten() for p in module.parameters()])
