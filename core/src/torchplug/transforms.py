"""Model init and model transforms: the part of setup that changes the user's module before its
optimizers exist (meta-device init, activation checkpointing, ``torch.compile``, sharding).

Plugins contribute through two hooks (:mod:`torchplug.hookspecs`, phase 2):
``model_init_context`` (context managers entered around the module's optional
``configure_model()``) and ``model_transforms`` (:class:`ModelTransform` declarations). The
core orders the declared transforms here: by their ``before``/``after`` constraints and by
:data:`DEFAULT_ORDER` between the well-known names. The order must be total: two transforms
that nothing orders (or a cycle) are a :class:`~torchplug.PluginConflictError` naming both
plugins and transforms, raised before any transform runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from torchplug.errors import MisconfigurationError, PluginConflictError, PluginValidationError

if TYPE_CHECKING:
    from torchplug.trainer import Trainer

#: The order of the well-known transform names when no constraint says otherwise: activation
#: checkpointing wraps the eager blocks, compile sees the checkpointed graph, sharding comes last
#: (its hooks wrap the compiled modules, and it replaces the parameters, so nothing after it
#: may hold the old ones).
DEFAULT_ORDER: tuple[str, ...] = ("activation_checkpoint", "compile", "shard")


@dataclass(frozen=True)
class ModelTransform:
    """One change a plugin makes to the user's module during setup, before the optimizers exist.

    :param name: what it does, e.g. ``"compile"``, ``"shard"``, ``"activation_checkpoint"``
        (the names :data:`DEFAULT_ORDER` orders); unique within a run.
    :param apply: called once with the user's module, on its root device; changes it IN PLACE
        (``fully_shard(module)``, ``module.compile()``, children replaced) and returns ``None``
        (or the module itself). The module given to ``fit`` stays the one trained and
        checkpointed, so returning a different object is refused.
    :param before: names of transforms this one must run before (when they are present).
    :param after: names of transforms this one must run after (when they are present).
    """

    name: str
    apply: Callable[[nn.Module], Any]
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PluginValidationError(f"ModelTransform name must be a non-empty string, got {self.name!r}")
        if not callable(self.apply):
            raise PluginValidationError(f"ModelTransform {self.name!r}: apply must be callable, got {self.apply!r}")
        for field in ("before", "after"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise PluginValidationError(
                    f"ModelTransform {self.name!r}: {field} must be a tuple of transform names, got {value!r}"
                )
            object.__setattr__(self, field, tuple(value))


@dataclass(frozen=True)
class Declared:
    """A transform and the plugin that declared it."""

    plugin: str
    transform: ModelTransform

    def describe(self) -> str:
        return f"{self.transform.name!r} (plugin {self.plugin!r})"


def collect(answers: Iterable[tuple[str, Any]]) -> list[Declared]:
    """The transforms of every plugin's ``model_transforms`` answer (one, a sequence, or None)."""
    declared: list[Declared] = []
    for plugin, answer in answers:
        if answer is None:
            continue
        items = [answer] if isinstance(answer, ModelTransform) else answer
        if not isinstance(items, Sequence) or not all(isinstance(t, ModelTransform) for t in items):
            raise PluginValidationError(
                f"Plugin {plugin!r}: model_transforms must return a torchplug.ModelTransform, a list of them or None; "
                f"got {answer!r}."
            )
        declared += [Declared(plugin, t) for t in items]
    return declared


def order(declared: list[Declared]) -> list[Declared]:
    """The one order the constraints allow; a cycle, a duplicate name or two transforms nothing
    orders is a :class:`PluginConflictError` naming them and their plugins."""
    by_name: dict[str, Declared] = {}
    for item in declared:
        other = by_name.get(item.transform.name)
        if other is not None:
            raise PluginConflictError(
                f"Two plugins declare the model transform {item.transform.name!r}: {other.plugin!r} and "
                f"{item.plugin!r}. Use one of them (a run shards, or compiles, once)."
            )
        by_name[item.transform.name] = item
    edges: dict[str, set[str]] = {name: set() for name in by_name}  # a -> b: a runs before b
    for name, item in by_name.items():
        for later in item.transform.before:
            if later in by_name:
                edges[name].add(later)
        for earlier in item.transform.after:
            if earlier in by_name:
                edges[earlier].add(name)
    known = [n for n in DEFAULT_ORDER if n in by_name]
    for i, earlier in enumerate(known):
        for later in known[i + 1:]:
            if earlier not in edges[later]:  # an explicit constraint wins over the default order
                edges[earlier].add(later)
    result: list[str] = []
    indegree = dict.fromkeys(by_name, 0)
    for targets in edges.values():
        for target in targets:
            indegree[target] += 1
    ready = [name for name in by_name if indegree[name] == 0]
    while ready:
        if len(ready) > 1:
            a, b = sorted(ready)[:2]
            raise PluginConflictError(
                f"The model transforms {by_name[a].describe()} and {by_name[b].describe()} have no declared "
                f"order. Declare one: ModelTransform(..., before=({b!r},)) in {by_name[a].plugin!r}, or "
                f"after=({b!r},) (known names run in the order {' < '.join(DEFAULT_ORDER)})."
            )
        name = ready.pop()
        result.append(name)
        for target in sorted(edges[name]):
            indegree[target] -= 1
            if indegree[target] == 0:
                ready.append(target)
    if len(result) < len(by_name):
        cycle = sorted(set(by_name) - set(result))
        raise PluginConflictError(
            "The model transforms " + ", ".join(by_name[n].describe() for n in cycle)
            + " declare a cycle in their before=/after= constraints; no order satisfies them. Drop one constraint."
        )
    return [by_name[name] for name in result]


def apply(ordered: list[Declared], module: nn.Module) -> None:
    for item in ordered:
        returned = item.transform.apply(module)
        if returned is not None and returned is not module:
            raise PluginValidationError(
                f"Plugin {item.plugin!r}: model transform {item.transform.name!r} returned a "
                f"{type(returned).__name__} instead of changing the module in place. Transforms change the "
                "module given to fit (module.compile(), fully_shard(module), children replaced) and return None."
            )


def configure_model(trainer: Trainer, module: nn.Module) -> None:
    """Enter every plugin's ``model_init_context`` (the first answer outermost) around the
    module's ``configure_model()``, when it defines one (Lightning 2.x's deferred layer creation)."""
    hook = getattr(module, "configure_model", None)
    if hook is not None:
        if not callable(hook):
            raise MisconfigurationError(
                f"{type(module).__name__}.configure_model is a {type(hook).__name__}, not a method; torchplug "
                "calls configure_model() with no arguments to create layers. Rename the attribute."
            )
        required = [p.name for p in inspect.signature(hook).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            raise MisconfigurationError(
                f"{type(module).__name__}.configure_model() takes {', '.join(required)}; torchplug calls it with no "
                "arguments (read what it needs from self). Give those parameters defaults."
            )
    contexts = trainer.hooks.model_init_context(trainer=trainer)
    for context in contexts:
        if not isinstance(context, AbstractContextManager):
            raise PluginValidationError(
                f"model_init_context returned {context!r}; return a context manager (not entered) or None."
            )
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        if hook is not None:
            hook()


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether parameters or buffers are still on the meta device (a deferred init whose
    transform materialises them)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


__all__ = ["DEFAULT_ORDER", "ModelTransform"]
