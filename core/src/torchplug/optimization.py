"""Lightning 1.x's optimization on the module: several optimizers with ``optimizer_idx``, the
module's ``optimizer_step``/``optimizer_zero_grad`` overrides, and manual optimization.

* Several optimizers and a ``training_step(batch, batch_idx, optimizer_idx)``: each micro-batch
  runs ``training_step`` once per optimizer, with the parameters of the other optimizers
  ``requires_grad=False`` (:func:`toggled`, Lightning's ``toggle_optimizer``), and each optimizer
  steps on its own loss. A ``training_step`` without ``optimizer_idx`` steps all optimizers on one
  loss, as before.
* The module's ``optimizer_step(epoch, batch_idx, optimizer, optimizer_idx, optimizer_closure,
  on_tpu, using_native_amp, using_lbfgs)`` replaces the loop's call of the ``optimizer_step``
  hook for that optimizer; the optimizer it receives is a :class:`StepOptimizer`, whose ``step``
  still goes through the precision plugin's ``optimizer_step`` hook (GradScaler, skip on inf).
  Unscaling, ``on_before_optimizer_step`` and clipping have run before it, and backward too, so
  ``optimizer_closure`` only returns the loss.
* ``automatic_optimization = False``: the loop runs ``training_step`` and nothing else;
  ``self.optimizers()`` gives :class:`StepOptimizer` objects (``step`` = ``unscale_gradients`` →
  ``on_before_optimizer_step`` → the ``optimizer_step`` hook) and ``self.manual_backward(loss)``
  runs ``on_before_backward`` → the ``backward`` hook (loss scaling, apex) → ``on_after_backward``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

if TYPE_CHECKING:
    from torchplug.hookcalls import Hooks
    from torchplug.trainer import Trainer


def takes_optimizer_idx(training_step: Callable[..., Any]) -> bool:
    """Whether ``training_step`` accepts a third positional argument (``optimizer_idx``)."""
    try:
        params = list(inspect.signature(training_step).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


@contextmanager
def toggled(optimizers: list[Optimizer], index: int) -> Iterator[None]:
    """Only ``optimizers[index]``'s parameters require grad within the block (Lightning 1.x's
    ``toggle_optimizer``/``untoggle_optimizer``: a parameter shared with it keeps its own flag)."""
    mine = {id(p) for group in optimizers[index].param_groups for p in group["params"]}
    saved: list[tuple[torch.Tensor, bool]] = []
    for i, opt in enumerate(optimizers):
        if i == index:
            continue
        for group in opt.param_groups:
            for param in group["params"]:
                if id(param) not in mine:
                    saved.append((param, param.requires_grad))
                    param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)


class StepOptimizer:
    """An optimizer whose ``step`` goes through the precision plugin (Lightning's
    ``LightningOptimizer``); every other attribute is the optimizer's own.

    :param prepared: the loop already unscaled the gradients and called
        ``on_before_optimizer_step`` (the module's ``optimizer_step`` override); otherwise
        ``step`` does both first (manual optimization).
    """

    def __init__(self, optimizer: Optimizer, trainer: Trainer, hooks: Hooks, prepared: bool = False) -> None:
        self.optimizer = optimizer
        self._trainer = trainer
        self._hooks = hooks
        self._prepared = prepared
        #: what each ``step`` returned: False when the precision plugin skipped it (inf/NaN)
        self.results: list[bool] = []

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        if not self._prepared:
            self._hooks.unscale_gradients(optimizer=self.optimizer)
            self._hooks.on_before_optimizer_step(trainer=self._trainer, optimizer=self.optimizer)
        self.results.append(bool(self._hooks.optimizer_step(optimizers=[self.optimizer])))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"StepOptimizer({self.optimizer!r})"


def overrides(module: Any, name: str) -> bool:
    """Whether the module's own class defines ``name`` (TrainingModule's default does not count)."""
    from torchplug.module import TrainingModule

    method = getattr(type(module), name, None)
    return method is not None and method is not getattr(TrainingModule, name, None)


def call_optimizer_step(module: Any, epoch: int, batch_idx: int, optimizer: StepOptimizer, index: int,
                        loss: torch.Tensor | None, using_native_amp: bool) -> None:
    """The module's ``optimizer_step`` with Lightning 1.1's arguments, by name where its
    parameters carry Lightning's names (1.x and 2.x signatures differ), else by position."""
    values = {"epoch": epoch, "batch_idx": batch_idx, "optimizer": optimizer, "optimizer_idx": index,
              "optimizer_closure": lambda: loss, "on_tpu": False, "using_native_amp": using_native_amp,
              "using_lbfgs": False}
    _call_lightning(module.optimizer_step, values)


def call_optimizer_zero_grad(module: Any, epoch: int, batch_idx: int, optimizer: Optimizer, index: int) -> None:
    _call_lightning(module.optimizer_zero_grad,
                    {"epoch": epoch, "batch_idx": batch_idx, "optimizer": optimizer, "optimizer_idx": index})


def _call_lightning(method: Callable[..., Any], values: dict[str, Any]) -> None:
    params = list(inspect.signature(method).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if all(p.name in values or p.default is not p.empty for p in named) \
            and not any(p.kind is p.POSITIONAL_ONLY for p in params):
        if any(p.kind is p.VAR_KEYWORD for p in params):
            method(**values)
        else:
            method(**{p.name: values[p.name] for p in named if p.name in values})
        return
    ordered = list(values.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    method(*(ordered if any(p.kind is p.VAR_POSITIONAL for p in params) else ordered[:len(positional)]))


__all__ = ["StepOptimizer", "call_optimizer_step", "call_optimizer_zero_grad", "overrides", "takes_optimizer_idx",
           "toggled"]
