"""The core's built-in behaviour, registered like any plugin but ``trylast``.

One process, the model's own device, fp32, ``clip_grad_norm_``, ``nullcontext``: every
firstresult hook has an answer here, so the training loop never checks for a missing plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from torchplug.errors import CheckpointError
from torchplug.hookspecs import hookimpl
from torchplug.utils import first_parameter, move_to_device, optimizer_params

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


@hookimpl(trylast=True)
def launch(function: Callable[[], Any]) -> Any:
    return function()


@hookimpl(trylast=True)
def world_size() -> int:
    return 1


@hookimpl(trylast=True)
def global_rank() -> int:
    return 0


@hookimpl(trylast=True)
def root_device(trainer: Trainer, model: nn.Module) -> torch.device:
    if trainer.accelerator is not None:
        return torch.device(trainer.accelerator)
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@hookimpl(trylast=True)
def setup_optimizers(optimizers: list[Optimizer]) -> list[Optimizer]:
    return optimizers


@hookimpl(trylast=True)
def connect_precision(model: nn.Module, optimizers: list[Optimizer]) -> tuple[nn.Module, list[Optimizer]]:
    return model, optimizers


@hookimpl(trylast=True)
def configure_ddp(model: nn.Module) -> nn.Module:
    return model


@hookimpl(trylast=True)
def get_model_from_plugin(model: nn.Module) -> nn.Module:
    return model


@hookimpl(trylast=True)
def on_before_forward(model: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    param = first_parameter(model)  # next(model.parameters()) costs ~8 us per step
    return args if param is None else move_to_device(args, param.device)


#: one null context for every step (nullcontext is stateless and reusable)
NO_CONTEXT: AbstractContextManager[None] = nullcontext()


@hookimpl(trylast=True)
def block_backward_sync() -> AbstractContextManager[None]:
    return NO_CONTEXT


@hookimpl(trylast=True)
def forward_context() -> AbstractContextManager[None]:
    return NO_CONTEXT


@hookimpl(trylast=True)
def backward(loss: torch.Tensor) -> bool:
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
    return True


@hookimpl(trylast=True)
def clip_gradients(grad_clip_val: float, optimizer: Optimizer, norm_type: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), grad_clip_val, norm_type)


@hookimpl(trylast=True)
def optimizer_step(optimizers: list[Optimizer]) -> bool:
    for optimizer in optimizers:
        optimizer.step()
    return True


@hookimpl(trylast=True)
def get_state_dicts(model: nn.Module, optimizers: list[Optimizer]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return model.state_dict(), [optimizer.state_dict() for optimizer in optimizers]


@hookimpl(trylast=True)
def load_state_dicts(model: nn.Module, optimizers: list[Optimizer], state_dict: dict[str, Any],
                     optimizer_states: list[dict[str, Any]]) -> bool:
    model.load_state_dict(state_dict)
    for optimizer, state in zip(optimizers, optimizer_states):
        optimizer.load_state_dict(state)
    return True


@hookimpl(trylast=True)
def load_sharded_state(folder: str, reference: dict[str, Any]) -> bool:
    # Trainer.fit refuses such a resume before any work when no plugin implements the hook;
    # this answers a plugin that implements it and defers.
    raise CheckpointError(
        f"The checkpoint's model and optimizer state is sharded in {folder} "
        f"({reference.get('format', 'unknown format')}, written by {reference.get('plugin', 'an unnamed plugin')}), "
        "and no plugin of this run reads it: resume with the strategy that wrote it."
    )


@hookimpl(trylast=True)
def broadcast(obj: Any) -> Any:
    return obj


@hookimpl(trylast=True)
def all_gather_object(obj: Any) -> list[Any]:
    return [obj]


@hookimpl(trylast=True)
def reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
