"""Models, data and recording plugins shared by the native AMP tests (also imported by the
DDP worker processes, so it must stay importable without pytest fixtures)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchplug
from torchplug_native_amp import NativeAMPPlugin

QUIET: dict[str, Any] = {"enable_progress_bar": False, "logger": False, "enable_checkpointing": False}


def regression_data(n: int = 64, features: int = 8, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, 1, generator=gen)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


def loader(batch_size: int = 8, n: int = 64, seed: int = 0) -> DataLoader[Any]:
    return DataLoader(regression_data(n, seed=seed), batch_size=batch_size, shuffle=False)


class MLP(torchplug.TrainingModule):
    """A small regression MLP. ``inf_at``: micro-batches (counted from 0 in this process) whose
    gradients become infinite: a backward hook on the output multiplies its gradient by inf, so
    the loss itself stays finite, as with a real fp16 gradient overflow."""

    def __init__(self, lr: float = 0.05, scheduler: bool = False, two_optimizers: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 1)
        self.lr = lr
        self.scheduler = scheduler
        self.two_optimizers = two_optimizers
        self.micro_batches = 0
        self.inf_at: set[int] = set()
        self.seen: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.relu(self.hidden(x)))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        hidden = self.hidden(x)
        out = self.out(torch.relu(hidden))
        self.seen.append({
            "hidden_dtype": hidden.dtype,
            "out_dtype": out.dtype,
            "matmul_dtype": (x @ self.hidden.weight.t()).dtype,
            "autocast": torch.is_autocast_enabled(x.device.type),
        })
        if self.micro_batches in self.inf_at:
            out.register_hook(lambda g: g * math.inf)
        self.micro_batches += 1
        loss = nn.functional.mse_loss(out.float(), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.seen.append({"val_dtype": out.dtype})
        self.log("val_loss", nn.functional.mse_loss(out.float(), y))

    def configure_optimizers(self) -> Any:
        if self.two_optimizers:
            return [torch.optim.SGD(self.hidden.parameters(), lr=self.lr),
                    torch.optim.SGD(self.out.parameters(), lr=self.lr)]
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class StepRecorder(torchplug.Plugin):
    """Records, per optimizer step, the parameters before and after it and the loss scale after
    it; also the scale at fit start and the classes of the modules that ran training steps."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.scales: list[float | None] = []
        self.trainer: Any = None
        self.module: nn.Module | None = None
        self.scale_at_start: float | None = None
        self.step_modules: set[str] = set()  # class names of the modules that ran training steps

    def on_fit_start(self, trainer: Any, model: nn.Module) -> None:
        self.trainer, self.module = trainer, model
        scaler = trainer.plugin_for("precision").scaler
        self.scale_at_start = None if scaler is None else scaler.get_scale()

    def on_before_forward(self, model: nn.Module) -> None:
        self.step_modules.add(type(model).__name__)

    def on_before_optimizer_step(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is trainer.optimizers[0]:
            assert self.module is not None
            self.before.append(flat_params(self.module))

    def on_train_batch_end(self, trainer: Any) -> None:
        if len(self.before) > len(self.after):  # an optimizer step ended this micro-batch
            assert self.module is not None
            self.after.append(flat_params(self.module))
            scaler = trainer.plugin_for("precision").scaler
            self.scales.append(None if scaler is None else scaler.get_scale())


class RecordingAMP(NativeAMPPlugin):
    """The real plugin, recording what the core asked of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backward_in_autocast: list[bool] = []
        self.step_results: list[bool] = []
        self.clip_norms: list[torch.Tensor] = []
        self.grad_norm_after_clip: list[torch.Tensor] = []

    def backward(self, loss: torch.Tensor) -> bool:
        self.backward_in_autocast.append(torch.is_autocast_enabled(loss.device.type))
        return super().backward(loss)

    def clip_gradients(self, grad_clip_val: float, optimizer: torch.optim.Optimizer,
                       norm_type: float) -> torch.Tensor:
        norm = super().clip_gradients(grad_clip_val, optimizer, norm_type)
        self.clip_norms.append(norm.detach().clone())
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        after = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.tensor(0.0)
        self.grad_norm_after_clip.append(after)
        return norm

    def optimizer_step(self, optimizers: list[torch.optim.Optimizer]) -> bool:
        stepped = super().optimizer_step(optimizers)
        self.step_results.append(stepped)
        return stepped


# --- two-process DDP runs (tests/test_native_amp_ddp.py) -----------------------------------------
class InlineDDP(torchplug.Plugin):
    """A minimal DDP strategy over an already initialised gloo group, so the AMP-under-DDP
    behaviour is tested even without torchplug-ddp: torch DDP around TrainingStepModule, and
    ``no_sync`` entered by the core for all micro-batches but a window's last."""

    role = "strategy"
    plugin_name = "inline_ddp"

    def world_size(self) -> int:
        return int(torch.distributed.get_world_size())

    def global_rank(self) -> int:
        return int(torch.distributed.get_rank())

    def configure_ddp(self, model: nn.Module, device_ids: list[int] | None) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(torchplug.TrainingStepModule(model), device_ids=device_ids)

    def block_backward_sync(self, model: nn.Module) -> Any:
        return model.no_sync()  # type: ignore[operator]

    def get_model_from_plugin(self, model: nn.Module) -> nn.Module:
        step_module: Any = model.module
        return step_module.module  # type: ignore[no-any-return]

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor / torch.distributed.get_world_size() if op == "mean" else tensor

    def barrier(self, name: str) -> None:
        torch.distributed.barrier()

    def broadcast(self, obj: Any, src: int) -> Any:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src)
        return box[0]


#: micro-batches (per rank, counted from 0) whose gradients rank 1 makes infinite: 2 is the first
#: micro-batch of window 1 (inside no_sync), 7 the last of window 3 (the all-reducing one).
DDP_INF_MICRO_BATCHES = {2, 7}


def ddp_worker(rank: int, world_size: int, store_path: str, out_dir: str, strategy: str) -> None:
    import json
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        if strategy == "inline":
            strategy_plugin: object = InlineDDP()
        else:
            import torchplug_ddp

            strategy_plugin = torchplug_ddp.DDPPlugin()
        model = MLP()
        if rank == 1:
            model.inf_at = set(DDP_INF_MICRO_BATCHES)
        amp = RecordingAMP(16, init_scale=1024.0)
        rec = StepRecorder()
        trainer = torchplug.Trainer(plugins=[strategy_plugin, amp, rec], max_steps=5, accumulate_grad_batches=2,
                                    log_every_n_steps=1, **QUIET)
        trainer.fit(model, loader(batch_size=4, n=64))
        result = {
            "world_size": trainer.world_size,
            "steps": amp.step_results,
            "scales": rec.scales,
            "unchanged": [bool(torch.equal(b, a)) for b, a in zip(rec.before, rec.after)],
            "params": flat_params(model).tolist(),
            "skipped_steps": trainer.callback_metrics.get("skipped_steps"),
            "micro_batches": model.micro_batches,
            "step_modules": sorted(rec.step_modules),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
