"""Plugin code written for Lightning 1.1, adapted where it can work as it did there.

* ``block_backward_sync`` written as a ``@contextmanager`` that yields ``model.no_sync()`` (Lightning
  1.1's DDPPlugin did, and never entered it, so every micro-batch synchronised): the loop enters a
  context manager the returned one yields (:func:`entering_yielded`).
* ``required_plugins``: each requirement must be met by an active plugin (:func:`check_required_plugins`).
* ``NativeAMPPlugin(trainer=...)``: accepted with a warning (:func:`warn_trainer_argument`).

Refused at registration instead (:mod:`torchplug._validation`): hook implementations with
``*args``/``**kwargs``, such as 1.1's ``on_before_forward(self, model, *args)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from torchplug._validation import label, object_origin
from torchplug.errors import LightningSpellingWarning, PluginConflictError
from torchplug.utils import warn_at_caller

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


@contextmanager
def entering_yielded(context: AbstractContextManager[Any]) -> Iterator[Any]:
    """Enter ``context``, and also what its ``__enter__`` returned when that is another context
    manager (other than ``context`` itself): ``yield model.no_sync()`` then blocks the sync too."""
    with context as value:
        kind = type(value)
        if value is not None and value is not context and hasattr(kind, "__enter__") and hasattr(kind, "__exit__"):
            with value:
                yield value
        else:
            yield value


def warn_trainer_argument(plugin: str, distribution: str) -> None:
    """For a plugin constructor given ``trainer=`` (Lightning 1.1's constructors received it): warn
    that it is not needed, naming the plugin, its distribution and the fix; the plugin ignores it
    because the hooks that need the trainer get it."""
    warn_at_caller(
        f"{plugin} ({distribution}) takes no trainer: Lightning 1.1's plugin constructors received it, torchplug "
        f"passes the trainer to the hooks that need it. Write {plugin}() (its settings follow the Trainer's "
        "arguments) to silence this warning.", LightningSpellingWarning)


def _met(requirement: Any, trainer: Trainer) -> bool:
    plugins = [rec.plugin for rec in trainer.pm.records]
    if isinstance(requirement, str):
        return requirement in trainer.plugin_names
    if isinstance(requirement, type):
        return any(isinstance(p, requirement) for p in plugins)
    return any(type(p) is type(requirement) for p in plugins)


def check_required_plugins(trainer: Trainer) -> None:
    """Every active plugin's ``required_plugins`` met, or a :class:`PluginConflictError` naming
    the plugin, what it requires, and the fix; before any work."""
    hook = trainer.pm.hook.required_plugins
    arguments = {"trainer": trainer, "amp_backend": trainer.amp_backend}
    for impl in hook.get_hookimpls():
        if impl.wrapper or impl.hookwrapper:
            continue  # a wrapper answers nothing of its own (the recorder of torchplug.testing wraps every hook)
        answer: Any = impl.function(*(arguments[name] for name in impl.argnames))
        wanted: list[Any] = list(answer or [])
        for requirement in wanted:
            if _met(requirement, trainer):
                continue
            what = requirement if isinstance(requirement, str) else \
                (requirement.__qualname__ if isinstance(requirement, type) else type(requirement).__qualname__)
            raise PluginConflictError(
                f"Plugin {label(impl.plugin)} ({object_origin(impl.plugin)}) requires {what!r} (required_plugins), "
                f"which is not among the active plugins {trainer.plugin_names}. Add it: Trainer(plugins=[..., "
                f"{what!r}])" + ("" if isinstance(requirement, str) else f" (an instance, {what}(...))")
                + ". torchplug adds no plugin by itself (Lightning 1.1 did)."
            )


__all__ = ["check_required_plugins", "entering_yielded", "warn_trainer_argument"]
