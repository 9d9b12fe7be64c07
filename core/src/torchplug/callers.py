"""The plain (untraced) call sites :class:`torchplug.hookcalls.Hooks` resolves each hook to.

Resolved once per plugin set, from the hook's implementations: none → a no-op; one plain
implementation → a direct call with the arguments it names (:func:`direct`,
:func:`direct_all`); several plain ones → a loop in pluggy's order with pluggy's result rules;
any wrapper → pluggy's own caller. Chained hooks get :func:`chained`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pluggy

from torchplug.trace import Caller, not_args


def _noop_first(**kwargs: Any) -> None:
    return None


def _noop_all(**kwargs: Any) -> list[Any]:
    return []


def fast(hook: pluggy.HookCaller, impls: list[pluggy.HookImpl], firstresult: bool) -> Caller:
    """pluggy's result for this hook, without pluggy's per-call machinery where it is not needed."""
    if not impls:
        return _noop_first if firstresult else _noop_all
    if len(impls) == 1 and not (impls[0].wrapper or impls[0].hookwrapper):
        function, argnames = impls[0].function, impls[0].argnames
        return direct(function, argnames) if firstresult else direct_all(function, argnames)
    if any(impl.wrapper or impl.hookwrapper for impl in impls):
        return hook  # wrappers need pluggy's generator protocol
    # Several plain implementations: pluggy's calling order and result rules, without its
    # per-call setup (~1.5 µs, measured in bench/hook_dispatch.py).
    steps = [(impl.function, impl.argnames) for impl in reversed(impls)]
    if firstresult:
        def first(**kwargs: Any) -> Any:
            for function, argnames in steps:
                result = function(*[kwargs[a] for a in argnames])
                if result is not None:
                    return result
            return None

        return first

    def every(**kwargs: Any) -> list[Any]:
        results = []
        for function, argnames in steps:
            result = function(*[kwargs[a] for a in argnames])
            if result is not None:
                results.append(result)
        return results

    return every


def direct(function: Callable[..., Any], argnames: tuple[str, ...]) -> Caller:
    """The one implementation of a firstresult hook, called with the arguments it names,
    without building an argument list per call (the step's hot path)."""
    if not argnames:
        def call(**kwargs: Any) -> Any:
            return function()
    elif len(argnames) == 1:
        (a,) = argnames

        def call(**kwargs: Any) -> Any:
            return function(kwargs[a])
    else:
        pick = operator.itemgetter(*argnames)  # a tuple of the values, in C

        def call(**kwargs: Any) -> Any:
            return function(*pick(kwargs))

    return call


def direct_all(function: Callable[..., Any], argnames: tuple[str, ...]) -> Caller:
    """:func:`direct` for a hook whose results are collected: pluggy's list (empty for ``None``)."""
    if not argnames:
        def call_all(**kwargs: Any) -> list[Any]:
            result = function()
            return [] if result is None else [result]
    elif len(argnames) == 1:
        (a,) = argnames

        def call_all(**kwargs: Any) -> list[Any]:
            result = function(kwargs[a])
            return [] if result is None else [result]
    else:
        pick = operator.itemgetter(*argnames)

        def call_all(**kwargs: Any) -> list[Any]:
            result = function(*pick(kwargs))
            return [] if result is None else [result]

    return call_all


def chained(name: str, impls: list[pluggy.HookImpl]) -> Caller:
    # pluggy's call order is the reverse of get_hookimpls() (tryfirst … normal … trylast). The
    # usual signatures, (model, args) and (args), are called without a dict per call.
    steps = [(impl.plugin_name, impl.function, impl.argnames) for impl in reversed(impls)]

    def chain(*, model: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        for plugin_name, function, argnames in steps:
            if argnames == _MODEL_ARGS:
                result = function(model, args)
            elif argnames == _ARGS:
                result = function(args)
            else:
                kwargs = {"model": model, "args": args}
                result = function(*[kwargs[a] for a in argnames])
            if result is not None:
                if not isinstance(result, tuple):
                    raise not_args(name, plugin_name, result)
                args = result
        return args

    return chain


_MODEL_ARGS, _ARGS = ("model", "args"), ("args",)


__all__ = ["chained", "direct", "direct_all", "fast"]
