"""Small helpers shared by the core and plugins (on the per-step path: kept cheap)."""

from __future__ import annotations

import os
import sys
import weakref
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple, namedtuple, list or dict to ``device``; other
    objects pass through. When every tensor is on ``device`` already (the common case) the
    object itself is returned, after a check that allocates nothing (~1 µs per batch)."""
    if _placed(obj, device):
        return obj
    return _moved(obj, device)


_Tensor = torch.Tensor
_SEQUENCES = (tuple, list)
_CONTAINERS = (tuple, list, dict)


def _placed(obj: Any, device: torch.device) -> bool:
    if isinstance(obj, _SEQUENCES):
        items: Any = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        return not isinstance(obj, _Tensor) or obj.device == device
    for item in items:  # tensors checked here: a (batch, batch_idx) of tensors recurses once
        if isinstance(item, _Tensor):
            if item.device != device:
                return False
        elif isinstance(item, _CONTAINERS) and not _placed(item, device):
            return False
    return True


def _moved(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        # non_blocking only towards an accelerator: a non-blocking copy to the CPU may be read early
        return obj.to(device, non_blocking=device.type != "cpu")
    if isinstance(obj, list):
        return [_moved(o, device) for o in obj]
    if isinstance(obj, tuple):
        moved = [_moved(o, device) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)  # namedtuples keep their type
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    return obj


#: where :func:`first_parameter` last found a parameter: (module, the submodule holding it, its name)
_last_found: tuple[weakref.ref[nn.Module], weakref.ref[nn.Module], str] | None = None


def first_parameter(module: nn.Module) -> torch.Tensor | None:
    """The module's first parameter in ``parameters()`` order, or None; ~10x cheaper than
    ``next(module.parameters())``, which builds names and a memo set on every call.

    Called once per step with the same model, it remembers where it found the parameter (weakly:
    nothing is kept alive) and looks there first; a parameter replaced or deleted since sends it
    searching again."""
    global _last_found
    last = _last_found
    if last is not None and last[0]() is module:
        holder = last[1]()
        if holder is not None:
            param = holder._parameters.get(last[2])
            if param is not None:
                return param
    found = _search_parameter(module)
    if found is None:
        return None
    holder, name = found
    _last_found = (weakref.ref(module), weakref.ref(holder), name)
    return holder._parameters[name]


def _search_parameter(module: nn.Module) -> tuple[nn.Module, str] | None:
    for name, param in module._parameters.items():
        if param is not None:
            return module, name
    for child in module._modules.values():
        if child is not None:
            found = _search_parameter(child)
            if found is not None:
                return found
    return None


def optimizer_params(optimizer: Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates, in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (True where that cannot be checked cheaply)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


#: Module-name prefixes of frames that are never "the user's line" for a warning.
_INTERNAL_MODULES = ("torchplug", "pluggy")


def _internal_frame(module: str) -> bool:
    # torchplug and its subpackages, the first-party plugins (torchplug_ddp, ...), third-party
    # plugins named like the template (torchplug_<name>), and pluggy's hook dispatch.
    return module.startswith(_INTERNAL_MODULES)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` call made by the caller of this function that
    points at the first frame outside torchplug, its plugins and pluggy: the user's line (their
    ``trainer.fit(...)``, or their ``training_step``). 2 when every frame is internal."""
    frame: FrameType | None = sys._getframe(1)  # the frame that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None and _internal_frame(frame.f_globals.get("__name__", "") or ""):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 2


def warn_at_caller(message: str | Warning, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` pointing at the user's line instead of torchplug's or a
    plugin's (see :func:`caller_stacklevel`). For warnings about what the user passed or did."""
    import warnings

    warnings.warn(message, category, stacklevel=caller_stacklevel())


def mark_scheduler_step(optimizer: Optimizer) -> None:
    """Mark a replaced ``optimizer.step`` (apex's initialize, a ZeRO wrapper, a re-bound scheduler's
    new optimizer) the way torch's LR schedulers mark the step they wrap, so they do not warn that
    ``optimizer.step()`` "has been overridden after learning rate scheduler initialization".
    Relies on torch's private markers ``_wrapped_by_lr_sched``/``_opt_called``
    (torch.optim.lr_scheduler); without them it is inert."""
    import functools

    step = optimizer.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return

    @functools.wraps(step)
    def step_tracked_for_schedulers(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    step_tracked_for_schedulers._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step_tracked_for_schedulers  # type: ignore[method-assign]


def mark_optimizer_stepped(optimizer: Optimizer) -> None:
    """Tell torch's LR schedulers that ``optimizer`` has stepped: true of a resumed optimizer (it
    stepped in the run that wrote the checkpoint), whose epoch-interval scheduler may step before
    this process's first ``optimizer.step()`` (a resume at an epoch's end), which would otherwise
    warn "lr_scheduler.step() before optimizer.step()". The same private marker as
    :func:`mark_scheduler_step`."""
    optimizer._opt_called = True  # type: ignore[attr-defined]
