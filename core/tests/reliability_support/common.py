"""A tiny model, data and file helpers shared by test_reliability.py and its subprocess scripts
(kept free of pytest so a script or a spawned DDP worker can import it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import torchplug

IN, OUT = 8, 4


class TinyNet(torchplug.TrainingModule):
    """``Linear(8, 4)``, cross-entropy, SGD; fixed initial weights; optional sleep per step."""

    def __init__(self, sleep: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(IN, OUT)
        with torch.no_grad():
            for p in self.lin.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.sleep = sleep

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.sleep:
            import time

            time.sleep(self.sleep)
        x, y = batch
        loss = nn.functional.cross_entropy(self.lin(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Samples(Dataset[tuple[torch.Tensor, int]]):
    """``n`` fixed samples; the samples of batch ``bad_batch`` get ``IN + 1`` features, which
    the model rejects (a shape error inside ``training_step``)."""

    def __init__(self, n: int = 32, batch_size: int = 8, bad_batch: int | None = None) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, IN + 1, generator=gen)
        self.y = torch.randint(0, OUT, (n,), generator=gen)
        self.bad = range(bad_batch * batch_size, (bad_batch + 1) * batch_size) if bad_batch is not None else range(0)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.x[i] if i in self.bad else self.x[i, :IN]), int(self.y[i])


def loader(n: int = 32, batch_size: int = 8, bad_batch: int | None = None) -> DataLoader[Any]:
    """Unshuffled: 32 samples, 4 optimizer steps per epoch."""
    return DataLoader(Samples(n, batch_size, bad_batch), batch_size=batch_size)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_files_under(*roots: Path | str) -> list[str]:
    """Paths under ``roots`` that this process holds open (Linux /proc; [] where unknown)."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return []
    found = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
        if any(target.startswith(str(Path(root).resolve())) or target == str(root) for root in roots):
            found.append(target)
    return sorted(found)


def fds_of(name: str) -> list[int]:
    """This process's file descriptors whose path ends with ``name`` (Linux /proc)."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
                fds.append(int(fd))
        except OSError:
            continue
    return fds
