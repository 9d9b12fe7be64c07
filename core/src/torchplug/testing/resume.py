"""Exact-resume scenarios: one uninterrupted run writes checkpoints at every kind of point, and
a run resumed from each must end bit-identical to it, calling each epoch-end event once.

Importable (spawned ``devices=2`` workers unpickle these), deterministic and tiny: 56 samples
in batches of 8 (7 batches an epoch), a shuffling train loader and a shuffling validation
loader (both draw from the global RNG), dropout, SGD with momentum, and per variant:

* ``"shuffle"``: no scheduler, ``accumulate_grad_batches=1``;
* ``"steplr"``: a step-interval ``StepLR`` and an epoch-interval ``StepLR``;
* ``"accumulate3"``: ``accumulate_grad_batches=3`` (windows of 3, 3 and a short 1).

:class:`ResumeProbe` records the epoch-end events (with their epoch) and writes, with
``trainer.save_checkpoint`` on every rank, ``step.ckpt`` (after an optimizer step of the second
epoch), ``window.ckpt`` (inside an accumulation window), ``epoch_end.ckpt`` (from
``on_train_epoch_end``) and ``validation_end.ckpt`` (from ``on_validation_end``) of the first
epoch; or sends itself SIGTERM after a step (``sigterm_step``), leaving ``last.ckpt``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchplug.module import TrainingModule
from torchplug.plugin import Plugin

VARIANTS = ("shuffle", "steplr", "accumulate3")
#: the checkpoints one reference run writes (``window`` only with accumulation)
POINTS = ("step", "window", "epoch_end", "validation_end")
MAX_EPOCHS = 3
#: the optimizer step after which ``step.ckpt`` is written and SIGTERM is sent (second epoch)
STEP_AT = {"shuffle": 10, "steplr": 10, "accumulate3": 4}
#: the same on 2 ranks (4 batches a rank and epoch: 4 steps, or windows of 3 and 1)
STEP_AT_2_RANKS = {"shuffle": 6, "steplr": 6, "accumulate3": 3}


class ResumeNet(TrainingModule):
    """``Linear → ReLU → Dropout → Linear``; the variant picks the schedulers."""

    def __init__(self, variant: str = "shuffle", seed: int = 0) -> None:
        super().__init__()
        self.variant = variant
        generator = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 4))
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        # a random draw in validation: resume must restore the RNG where validation starts
        noise = 0.01 * torch.randn_like(x)
        self.log("val_loss", nn.functional.cross_entropy(self(x + noise), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if self.variant != "steplr":
            return opt
        return [opt], [
            {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.8), "interval": "step"},
            {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), "interval": "epoch"},
        ]


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, (x @ torch.randn(8, 4, generator=generator)).argmax(1))


def loaders(distributed: bool = False) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The train loader (7 batches an epoch in one process; 4 per rank of 2, shuffled by a
    ``DistributedSampler``) and a shuffling validation loader. Call it in the process that
    trains (``DistributedSampler`` reads the process group)."""
    train, val = dataset(56, 0), dataset(24, 1)
    if distributed:
        sampler: DistributedSampler[Any] = DistributedSampler(train, shuffle=True, seed=3)
        return DataLoader(train, batch_size=8, sampler=sampler), DataLoader(val, batch_size=8, shuffle=True)
    return DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8, shuffle=True)


