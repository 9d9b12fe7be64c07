"""The evaluation epoch shared by validation, test and predict: the module in eval mode, no
gradients, the stage's hooks around every batch, the step under the precision plugin's
``forward_context``::

    on_<stage>_start → on_<stage>_epoch_start
    → per loader, per batch: on_<stage>_batch_start → on_before_forward → forward_context
      → <stage>_step → on_<stage>_batch_end
    → <stage>_epoch_end(outputs) (validation, test) / on_predict_epoch_end(outputs)
    → on_<stage>_epoch_end (validation, test)

What follows (the metrics reduced over processes, ``on_<stage>_end``) is the caller's: the fit
loop's validation, :mod:`torchplug.evalrun`'s test and predict runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchplug.metrics import to_floats
from torchplug.module import MetricStore
from torchplug.state import Position

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


@dataclass(frozen=True)
class Stage:
    """One evaluation loop's names."""

    #: ``"validation"``, ``"test"`` or ``"predict"`` (the hooks' infix, ``Position.phase``)
    name: str
    #: the module method each batch runs
    step: str
    #: the all-outputs hook after the last batch
    epoch_end: str
    #: whether the batch hooks take ``dataloader_idx`` (validation's predate several loaders)
    loader_index: bool
    #: whether the stage logs metrics (predict returns what the steps return instead)
    logs: bool


VALIDATION = Stage("validation", "validation_step", "validation_epoch_end", loader_index=False, logs=True)
TEST = Stage("test", "test_step", "test_epoch_end", loader_index=True, logs=True)
PREDICT = Stage("predict", "predict_step", "on_predict_epoch_end", loader_index=True, logs=False)


@dataclass
class EpochResult:
    """What an evaluation epoch produced, before any reduction over processes."""

    #: per loader: every step's result, in batch order (only when kept)
    outputs: list[list[Any]]
    #: per loader: the metrics logged in its steps (epoch means, still tensors)
    loader_metrics: list[dict[str, torch.Tensor | float]]
    #: the metrics logged in the epoch-end hooks, which belong to every loader (Lightning's rule)
    epoch_metrics: dict[str, torch.Tensor | float]


def run_epoch(trainer: Trainer, module: nn.Module, loaders: Sequence[Any], stage: Stage, limit: int | None,
              position: Position, metrics: MetricStore, keep_outputs: bool,
              between_batches: Callable[[], None] | None = None) -> EpochResult:
    """One evaluation epoch over ``loaders`` (the loop in the module docstring). ``limit``
    caps the batches of each loader; ``between_batches`` runs after each (a stop request)."""
    hooks = trainer.hooks
    step = getattr(module, stage.step)
    batch_start = getattr(hooks, f"on_{stage.name}_batch_start")
    batch_end = getattr(hooks, f"on_{stage.name}_batch_end")
    several = len(loaders) > 1
    was_training = module.training
    module.eval()
    if stage.logs:
        metrics.begin_validation()
    phase = position.phase
    position.phase, position.batch = stage.name, 0
    result = EpochResult(outputs=[], loader_metrics=[], epoch_metrics={})
    try:
        getattr(hooks, f"on_{stage.name}_start")(trainer=trainer)
        getattr(hooks, f"on_{stage.name}_epoch_start")(trainer=trainer)
        with torch.no_grad():
            for loader_idx, loader in enumerate(loaders):
                index = {"dataloader_idx": loader_idx} if stage.loader_index else {}
                kept: list[Any] = []
                for batch_idx, batch in enumerate(loader):
                    if limit is not None and batch_idx >= limit:
                        break
                    position.batch = batch_idx
                    batch_start(trainer=trainer, batch=batch, batch_idx=batch_idx, **index)
                    # Lightning passes dataloader_idx to the step only when there are several loaders.
                    args = hooks.on_before_forward(model=module, args=(batch, batch_idx, *(
                        (loader_idx,) if several else ())))
                    with hooks.forward_context(model=module):
                        output = step(*args)
                    batch_end(trainer=trainer, outputs=output, batch=args[0], batch_idx=batch_idx, **index)
                    if keep_outputs:
                        kept.append(output)
                    if between_batches is not None:
                        between_batches()
                result.outputs.append(kept)
                if stage.logs:  # this loader's metrics; the store starts afresh for the next
                    result.loader_metrics.append(metrics.end_validation())
                    metrics.begin_validation()
            if keep_outputs:
                outputs = result.outputs if several else result.outputs[0]
                getattr(hooks, stage.epoch_end)(trainer=trainer, outputs=outputs)
            if stage.name != "predict":
                getattr(hooks, f"on_{stage.name}_epoch_end")(trainer=trainer)
    finally:
        if stage.logs:
            result.epoch_metrics = metrics.end_validation()
        module.train(was_training)
    position.phase = phase  # not after an error: the run's note says where it happened
    return result


def reduced(trainer: Trainer, device: torch.device, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Each metric averaged over the processes (the strategy's ``reduce``), as floats: one host
    transfer for all of them."""
    hooks = trainer.hooks
    return to_floats({name: hooks.reduce(tensor=torch.as_tensor(value, dtype=torch.float32, device=device),
                                         op="mean") for name, value in values.items()})


def per_loader(result: EpochResult) -> list[dict[str, torch.Tensor | float]]:
    """Each loader's metrics, Lightning's way: with several loaders the names end in
    ``/dataloader_idx_N``; what the epoch-end hooks logged is in every loader's."""
    several = len(result.loader_metrics) > 1
    return [{**{(f"{k}/dataloader_idx_{i}" if several else k): v for k, v in values.items()},
             **result.epoch_metrics} for i, values in enumerate(result.loader_metrics)]


__all__ = ["PREDICT", "TEST", "VALIDATION", "EpochResult", "Stage", "per_loader", "reduced", "run_epoch"]
