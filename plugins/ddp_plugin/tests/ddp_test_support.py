"""Models, data and recording plugins for the DDP tests.

Everything here is importable at module level, so spawned workers (which unpickle the
Trainer, the model and these plugins) and torchrun workers can find it.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from torchplug import Trainer, TrainingModule, TrainingStepModule
from torchplug_ddp import DDPPlugin

IN, HIDDEN, OUT = 8, 16, 1


class Regressor(TrainingModule):
    """A small MLP; logs its loss and its rank (to tell whose metrics the parent got)."""

    def __init__(self, lr: float = 0.1, die_on_rank: int | None = None, die_at_step: int = 3,
                 raise_on_rank: int | None = None, death_note: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
        self.lr = lr
        self.die_on_rank = die_on_rank
        self.die_at_step = die_at_step
        self.raise_on_rank = raise_on_rank
        self.death_note = death_note  # where the dying rank writes the time it died
        self.steps_seen = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.die_on_rank == rank and batch_idx == self.die_at_step:
            if self.death_note:
                Path(self.death_note).write_text(repr(time.time()))
            os._exit(3)  # a hard death: no exception, no cleanup
        if self.raise_on_rank == rank and batch_idx == 1:
            raise ValueError(f"boom on rank {rank}")
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("loss", loss)
        self.log("rank", float(rank))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Sleeper(Regressor):
    """Notes its pid in ``out_dir`` at its first step, then trains slowly."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        note = Path(self.out_dir) / f"pid-rank{dist.get_rank()}"
        if not note.exists():
            note.write_text(str(os.getpid()))
        time.sleep(0.2)
        return super().training_step(batch, batch_idx)


def dataset(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, IN, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(batch_size: int, n: int = 64) -> DataLoader[Any]:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=False)


def quiet(**kwargs: Any) -> dict[str, Any]:
    """Trainer arguments for tests: CPU, no progress bar, no files unless asked for."""
    base: dict[str, Any] = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                            "enable_checkpointing": False, "max_epochs": 1, "autoload_plugins": False}
    base.update(kwargs)
    return base


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- plugins that record what happened in each process ------------------------------------------


