"""Models, data, a probe plugin, a CPU-only ApexPlugin and a hand-written apex loop for the apex
plugin's tests.

Importable at module level, so that spawned DDP workers (which unpickle the Trainer, the model
and the probe) find everything here; they also need ``fake_apex/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchplug import Plugin, Trainer, TrainingModule
from torchplug_apex import ApexPlugin

HERE = Path(__file__).resolve().parent
#: The FAKE of NVIDIA apex 25.05 (see REAL_APEX_NOTES.md).
FAKE_APEX = HERE / "fake_apex"
VARIANTS = HERE / "fake_apex_variants"
IN, HIDDEN, OUT = 6, 12, 3
QUIET: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}


def drop_apex_modules() -> None:
    for name in [n for n in sys.modules if n == "apex" or n.startswith("apex.")]:
        del sys.modules[name]


def inject_inf_grad(out: torch.Tensor) -> None:
    """Make the gradient flowing into ``out`` inf while the loss stays finite (an fp16 overflow)."""
    out.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # type: ignore[no-untyped-call]


class Net(TrainingModule):
    """``Linear → [BatchNorm1d] → Tanh → Linear``, cross-entropy, SGD with momentum; seeded
    weights from its own generator. ``inject_at``: batch indices whose gradients become inf.
    ``sched``: ``"step"`` adds a StepLR(step_size=1, gamma=0.5) stepped every optimizer step."""

    def __init__(self, seed: int = 0, batchnorm: bool = False, inject_at: tuple[int, ...] = (),
                 sched: str | None = None, lr: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(IN, HIDDEN)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(HIDDEN))
        layers += [nn.Tanh(), nn.Linear(HIDDEN, OUT)]
        self.net = nn.Sequential(*layers)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        self.inject_at = tuple(inject_at)
        self.sched = sched
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)  # through forward: apex O2/O3 patch the top module's forward
        if batch_idx in self.inject_at:
            inject_inf_grad(out)
        loss = F.cross_entropy(out.float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.sched == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def loader(n: int = 32, batch_size: int = 4, seed: int = 0) -> DataLoader[Any]:
    """A DataLoader over the rule of :func:`batches` (the core shards it across ranks)."""
    data = batches(n, 1, seed)
    return DataLoader(TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])),
                      batch_size=batch_size, shuffle=False)


def batches(n: int = 6, batch_size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed batches of a learnable rule (a list: a loader with ``len``, never shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    rule = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(1234))
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, IN, generator=generator)
        out.append((x, (x @ rule).argmax(1)))
    return out


class CPUApexPlugin(ApexPlugin):
    """:class:`ApexPlugin` without its CUDA requirement, **for contract tests against the CPU fake
    of apex.amp only** (real apex amp fails on CPU tensors). Same ``plugin_name`` (``"apex"``),
    role and options; subclass it (not ApexPlugin) for a test's own ``configure_apex``."""

    _needs_cuda = False


def apex_trainer(**kwargs: Any) -> Trainer:
    """``Trainer(precision=16, amp_backend="apex", ...)``, quiet unless asked otherwise: the
    ``apex`` entry point's :class:`ApexPlugin`, which needs CUDA, unless ``plugins`` holds one."""
    kwargs = {**QUIET, "precision": 16, "amp_backend": "apex", "autoload_plugins": False, **kwargs}
    return Trainer(**kwargs)


def cpu_apex_trainer(**kwargs: Any) -> Trainer:
    """:func:`apex_trainer` with a :class:`CPUApexPlugin` (its ``amp_level`` the Trainer's) in
    ``plugins`` unless they hold an ApexPlugin already: runs on the CPU against the fake apex."""
    plugins = list(kwargs.pop("plugins", []))
    apex = [p for p in plugins if isinstance(p, ApexPlugin)]
    assert all(isinstance(p, CPUApexPlugin) for p in apex), f"on the CPU use CPUApexPlugin, not {apex}"
    return apex_trainer(plugins=plugins if apex else [CPUApexPlugin(), *plugins], **kwargs)


