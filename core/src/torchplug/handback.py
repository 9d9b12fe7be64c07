"""Plugin state handed back from worker processes to the plugin objects the user passed.

A ``devices=N`` fit runs in worker processes, each with unpickled copies of the objects in
``Trainer(plugins=[...], callbacks=[...])``; the user's own objects in the launching process
never run. Every such object with ``state_dict()`` and ``load_state_dict(state)`` (torch's and
Lightning callbacks' protocol; ``ModelCheckpoint``, ``EarlyStopping`` have them) gets global
rank 0's state back: rank 0 calls ``state_dict()`` once the fit is over (after ``on_fit_end``
and ``teardown``), the launching process calls ``load_state_dict`` on the same object, by its
place in ``plugins=``/``callbacks=``. Nothing else comes back: other attributes, plugins
selected by name or entry point, and a module's ``configure_callbacks()`` objects (made in the
workers) keep the launching process's values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from torchplug.errors import MisconfigurationError

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


def _passed(trainer: Trainer) -> Iterator[tuple[str, object]]:
    """``("callbacks[1]", obj)`` for every object (not a name) in ``plugins=`` and ``callbacks=``."""
    for argument in ("plugins", "callbacks"):
        for index, obj in enumerate(trainer.arguments.get(argument) or ()):
            if not isinstance(obj, str) and callable(getattr(obj, "state_dict", None)) \
                    and callable(getattr(obj, "load_state_dict", None)):
                yield f"{argument}[{index}]", obj


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def export_states(trainer: Trainer) -> dict[str, Any]:
    """On global rank 0 of a launched copy: ``state_dict()`` of every passed object that ran in this fit."""
    running = {id(record.plugin) for record in trainer.pm.records}
    return {where: _to_cpu(obj.state_dict()) for where, obj in _passed(trainer)  # type: ignore[attr-defined]
            if id(obj) in running}


def import_states(trainer: Trainer, states: dict[str, Any]) -> None:
    """In the launching process: each passed object's ``load_state_dict`` with rank 0's state."""
    for where, obj in _passed(trainer):
        if where not in states:
            continue
        try:
            obj.load_state_dict(states[where])  # type: ignore[attr-defined]
        except Exception as exc:
            raise MisconfigurationError(
                f"{type(obj).__name__} (Trainer {where}) could not load the state its copy in the worker processes "
                f"ended the fit with: {type(exc).__name__}: {exc}. Its load_state_dict must accept what its "
                "state_dict returns."
            ) from exc


__all__ = ["export_states", "import_states"]
