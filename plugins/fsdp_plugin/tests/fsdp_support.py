"""A plugin that counts gradient collectives per micro-batch in every rank (importable by spawned workers).

Counting method: FSDP2 issues its gradient reduce-scatter from Python through
``torch.distributed.reduce_scatter_single`` (torch 2.13; ``reduce_scatter_tensor`` in older
releases), looked up on the module at call time, so wrapping those functions in the
``torch.distributed`` namespace for the fit counts every one. ``all_reduce`` is counted too
(DDP-style gradient sync, or a strategy that all-reduces gradients itself).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torchplug import Plugin, hookimpl

COUNTED = ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")


class CollectiveCounter(Plugin):
    plugin_name = "collective_counter"

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.per_batch: list[dict[str, Any]] = []
        self.saved: dict[str, Any] = {}
        self.seen: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.out_dir = state["out_dir"]
        self._reset()

    def on_fit_start(self, trainer: Any, model: nn.Module) -> None:
        for name in COUNTED:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self.saved[name] = original

            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.count += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        params = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
        self.seen = {"transforms": trainer.model_transforms, "world": trainer.world_size,
                     "optimizer_params_are_dtensors": all(isinstance(p, DTensor) for p in params),
                     "optimizer_holds_model_params": {id(p) for p in params} == {id(p) for p in model.parameters()}}

    def on_train_batch_end(self, trainer: Any, batch_idx: int) -> None:
        window_end = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        self.per_batch.append({"batch_idx": batch_idx, "window_end": window_end, "collectives": self.count})
        self.count = 0

    def on_fit_end(self, trainer: Any) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)
        self.seen["per_batch"] = self.per_batch
        path = Path(self.out_dir) / f"counts-rank{trainer.global_rank}-{os.getpid()}.json"
        path.write_text(json.dumps(self.seen))


class ClipProbe(Plugin):
    """Records, per window, what ``clip_gradients`` answered and the clipped full gradients
    (gathered on every rank: ``full_tensor`` is a collective, called in the same order everywhere)."""

    plugin_name = "clip_probe"

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.windows: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["out_dir"])  # type: ignore[misc]

    @hookimpl(wrapper=True)
    def clip_gradients(self) -> Any:
        norm = yield
        self.windows.append({"norm": float(norm)})
        return norm

    def on_before_zero_grad(self, trainer: Any) -> None:
        grads = {}
        for name, p in trainer.lightning_module.named_parameters():
            g = p.grad
            grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).flatten().tolist()
        self.windows[-1]["grads"] = grads

    def on_fit_end(self, trainer: Any) -> None:
        Path(self.out_dir, f"clip-rank{trainer.global_rank}-{os.getpid()}.json").write_text(json.dumps(self.windows))
