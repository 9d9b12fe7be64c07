"""Fast, typed call sites for the hooks, built once the plugin set is final.

A pluggy call costs ~1.3 µs even with no implementation and ~2 µs with one. Most hooks in a
run have exactly one implementation (the core's default or the one plugin of a role), so each
call site here is resolved once: no implementation → a no-op, plain implementations → direct
calls in pluggy's order with pluggy's result rules, wrappers → pluggy's own caller.
``on_before_forward`` is chained, so the core calls its implementations itself, in pluggy's order.

``TORCHPLUG_TRACE=1`` logs every hook call with the plugin that answered and its duration
(logger ``torchplug.trace``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from types import CodeType
from typing import Any

import pluggy

from torchplug import hookspecs
from torchplug.errors import PluginHookError

TRACE_ENV = "TORCHPLUG_TRACE"
trace_logger = logging.getLogger("torchplug.trace")

Caller = Callable[..., Any]


class Hooks:
    """One attribute per hook (``hooks.clip_gradients(grad_clip_val=..., ...)``), keyword-only
    like pluggy. Build it after the last registration; it does not see later ones."""

    def __init__(self, pm: pluggy.PluginManager, trace: bool | None = None) -> None:
        self._pm = pm
        if trace is None:
            trace = os.environ.get(TRACE_ENV, "").strip().lower() not in ("", "0", "false", "no")
        self.trace = trace
        self._owners: dict[CodeType, tuple[str, str]] = {}
        for name in hookspecs.HOOK_NAMES:
            hook: pluggy.HookCaller = getattr(pm.hook, name)
            impls = hook.get_hookimpls()
            for impl in impls:
                code = getattr(impl.function, "__code__", None)
                if code is not None:
                    self._owners[code] = (impl.plugin_name, name)
            firstresult = bool(hook.spec and hook.spec.opts.get("firstresult"))
            caller: Caller
            if name == "on_before_forward":
                caller = _chained(name, impls, trace)
            elif trace:
                caller = _traced(name, hook, impls, firstresult)
            else:
                caller = _fast(hook, impls, firstresult)
            setattr(self, name, caller)

    def blame(self, exc: BaseException) -> tuple[str, str] | None:
        """The innermost (plugin, hook) implementation on ``exc``'s traceback, if any."""
        found = None
        tb = exc.__traceback__
        while tb is not None:
            owner = self._owners.get(tb.tb_frame.f_code)
            if owner is not None:
                found = owner
            tb = tb.tb_next
        return found

    def wrap_error(self, exc: Exception) -> Exception:
        """A :class:`PluginHookError` naming the plugin and hook ``exc`` came from, if a
        non-builtin plugin raised it; otherwise ``exc`` itself."""
        owner = self.blame(exc)
        if owner is None or owner[0] == "torchplug.defaults" or isinstance(exc, PluginHookError):
            return exc
        plugin, hook = owner
        error = PluginHookError(f"Plugin '{plugin}' raised in hook '{hook}': {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    # Declared for type checkers; each is replaced by a caller in __init__.
    launch: Caller
    check_configuration: Caller
    setup_environment: Caller
    world_size: Caller
    global_rank: Caller
    root_device: Caller
    teardown_environment: Caller
    on_after_setup_optimizers: Caller
    connect_precision: Caller
    configure_apex: Caller
    configure_ddp: Caller
    get_model_from_plugin: Caller
    on_before_forward: Caller
    block_backward_sync: Caller
    forward_context: Caller
    backward: Caller
    unscale_gradients: Caller
    clip_gradients: Caller
    optimizer_step: Caller
    data_parallel_group: Caller
    barrier: Caller
    broadcast: Caller
    reduce: Caller
    on_fit_start: Caller
    on_train_epoch_start: Caller
    on_before_optimizer_step: Caller
    on_train_batch_end: Caller
    on_train_epoch_end: Caller
    on_validation_end: Caller
    on_save_checkpoint: Caller
    on_load_checkpoint: Caller
    on_fit_end: Caller
    on_exception: Caller


def _noop_first(**kwargs: Any) -> None:
    return None


def _noop_all(**kwargs: Any) -> list[Any]:
    return []


def _fast(hook: pluggy.HookCaller, impls: list[pluggy.HookImpl], firstresult: bool) -> Caller:
    """pluggy's result for this hook, without pluggy's per-call machinery where it is not needed."""
    if not impls:
        return _noop_first if firstresult else _noop_all
    if len(impls) == 1 and not (impls[0].wrapper or impls[0].hookwrapper):
        function, argnames = impls[0].function, impls[0].argnames
        if firstresult:
            def direct(**kwargs: Any) -> Any:
                return function(*[kwargs[a] for a in argnames])

            return direct

        def direct_all(**kwargs: Any) -> list[Any]:
            result = function(*[kwargs[a] for a in argnames])
            return [] if result is None else [result]

        return direct_all
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


def _chained(name: str, impls: list[pluggy.HookImpl], trace: bool) -> Caller:
    # pluggy's call order is the reverse of get_hookimpls() (tryfirst … normal … trylast).
    steps = [(impl.plugin_name, impl.function, impl.argnames) for impl in reversed(impls)]

    def chain(*, model: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        for plugin_name, function, argnames in steps:
            kwargs = {"model": model, "args": args}
            start = time.perf_counter() if trace else 0.0
            result = function(*[kwargs[a] for a in argnames])
            if trace:
                trace_logger.info("%s: %s returned %s in %.1f us", name, plugin_name,
                                  "unchanged" if result is None else "new args", (time.perf_counter() - start) * 1e6)
            if result is not None:
                if not isinstance(result, tuple):
                    raise TypeError(
                        f"Plugin '{plugin_name}': {name} must return the step arguments as a tuple "
                        f"(e.g. (batch, batch_idx)) or None for unchanged, got {type(result).__name__}"
                    )
                args = result
        return args

    return chain


def _traced(name: str, hook: pluggy.HookCaller, impls: list[pluggy.HookImpl], firstresult: bool) -> Caller:
    if any(impl.wrapper or impl.hookwrapper for impl in impls):
        plugins = ", ".join(impl.plugin_name for impl in reversed(impls))

        def via_pluggy(**kwargs: Any) -> Any:
            start = time.perf_counter()
            result = hook(**kwargs)
            trace_logger.info("%s: wrapped call through %s in %.1f us", name, plugins,
                              (time.perf_counter() - start) * 1e6)
            return result

        return via_pluggy

    ordered = [(impl.plugin_name, impl.function, impl.argnames) for impl in reversed(impls)]

    def traced(**kwargs: Any) -> Any:
        if not ordered:
            trace_logger.info("%s: no implementation", name)
        results = []
        for plugin_name, function, argnames in ordered:
            start = time.perf_counter()
            result = function(*[kwargs[a] for a in argnames])
            elapsed = (time.perf_counter() - start) * 1e6
            if firstresult and result is not None:
                trace_logger.info("%s: answered by %s in %.1f us", name, plugin_name, elapsed)
                return result
            trace_logger.info("%s: %s %s in %.1f us", name, plugin_name,
                              "deferred" if firstresult else "ran", elapsed)
            if result is not None:
                results.append(result)
        return None if firstresult else results

    return traced