class ResumeProbe(Plugin):
    """Records ``(event, epoch)`` of the epoch-end events and writes the scenario's checkpoints.

    :param folder: where the checkpoints go; ``None`` writes none (a resumed run).
    :param step_at: the optimizer step after which ``step.ckpt`` is written (or SIGTERM sent).
    :param sigterm: send SIGTERM to this process after ``step_at`` instead of writing checkpoints.
    """

    plugin_name = "resume_probe"

    def __init__(self, folder: str | os.PathLike[str] | None = None, step_at: int = 0, sigterm: bool = False) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.step_at = step_at
        self.sigterm = sigterm
        self.events: list[tuple[str, int]] = []
        self._saved: set[str] = set()

    def _save(self, trainer: Any, name: str) -> None:
        if self.folder is None or self.sigterm or name in self._saved:
            return
        self._saved.add(name)
        self.events.append((f"saved {name}", trainer.current_epoch))
        trainer.save_checkpoint(self.folder / f"{name}.ckpt")  # every rank: collect_state first

    def on_train_batch_end(self, trainer: Any, batch_idx: int) -> None:
        accumulate = trainer.arguments.get("accumulate_grad_batches", 1)
        if trainer.current_epoch == 1 and accumulate > 1 and batch_idx == 1:
            self._save(trainer, "window")  # inside the epoch's first window
        if trainer.global_step == self.step_at and "step" not in self._saved:
            if self.sigterm:
                self._saved.add("step")
                os.kill(os.getpid(), signal.SIGTERM)  # the stop takes effect at the end of this step
            else:
                self._save(trainer, "step")

    def on_train_epoch_end(self, trainer: Any, epoch: int) -> None:
        self.events.append(("on_train_epoch_end", epoch))
        if epoch == 0:
            self._save(trainer, "epoch_end")

    def on_epoch_end(self, trainer: Any) -> None:
        self.events.append(("on_epoch_end", trainer.current_epoch))

    def on_validation_start(self, trainer: Any) -> None:
        self.events.append(("on_validation_start", trainer.current_epoch))

    def on_validation_end(self, trainer: Any) -> None:
        self.events.append(("on_validation_end", trainer.current_epoch))
        if trainer.current_epoch == 0:
            self._save(trainer, "validation_end")

    def events_after(self, name: str) -> list[tuple[str, int]]:
        """The events a run resumed from checkpoint ``name`` must call: those after its writing."""
        index = self.events.index((f"saved {name}", self._epoch_of(name)))
        return [event for event in self.events[index + 1:] if not event[0].startswith("saved ")]

    def _epoch_of(self, name: str) -> int:
        return next(epoch for event, epoch in self.events if event == f"saved {name}")


def optimizer_tensors(optimizer: Any, model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per parameter of ``model``, the state tensors this process's optimizer holds for it (a
    ZeRO ``ZeroRedundancyOptimizer``: its local shard's optimizer, empty for the others' parameters)."""
    local = getattr(optimizer, "optim", optimizer)
    return [{k: v.clone() for k, v in local.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
            for p in model.parameters()]


def final_state(model: nn.Module, trainer: Any) -> dict[str, Any]:
    """What a resumed run must reproduce exactly: weights, optimizer and scheduler states, counters."""
    optimizer = trainer.optimizers[0]
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer_tensors(optimizer, model),
        "lr": optimizer.param_groups[0]["lr"],
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
    }


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two :func:`final_state` results, in words (empty: bit-identical)."""
    found = []
    for key in ("lr", "schedulers", "global_step", "epoch"):
        if a[key] != b[key]:
            found.append(f"{key}: {a[key]} != {b[key]}")
    for name, tensor in a["weights"].items():
        if not torch.equal(tensor, b["weights"][name]):
            found.append(f"weight {name} differs by {(tensor - b['weights'][name]).abs().max().item():.3g}")
    for index, (x, y) in enumerate(zip(a["optimizer"], b["optimizer"])):
        if x.keys() != y.keys():
            found.append(f"optimizer state of parameter {index}: {sorted(x)} != {sorted(y)}")
        for key in x.keys() & y.keys():
            if not torch.equal(x[key], y[key]):
                found.append(f"optimizer {key} of parameter {index} differs by {(x[key] - y[key]).abs().max():.3g}")
    return found


__all__ = [
    "MAX_EPOCHS",
    "POINTS",
    "STEP_AT",
    "STEP_AT_2_RANKS",
    "VARIANTS",
    "ResumeNet",
    "ResumeProbe",
    "differences",
    "final_state",
    "loaders",
    "optimizer_tensors",
]