def hand_apex_loop(amp: Any, model: Net, level: str, data: list[Any], accumulate: int = 1,
                   clip: float = 0.0, **initialize_kwargs: Any) -> tuple[Net, torch.optim.Optimizer]:
    """The training loop apex 25.05's docs describe, written by hand: ``amp.initialize`` once,
    every micro-batch ``loss / N`` through ``amp.scale_loss``, step every N micro-batches,
    clipping ``amp.master_params`` (eps 1e-5) before the step."""
    opt = model.configure_optimizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # apex's own deprecation warning
        model, opt = amp.initialize(model, opt, opt_level=level, **initialize_kwargs)
    for i, (x, y) in enumerate(data):
        out = model(x)
        if i in model.inject_at:
            inject_inf_grad(out)
        loss = F.cross_entropy(out.float(), y)
        if accumulate > 1:
            loss = loss / accumulate
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        if (i + 1) % accumulate == 0:
            if clip > 0:
                hand_clip(list(amp.master_params(opt)), clip, 2.0)
            opt.step()
            opt.zero_grad()
    return model, opt


def hand_clip(params: list[torch.Tensor], max_norm: float, norm_type: float) -> float:
    """Clipping by hand in float64: ``coef = min(1, max_norm / (total + 1e-5))``; returns total."""
    grads = [p.grad for p in params if p.grad is not None]
    total = total_norm64(grads, norm_type)
    coef = min(1.0, max_norm / (total + 1e-5))
    for g in grads:
        g.copy_((g.double() * coef).to(g.dtype))
    return total


def weight0(model: nn.Module) -> torch.Tensor:
    """The first layer's weight (of ``Net`` and the GPU tests' model)."""
    weight = model.get_submodule("net.0").weight
    assert isinstance(weight, torch.Tensor)
    return weight


def grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


def total_norm64(grads: list[torch.Tensor], norm_type: float) -> float:
    """The total ``norm_type``-norm of ``grads``, computed in float64."""
    if math.isinf(norm_type):
        return max(float(g.double().abs().max()) for g in grads)
    return float(sum(float((g.double().abs() ** norm_type).sum()) for g in grads) ** (1.0 / norm_type))


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class Probe(Plugin):
    """Notes, in the process it runs in, what the fake apex had done when the core reached
    ``configure_ddp``, the loss scale at fit start, and parameters/scale after every batch.
    With ``folder``, each process appends a JSON line there (for spawned DDP workers)."""

    plugin_name = "apex_probe"

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self.at_configure_ddp: dict[str, Any] = {}
        self.scale_at_fit_start: float | None = None
        self.stepped_model: str | None = None
        self.after_batch: dict[int, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])  # type: ignore[misc]

    @staticmethod
    def _amp() -> Any:
        return sys.modules.get("apex.amp")

    def configure_ddp(self, model: nn.Module, device_ids: list[int] | None) -> None:
        amp = self._amp()
        calls = [name for name, _ in amp._fake_calls] if amp is not None else []
        self.at_configure_ddp = {
            "initialize_calls": calls.count("initialize"),
            "model_class": type(model).__name__,
            "opt_level": amp._amp_state.opt_properties.opt_level if amp is not None else None,
        }
        return  # let the strategy (or the default) wrap

    def on_before_forward(self, model: nn.Module) -> None:
        if self.stepped_model is None:  # the module the loop runs the step through
            self.stepped_model = type(model).__name__

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        amp = self._amp()
        if amp is not None:
            self.scale_at_fit_start = amp._amp_state.loss_scalers[0].loss_scale()

    def on_train_batch_end(self, trainer: Trainer, batch_idx: int) -> None:
        amp = self._amp()
        self.after_batch[batch_idx] = {
            "params": [p.detach().clone() for p in trainer.optimizers[0].param_groups[0]["params"]],
            "scale": amp._amp_state.loss_scalers[0].loss_scale() if amp is not None else None,
        }

    def on_fit_end(self, trainer: Trainer, model: nn.Module) -> None:
        if self.folder is None:
            return
        amp = self._amp()
        import torch.distributed as dist

        record = {
            "pid": os.getpid(),
            "rank": dist.get_rank() if dist.is_initialized() else None,
            "at_configure_ddp": self.at_configure_ddp,
            "stepped_model": self.stepped_model,
            "initialize_calls_total": [n for n, _ in amp._fake_calls].count("initialize"),
            "scale_loss_calls": [n for n, _ in amp._fake_calls].count("scale_loss"),
            "delay_unscale": [kw["delay_unscale"] for n, kw in amp._fake_calls if n == "scale_loss"],
            "params": [p.detach().flatten().tolist() for p in model.parameters()],
            "apex_file": amp.__file__,
            "global_step": trainer.global_step,
        }
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        with open(Path(self.folder) / f"probe-{os.getpid()}.json", "w", encoding="utf-8") as f:
            json.dump(record, f)
