"""Fast, typed call sites for the hooks, built once the plugin set is final.

A pluggy call costs ~1.3 µs even with no implementation and ~2 µs with one. Most hooks in a
run have exactly one implementation (the core's default or the one plugin of a role), so each
call site is resolved once per plugin set (:mod:`torchplug.callers` says into what). Chained
hooks (:data:`torchplug.hookspecs.CHAINED_HOOKS`) are called by the core itself, in pluggy's order.

With ``TORCHPLUG_TRACE`` set (:mod:`torchplug.trace`), traced callers take their place; unset,
tracing costs nothing per call.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Generator
from pathlib import Path
from types import CodeType
from typing import TYPE_CHECKING, Any, cast

import pluggy

from torchplug import hookspecs
from torchplug.callers import chained, fast
from torchplug.errors import PluginHookError, PluginValidationError
from torchplug.hookspecs import CHAINED_HOOKS
from torchplug.trace import (
    COLLECTIVES,
    TRACE_ENV,
    Caller,
    FileTrace,
    TextTrace,
    Tracer,
    plugin_info,
    trace_logger,
    trace_mode,
    traced,
)

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch
    from torch import nn
    from torch.optim import Optimizer

    from torchplug.trainer import Trainer



class Hooks:
    """One attribute per hook (``hooks.clip_gradients(grad_clip_val=..., ...)``), keyword-only
    like pluggy, giving pluggy's results; typed for mypy (the stubs below mirror
    :mod:`torchplug.hookspecs`, returning ``X`` rather than ``X | None`` where the core's
    defaults always answer).

    Where it differs from calling ``pm.hook.<name>(...)``:

    * No late registration: the call sites are resolved when the Hooks are built, so build
      them after the last ``register``; plugins registered (or unregistered) later are not seen.
    * Hooks with only plain implementations bypass pluggy's ``_hookexec``, so
      ``pm.add_hookcall_monitoring`` and ``pm.enable_tracing`` do not see those calls (hooks
      with a wrapper still go through pluggy). Use ``TORCHPLUG_TRACE`` instead.
    * A missing keyword argument raises ``KeyError`` (pluggy warns, then raises ``HookCallError``
      if an implementation asks for it).
    * ``historic=True`` hookspecs are refused at build time: nothing here would replay them.

    :param pm: the plugin manager, with every plugin registered.
    :param trace: ``None`` reads ``TORCHPLUG_TRACE``; ``True``/``False`` switch the stderr
        trace; a path (``str`` or path-like) ending in ``.json`` writes a trace-event file there.
    """

    def __init__(self, pm: pluggy.PluginManager, trace: bool | str | os.PathLike[str] | None = None) -> None:
        self._pm = pm
        for name in hookspecs.HOOK_NAMES:
            spec = getattr(pm.hook, name).spec
            if spec is not None and spec.opts.get("historic"):
                # A real check rather than an assert (asserts vanish under python -O): a historic
                # hook called here would silently never reach plugins registered later.
                raise PluginValidationError(
                    f"Hookspec {name!r} is historic=True, which torchplug.hookcalls.Hooks does not support: "
                    f"its call sites are resolved once and would not replay calls to later registrations. "
                    f"Drop historic=True, or call it through pm.hook.{name}.call_historic(...)."
                )
        text, path = trace_mode(os.environ.get(TRACE_ENV, "") if trace is None else trace)
        #: whether hook calls are traced (to stderr or to a file)
        self.trace = text or path is not None
        #: the trace-event file this process writes (after ``.rankN`` is added), if any
        self.trace_path = path
        self._file_trace: FileTrace | None = None
        tracer: Tracer | None = None
        if path is not None:
            tracer = self._file_trace = FileTrace(path)
            weakref.finalize(self, self._file_trace.close_at_exit)  # if close_trace is never called
        elif text:
            tracer = TextTrace()
        self._tracer = tracer
        #: plugin, distribution and version of every plugin (file traces only)
        self._plugin_info: dict[str, dict[str, Any]] = {}
        self._owners: dict[CodeType, tuple[str, str]] = {}
        #: the hooks that have at least one implementation (the loop collects step outputs for
        #: ``training_epoch_end`` only when someone implements it)
        self.implemented: frozenset[str] = frozenset()
        self.refresh()

    def refresh(self) -> None:
        """Resolve the call sites again after plugins were registered or unregistered (the fit
        registers the user's module for its duration); a trace keeps going in the same file."""
        pm, tracer = self._pm, self._tracer
        # plugin, distribution and version of every plugin, once (file traces only: ~0.2 s)
        plugins = self._plugin_info = plugin_info(pm) if self._file_trace is not None else {}
        self._owners.clear()
        implemented = set()
        for name in hookspecs.HOOK_NAMES:
            hook: pluggy.HookCaller = getattr(pm.hook, name)
            impls = hook.get_hookimpls()
            if impls:
                implemented.add(name)
            for impl in impls:
                code = getattr(impl.function, "__code__", None)
                if code is not None:
                    self._owners[code] = (impl.plugin_name, name)
            firstresult = bool(hook.spec and hook.spec.opts.get("firstresult"))
            caller: Caller
            if tracer is not None:
                caller = traced(name, hook, impls, firstresult, tracer, plugins)
            elif name in CHAINED_HOOKS:
                caller = chained(name, impls)
            else:
                caller = fast(hook, impls, firstresult)
            setattr(self, name, caller)
        self.implemented = frozenset(implemented)

    def close_trace(self) -> Path | None:
        """Write the trace-event file of ``TORCHPLUG_TRACE=<path>.json`` (every span so far) and
        restore the ``torch.distributed`` functions it counted; returns the file written, or
        ``None`` without a file trace. Safe to call more than once: a second call rewrites the
        file only if hooks were called since (their spans are added, counted again)."""
        return self._file_trace.close() if self._file_trace is not None else None

    def answers(self, name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call an all-called hook and return ``(plugin name, answer)`` for every implementation
        that answered, in pluggy's order: for setup hooks whose errors must name the plugin
        (``model_transforms``). New-style wrappers (``wrapper=True``) run around the call as in
        pluggy and see the answers as a list (what they return is not used); old-style
        ``hookwrapper=True`` is refused there."""
        hook: pluggy.HookCaller = getattr(self._pm.hook, name)
        impls = list(reversed(hook.get_hookimpls()))  # pluggy's calling order
        if self._tracer is None:
            return self._answers(name, impls, kwargs)
        if not impls:
            self._tracer.unanswered(name)
            return []
        owners = [self._plugin_info.get(impl.plugin_name) or {"plugin": impl.plugin_name} for impl in impls]
        owner: dict[str, Any] = {"plugin": ", ".join(o["plugin"] for o in owners)}
        if self._plugin_info:
            owner["plugins"] = owners
        start = self._tracer.start()  # one span for the call, naming every implementation
        try:
            results = self._answers(name, impls, kwargs)
        except BaseException as exc:
            self._tracer.record(name, owner, f"raised {type(exc).__name__}", start)
            raise
        self._tracer.record(name, owner, "ran", start)
        return results

    def _answers(self, name: str, impls: list[pluggy.HookImpl], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
        wrappers = []
        for impl in impls:
            if impl.hookwrapper:
                raise PluginValidationError(
                    f"Plugin {impl.plugin_name!r}: hook {name!r} cannot be an old-style hookwrapper; use "
                    "@hookimpl(wrapper=True) or a plain implementation."
                )
            if impl.wrapper:
                generator = cast(Generator[None, Any, Any], impl.function(*[kwargs[a] for a in impl.argnames]))
                next(generator)  # up to its yield, as pluggy does
                wrappers.append((impl, generator))
        results = []
        for impl in impls:
            if not impl.wrapper:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
                if result is not None:
                    results.append((impl.plugin_name, result))
        for impl, generator in reversed(wrappers):
            try:
                generator.send([answer for _, answer in results])
            except StopIteration:
                continue
            raise PluginValidationError(f"Plugin {impl.plugin_name!r}: the wrapper of {name!r} yielded twice.")
        return results

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
        # The user's own module hooks (torchplug.modulehooks) raise unchanged, like training_step.
        if owner is None or owner[0] in ("torchplug.defaults", "torchplug.module") or isinstance(exc, PluginHookError):
            return exc
        plugin, hook = owner
        error = PluginHookError(f"Plugin '{plugin}' raised in hook '{hook}': {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    if TYPE_CHECKING:
        # For type checkers only: at run time each hook is an instance attribute (a caller set in
        # __init__), so these cost nothing. Same names and types as torchplug.hookspecs, keyword
        # only; core/tests/test_hookcalls.py keeps them in step with it.

        # 1. launch and environment
        def launch(self, *, trainer: Trainer, function: Callable[[], Any]) -> Any: ...
        def check_configuration(self, *, trainer: Trainer) -> list[Any]: ...
        def required_plugins(self, *, trainer: Trainer, amp_backend: str) -> list[Any]: ...
        def setup_environment(self, *, trainer: Trainer) -> list[Any]: ...
        def world_size(self) -> int: ...
        def global_rank(self) -> int: ...
        def root_device(self, *, trainer: Trainer, model: nn.Module) -> torch.device: ...
        def teardown_environment(self, *, trainer: Trainer) -> list[Any]: ...

        # 2. setup
        def model_init_context(self, *, trainer: Trainer) -> list[Any]: ...
        def model_transforms(self, *, trainer: Trainer, model: nn.Module) -> list[Any]: ...
        def setup_optimizers(self, *, trainer: Trainer, optimizers: list[Optimizer]) -> list[Optimizer]: ...
        def on_after_setup_optimizers(self, *, trainer: Trainer) -> list[Any]: ...
        def connect_precision(
            self, *, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer]
        ) -> tuple[nn.Module, list[Optimizer]]: ...
        def configure_apex(
            self, *, amp: Any, model: nn.Module, optimizers: list[Optimizer], amp_level: str
        ) -> tuple[nn.Module, list[Optimizer]] | None: ...
        def configure_ddp(self, *, model: nn.Module, device_ids: list[int] | None) -> nn.Module: ...
        def get_model_from_plugin(self, *, model: nn.Module) -> nn.Module: ...

        # 3. step
        def on_before_forward(self, *, model: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]: ...
        def block_backward_sync(self, *, model: nn.Module) -> AbstractContextManager[Any]: ...
        def forward_context(self, *, model: nn.Module) -> AbstractContextManager[Any]: ...
        def backward(
            self, *, loss: torch.Tensor, optimizers: list[Optimizer], model: nn.Module, sync_gradients: bool
        ) -> Any: ...
        def unscale_gradients(self, *, optimizer: Optimizer) -> list[Any]: ...
        def clip_gradients(self, *, grad_clip_val: float, optimizer: Optimizer, norm_type: float) -> torch.Tensor: ...
        def optimizer_step(self, *, optimizers: list[Optimizer]) -> bool: ...

        # 4. collectives
        def data_parallel_group(self) -> Any: ...
        def barrier(self, *, name: str) -> list[Any]: ...
        def broadcast(self, *, obj: Any, src: int) -> Any: ...
        def all_gather_object(self, *, obj: Any) -> list[Any]: ...
        def reduce(self, *, tensor: torch.Tensor, op: str) -> torch.Tensor: ...

        # 5. user events
        def on_fit_start(self, *, trainer: Trainer, model: nn.Module) -> list[Any]: ...
        def on_train_epoch_start(self, *, trainer: Trainer, epoch: int) -> list[Any]: ...
        def on_before_optimizer_step(self, *, trainer: Trainer, optimizer: Optimizer) -> list[Any]: ...
        def on_train_batch_end(self, *, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int) -> list[Any]: ...
        def on_train_epoch_end(self, *, trainer: Trainer, epoch: int) -> list[Any]: ...
        def on_validation_end(self, *, trainer: Trainer, metrics: dict[str, float]) -> list[Any]: ...
        def on_log_metrics(self, *, trainer: Trainer, metrics: dict[str, float], step: int) -> list[Any]: ...
        def collect_state(self, *, trainer: Trainer) -> list[Any]: ...
        def get_state_dicts(
            self, *, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer]
        ) -> tuple[dict[str, Any], list[dict[str, Any]]]: ...
        def load_state_dicts(
            self, *, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], state_dict: dict[str, Any],
            optimizer_states: list[dict[str, Any]]
        ) -> bool: ...
        def save_sharded_state(
            self, *, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], checkpoint_path: str | None
        ) -> dict[str, Any] | None: ...
        def load_sharded_state(
            self, *, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], folder: str,
            reference: dict[str, Any]
        ) -> bool: ...
        def on_save_checkpoint(self, *, trainer: Trainer, checkpoint: dict[str, Any]) -> list[Any]: ...
        def on_load_checkpoint(self, *, trainer: Trainer, checkpoint: dict[str, Any]) -> list[Any]: ...
        def on_fit_end(self, *, trainer: Trainer, model: nn.Module) -> list[Any]: ...
        def on_exception(self, *, trainer: Trainer, exception: BaseException) -> list[Any]: ...

        # 6. Lightning's events
        def setup(self, *, trainer: Trainer, stage: str) -> list[Any]: ...
        def teardown(self, *, trainer: Trainer, stage: str) -> list[Any]: ...
        def on_train_start(self, *, trainer: Trainer) -> list[Any]: ...
        def on_train_end(self, *, trainer: Trainer) -> list[Any]: ...
        def on_epoch_start(self, *, trainer: Trainer) -> list[Any]: ...
        def on_epoch_end(self, *, trainer: Trainer) -> list[Any]: ...
        def on_train_batch_start(self, *, trainer: Trainer, batch: Any, batch_idx: int) -> list[Any]: ...
        def on_before_backward(self, *, trainer: Trainer, loss: torch.Tensor) -> list[Any]: ...
        def on_after_backward(self, *, trainer: Trainer) -> list[Any]: ...
        def on_before_zero_grad(self, *, trainer: Trainer, optimizer: Optimizer) -> list[Any]: ...
        def training_epoch_end(self, *, trainer: Trainer, outputs: list[Any]) -> list[Any]: ...
        def on_validation_start(self, *, trainer: Trainer) -> list[Any]: ...
        def on_validation_epoch_start(self, *, trainer: Trainer) -> list[Any]: ...
        def on_validation_batch_start(self, *, trainer: Trainer, batch: Any, batch_idx: int) -> list[Any]: ...
        def on_validation_batch_end(
            self, *, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int
        ) -> list[Any]: ...
        def validation_epoch_end(self, *, trainer: Trainer, outputs: list[Any]) -> list[Any]: ...
        def on_validation_epoch_end(self, *, trainer: Trainer) -> list[Any]: ...
        def on_test_start(self, *, trainer: Trainer) -> list[Any]: ...
        def on_test_epoch_start(self, *, trainer: Trainer) -> list[Any]: ...
        def on_test_batch_start(
            self, *, trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int
        ) -> list[Any]: ...
        def on_test_batch_end(
            self, *, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int
        ) -> list[Any]: ...
        def test_epoch_end(self, *, trainer: Trainer, outputs: list[Any]) -> list[Any]: ...
        def on_test_epoch_end(self, *, trainer: Trainer) -> list[Any]: ...
        def on_test_end(self, *, trainer: Trainer, metrics: dict[str, float]) -> list[Any]: ...
        def on_predict_start(self, *, trainer: Trainer) -> list[Any]: ...
        def on_predict_epoch_start(self, *, trainer: Trainer) -> list[Any]: ...
        def on_predict_batch_start(
            self, *, trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int
        ) -> list[Any]: ...
        def on_predict_batch_end(
            self, *, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int
        ) -> list[Any]: ...
        def on_predict_epoch_end(self, *, trainer: Trainer, outputs: list[Any]) -> list[Any]: ...
        def on_predict_end(self, *, trainer: Trainer) -> list[Any]: ...


if not TYPE_CHECKING:
    # At run time every hook is an instance attribute; annotate them so that
    # typing.get_type_hints(Hooks) lists every hook.
    Hooks.__annotations__.update(dict.fromkeys(hookspecs.HOOK_NAMES, Caller))


__all__ = ["COLLECTIVES", "TRACE_ENV", "Hooks", "trace_logger"]