class Recorder(DDPPlugin):
    """A DDPPlugin that writes, per rank, what it saw into ``out_dir/<tag>-rank<r>.json``."""

    def __init__(self, out_dir: str, tag: str = "run", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.tag = tag
        self.seen: dict[str, Any] = {}

    def on_after_setup_optimizers(self, trainer: Trainer) -> None:
        self.seen["after_setup_optimizers"] = {
            "pid": os.getpid(), "rank": trainer.global_rank, "world": trainer.world_size,
            "optimizers": len(trainer.optimizers),
            "backend": dist.get_backend() if dist.is_initialized() else None,
        }

    def on_fit_end(self, trainer: Trainer, model: nn.Module) -> None:
        # The collectives the loop may use, called through the hooks on every rank.
        hooks, rank = trainer.hooks, trainer.global_rank
        trainer.hooks.barrier(name="fit end")
        self.seen["collectives"] = {
            "reduce_sum": float(hooks.reduce(tensor=torch.tensor(rank + 1.0), op="sum")),
            "reduce_mean": float(hooks.reduce(tensor=torch.tensor(rank + 1.0), op="mean")),
            "broadcast": hooks.broadcast(obj={"from": rank}, src=0),
            "broadcast_none": hooks.broadcast(obj=None if rank == 0 else "own", src=0),
            "group": hooks.data_parallel_group() is not None,
        }
        # The run's internals (this test plugin inspects them on purpose; shipped plugins may not).
        run = trainer._run
        assert run is not None
        assert run.loop is not None
        assert run.outputs is not None
        loop, outputs = run.loop, run.outputs
        sampler = getattr(loop.batches.loader, "sampler", None)
        self.seen.update({
            "pid": os.getpid(), "rank": trainer.global_rank, "world": trainer.world_size,
            "is_global_zero": trainer.is_global_zero, "launched_copy": trainer.launched_copy,
            "log_dir": str(outputs.log_dir) if outputs.log_dir else None, "csv": outputs.csv is not None,
            "progress_enabled": outputs.progress.enabled,
            "sampler": type(sampler).__name__, "sampler_epoch": getattr(sampler, "epoch", None),
            "model_wrapped": type(loop.model).__name__, "children": len(multiprocessing.active_children()),
            "metrics": dict(trainer.callback_metrics),
            "device": str(next(model.parameters()).device),
        })
        self._dump(trainer.global_rank)
        self.wrapper = weakref.ref(loop.model)  # is it still alive after fit? (test_ddp_plugin.py)

    def _dump(self, rank: int) -> None:
        path = Path(self.out_dir) / f"{self.tag}-rank{rank}.json"
        path.write_text(json.dumps(self.seen))


class _Counter:
    def __init__(self) -> None:
        self.calls = 0


def counting_allreduce(counter, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations
    """DDP communication hook: count every gradient all-reduce, then do the standard one."""
    counter.calls += 1
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


class CountingDDPWrapper(DistributedDataParallel):
    """DESIGN.md's ``MyDDPWrapper``: a user's own DDP class."""


class CountingDDP(Recorder):
    """DESIGN.md's ``MyDDP``: overrides configure_ddp; counts all-reduces per micro-batch."""

    def configure_ddp(self, model: nn.Module, device_ids: list[int] | None) -> nn.Module:
        wrapper = CountingDDPWrapper(TrainingStepModule(model), device_ids=device_ids)
        self._counter = _Counter()
        wrapper.register_comm_hook(self._counter, counting_allreduce)
        self.seen["allreduces_per_batch"] = []
        return wrapper

    def on_train_batch_end(self, batch_idx: int) -> None:
        per_batch = self.seen["allreduces_per_batch"]
        per_batch.append(self._counter.calls - sum(per_batch))


class Lightning11DDP(CountingDDP):
    """Lightning 1.1's DDPPlugin: the context manager yields ``no_sync()`` without entering it (there,
    the bug: every micro-batch synchronised; torchplug enters the yielded one)."""

    @contextmanager
    def _not_entered(self, model: nn.Module) -> Iterator[Any]:
        yield model.no_sync()  # type: ignore[operator]

    def block_backward_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        return self._not_entered(model)


# -- a process group initialised by the caller (Ray Train, test fixtures) -----------------------


def preinitialised_worker(rank: int, world: int, store_path: str, out_dir: str, accelerator: str = "cpu") -> None:
    """Runs in a process the test started: init the group itself, then fit twice in-process."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        for tag, plugin_cls in (("accumulate", CountingDDP), ("lightning11", Lightning11DDP)):
            model = Regressor()
            plugin = plugin_cls(out_dir, tag=tag)
            trainer = Trainer(**quiet(plugins=[plugin], accumulate_grad_batches=4, accelerator=accelerator))
            trainer.fit(model, loader(batch_size=4))
            if rank == 0:
                torch.save(state(model), os.path.join(out_dir, f"{tag}-weights.pt"))
            # The DDP wrapper (it holds the process group) must not outlive the fit, though
            # the trainer does: see FitRun._release_wrapper.
            Path(out_dir, f"{tag}-wrapper-alive-rank{rank}").write_text(str(plugin.wrapper() is not None))
        # The plugin must leave a group it did not create alone.
        Path(out_dir, f"still-initialised-rank{rank}").write_text(str(dist.is_initialized()))
    finally:
        dist.destroy_process_group()


class RankLogger(Regressor):
    """Logs ``(rank + 1) * (batch_idx + 1)`` per step: its epoch mean is 2.5 on rank 0 and 5.0 on
    rank 1 with 4 batches a rank, so the mean over both ranks is 3.75."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rank = dist.get_rank() if dist.is_initialized() else 0
        value = torch.tensor(float((rank + 1) * (batch_idx + 1)))
        self.log("synced", value, on_step=False, on_epoch=True, sync_dist=True)
        self.log("local", value, on_step=False, on_epoch=True)
        self.log("synced_sum", value, on_epoch=True, on_step=False, reduce_fx="sum", sync_dist=True)
        return super().training_step(batch, batch_idx)


class RankTester(Regressor):
    """``test_step`` logs ``(rank + 1) * (batch_idx + 1)`` and the batch's loss: with 4 batches a
    rank the first averages 2.5 on rank 0 and 5.0 on rank 1 (3.75 over both)."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        x, y = batch
        self.log("rank_value", torch.tensor(float((rank + 1) * (batch_idx + 1))))
        self.log("test_loss", F.mse_loss(self.net(x), y))
