"""Fast, typed call sites for the hooks, built once the plugin set is final.

A pluggy call costs ~1.3 µs even with no implementation and ~2 µs with one. Most hooks in a
run have exactly one implementation (the core's default or the one plugin of a role), so each
call site here is resolved once: no implementation → a no-op, plain implementations → direct
calls in pluggy's order with pluggy's result rules, wrappers → pluggy's own caller. Chained
hooks (:data:`torchplug.hookspecs.CHAINED_HOOKS`) are called by the core itself, in pluggy's order.

Tracing (read from ``TORCHPLUG_TRACE`` when the :class:`Hooks` are built; unset: no tracing and
no cost per call, the callers are the plain ones above):

* ``TORCHPLUG_TRACE=1`` (or ``true``/``yes``): one line per hook implementation call on stderr,
  with the hook, the plugin that answered or ran, and the duration. The lines go through the
  logger ``torchplug.trace``, which gets its own stderr handler and stops propagating, so they
  show without any ``logging`` setup and never twice (a handler you add to that logger
  yourself before the Hooks are built is left alone, and then receives them instead).
* ``TORCHPLUG_TRACE=<path>.json``: a Chrome / Perfetto trace-event file (open it in
  https://ui.perfetto.dev or ``chrome://tracing``) with one complete event ("X") per hook
  implementation call (one per pluggy call for hooks with wrappers, naming every plugin
  involved). Each event's ``args`` holds the plugin, its distribution and version, the
  outcome, and ``collectives``: how many ``torch.distributed`` collectives were issued through
  the Python API (``dist.all_reduce`` …, the functions of :data:`COLLECTIVES`) during the span,
  nested spans included (``launch`` contains the whole fit). Collectives issued from C++, such
  as DDP's gradient all-reduce in its reducer, and calls through a reference taken before the
  trace started (``from torch.distributed import all_reduce``) are not seen; while the trace is
  open those functions are counting Python wrappers (``torch.compile`` sees a plain function
  there, not the collective it special-cases). The file is
  written by :meth:`Hooks.close_trace` (at the latest when the Hooks are garbage-collected or
  the interpreter exits); rank 0, or a process without a process group, writes ``path``,
  rank N writes ``<stem>.rankN.json`` next to it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Generator
from pathlib import Path
from types import CodeType
from typing import TYPE_CHECKING, Any, cast

import pluggy

from torchplug import hookspecs
from torchplug.errors import PluginHookError, PluginValidationError
from torchplug.hookspecs import CHAINED_HOOKS

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch
    from torch import nn
    from torch.optim import Optimizer

    from torchplug.trainer import Trainer

TRACE_ENV = "TORCHPLUG_TRACE"
trace_logger = logging.getLogger("torchplug.trace")

#: The ``torch.distributed`` functions a file trace counts (those that exist in this torch).
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
    "all_gather_single", "reduce_scatter_single",  # what FSDP2 issues (torch 2.13)
    "broadcast_object_list", "all_gather_object", "barrier", "monitored_barrier", "reduce", "scatter", "gather",
)

Caller = Callable[..., Any]


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
        text, path = _trace_mode(os.environ.get(TRACE_ENV, "") if trace is None else trace)
        #: whether hook calls are traced (to stderr or to a file)
        self.trace = text or path is not None
        #: the trace-event file this process writes (after ``.rankN`` is added), if any
        self.trace_path = path
        self._file_trace: _FileTrace | None = None
        tracer: _Tracer | None = None
        if path is not None:
            tracer = self._file_trace = _FileTrace(path)
            weakref.finalize(self, self._file_trace.close_at_exit)  # if close_trace is never called
        elif text:
            tracer = _TextTrace()
        # plugin, distribution and version of every plugin, once (file traces only: ~0.2 s)
        plugin_info = _plugin_info(pm) if self._file_trace is not None else {}
        self._tracer = tracer
        self._plugin_info = plugin_info
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
            if tracer is not None:
                caller = _traced(name, hook, impls, firstresult, tracer, plugin_info)
            elif name in CHAINED_HOOKS:
                caller = _chained(name, impls)
            else:
                caller = _fast(hook, impls, firstresult)
            setattr(self, name, caller)

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
        if owner is None or owner[0] == "torchplug.defaults" or isinstance(exc, PluginHookError):
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
        def reduce(self, *, tensor: torch.Tensor, op: str) -> torch.Tensor: ...

        # 5. user events
        def on_fit_start(self, *, trainer: Trainer, model: nn.Module) -> list[Any]: ...
        def on_train_epoch_start(self, *, trainer: Trainer, epoch: int) -> list[Any]: ...
        def on_before_optimizer_step(self, *, trainer: Trainer, optimizer: Optimizer) -> list[Any]: ...
        def on_train_batch_end(self, *, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int) -> list[Any]: ...
        def on_train_epoch_end(self, *, trainer: Trainer, epoch: int) -> list[Any]: ...
        def on_validation_end(self, *, trainer: Trainer, metrics: dict[str, float]) -> list[Any]: ...
        def collect_state(self, *, trainer: Trainer) -> list[Any]: ...
        def get_state_dicts(
            self, *, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer]
        ) -> tuple[dict[str, Any], list[dict[str, Any]]]: ...
        def load_state_dicts(
            self, *, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], state_dict: dict[str, Any],
            optimizer_states: list[dict[str, Any]]
        ) -> bool: ...
        def on_save_checkpoint(self, *, trainer: Trainer, checkpoint: dict[str, Any]) -> list[Any]: ...
        def on_load_checkpoint(self, *, trainer: Trainer, checkpoint: dict[str, Any]) -> list[Any]: ...
        def on_fit_end(self, *, trainer: Trainer, model: nn.Module) -> list[Any]: ...
        def on_exception(self, *, trainer: Trainer, exception: BaseException) -> list[Any]: ...


if not TYPE_CHECKING:
    # At run time every hook is an instance attribute; annotate them so that
    # typing.get_type_hints(Hooks) lists every hook.
    Hooks.__annotations__.update(dict.fromkeys(hookspecs.HOOK_NAMES, Caller))


# ----------------------------------------------------------------------------------------------
# The plain callers (no tracing)
# ----------------------------------------------------------------------------------------------


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


def _chained(name: str, impls: list[pluggy.HookImpl]) -> Caller:
    # pluggy's call order is the reverse of get_hookimpls() (tryfirst … normal … trylast).
    steps = [(impl.plugin_name, impl.function, impl.argnames) for impl in reversed(impls)]

    def chain(*, model: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        for plugin_name, function, argnames in steps:
            kwargs = {"model": model, "args": args}
            result = function(*[kwargs[a] for a in argnames])
            if result is not None:
                if not isinstance(result, tuple):
                    raise _not_args(name, plugin_name, result)
                args = result
        return args

    return chain


def _not_args(name: str, plugin_name: str, result: Any) -> TypeError:
    return TypeError(
        f"Plugin '{plugin_name}': {name} must return the step arguments as a tuple "
        f"(e.g. (batch, batch_idx)) or None for unchanged, got {type(result).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# Traced callers: the same results, every implementation call recorded by a tracer
# ----------------------------------------------------------------------------------------------

_OFF = ("", "0", "false", "no", "off")


def _trace_mode(value: bool | str | os.PathLike[str]) -> tuple[bool, Path | None]:
    """(stderr trace?, trace-event file) for a ``TORCHPLUG_TRACE`` value or a ``trace=`` argument."""
    if isinstance(value, bool):
        return value, None
    text = os.fspath(value).strip()
    if text.lower().endswith(".json"):
        return False, Path(text).expanduser().absolute()
    return text.lower() not in _OFF, None


class _Tracer:
    """Records one implementation call (or one pluggy call of a wrapped hook)."""

    def start(self) -> tuple[int, int]:
        """What :meth:`record` needs of the moment a call starts."""
        return time.perf_counter_ns(), 0

    def record(self, hook: str, owner: dict[str, Any], outcome: str, start: tuple[int, int]) -> None:
        raise NotImplementedError

    def unanswered(self, hook: str) -> None:
        """A call of a hook without implementations."""


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, a redirect)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


class _TextTrace(_Tracer):
    """``TORCHPLUG_TRACE=1``: one line per call, through ``torchplug.trace`` to stderr."""

    MESSAGES = {
        "answered": "{hook}: answered by {plugin} in {us:.1f} us",
        "wrapped": "{hook}: wrapped call through {plugin} in {us:.1f} us",
        "new args": "{hook}: {plugin} returned new args in {us:.1f} us",
        "unchanged": "{hook}: {plugin} returned unchanged in {us:.1f} us",
    }

    def __init__(self) -> None:
        own = [h for h in trace_logger.handlers if isinstance(h, _StderrHandler)]
        if len(own) < len(trace_logger.handlers):  # a handler of the user's own gets the lines instead
            for handler in own:
                trace_logger.removeHandler(handler)
            if own:
                trace_logger.propagate = True  # undo what the earlier stderr handler set
        elif not own:
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("torchplug.trace: %(message)s"))
            trace_logger.addHandler(handler)
            trace_logger.propagate = False  # configured logging would print every line twice
        if trace_logger.getEffectiveLevel() > logging.INFO:
            trace_logger.setLevel(logging.INFO)

    def record(self, hook: str, owner: dict[str, Any], outcome: str, start: tuple[int, int]) -> None:
        us = (time.perf_counter_ns() - start[0]) / 1e3
        template = self.MESSAGES.get(outcome, "{hook}: {plugin} {outcome} in {us:.1f} us")
        trace_logger.info("%s%s", _rank_prefix(),
                          template.format(hook=hook, plugin=owner["plugin"], outcome=outcome, us=us))

    def unanswered(self, hook: str) -> None:
        trace_logger.info("%s%s: no implementation", _rank_prefix(), hook)


def _rank_prefix() -> str:
    rank = _dist_rank()
    return "" if rank is None else f"[rank {rank}] "


def _dist_rank() -> int | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return None


class _CollectiveCounter:
    """Counts calls of :data:`COLLECTIVES` while at least one file trace is open, by replacing
    them in the ``torch.distributed`` namespace with counting wrappers (put back when the last
    trace closes, unless something replaced them again since)."""

    def __init__(self) -> None:
        self.count = 0
        self._users = 0
        self._installed: dict[str, tuple[Caller, Caller]] = {}

    def acquire(self) -> None:
        self._users += 1
        if self._users > 1:
            return
        import torch.distributed as dist

        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if callable(original):
                wrapper = self._counting(original)
                setattr(dist, name, wrapper)
                self._installed[name] = (original, wrapper)

    def release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        import torch.distributed as dist

        for name, (original, wrapper) in self._installed.items():
            if getattr(dist, name, None) is wrapper:
                setattr(dist, name, original)
        self._installed.clear()

    def _counting(self, original: Caller) -> Caller:
        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

        return counted


_COLLECTIVES = _CollectiveCounter()


class _FileTrace(_Tracer):
    """``TORCHPLUG_TRACE=<path>.json``: spans kept in memory, written by :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.rank: int | None = None
        # Wall-clock microseconds from the monotonic clock: spans of several processes line up.
        self._offset_ns = time.time_ns() - time.perf_counter_ns()
        self._started = time.time()
        self._written: tuple[Path, int] | None = None
        self._open = False
        self._lock = threading.Lock()
        self._reopen()

    def _reopen(self) -> None:
        with self._lock:
            if not self._open:
                self._open = True
                _COLLECTIVES.acquire()

    def start(self) -> tuple[int, int]:
        return time.perf_counter_ns(), _COLLECTIVES.count

    def record(self, hook: str, owner: dict[str, Any], outcome: str, start: tuple[int, int]) -> None:
        end = time.perf_counter_ns()
        args = dict(owner)
        args["outcome"] = outcome
        args["collectives"] = _COLLECTIVES.count - start[1]
        self.events.append({
            "name": hook, "cat": "hook", "ph": "X",
            "ts": (start[0] + self._offset_ns) / 1e3, "dur": (end - start[0]) / 1e3,
            "pid": os.getpid(), "tid": threading.get_native_id(), "args": args,
        })
        if self.rank is None:
            self.rank = _dist_rank()  # remembered: the process group may be gone at close
        if not self._open:
            self._reopen()  # hooks called after close_trace: count again, the next close writes them

    def target(self) -> Path:
        rank = _dist_rank()
        if rank is None:
            rank = self.rank
        if not rank:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")

    def close(self) -> Path:
        with self._lock:
            was_open, self._open = self._open, False
        if was_open:
            _COLLECTIVES.release()
        target = self.target()
        if self._written != (target, len(self.events)):
            self._write(target)
            self._written = (target, len(self.events))
        return target

    def close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as exc:  # at garbage collection or interpreter exit: say it, do not raise
            sys.stderr.write(f"torchplug.trace: could not write {self.path}: {type(exc).__name__}: {exc}\n")

    def _write(self, target: Path) -> None:
        pid = os.getpid()
        rank = self.rank if self.rank is not None else _dist_rank()
        label = "torchplug" if rank is None else f"torchplug rank {rank}"
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}},
        ]
        # Another process of this run may have written this file already (the launching process
        # and the rank-0 worker it spawned both write `path`): keep its events.
        events += [event for event in self._existing(target) if event.get("pid") != pid]
        events += self.events
        document = {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"producer": "torchplug TORCHPLUG_TRACE", "collectives_counted": list(COLLECTIVES)},
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{pid}.tmp")
        partial.write_text(json.dumps(document), encoding="utf-8")
        os.replace(partial, target)

    def _existing(self, target: Path) -> list[dict[str, Any]]:
        try:
            if target.stat().st_mtime < self._started:
                return []  # an earlier run's file
            events = json.loads(target.read_text(encoding="utf-8")).get("traceEvents", [])
        except (OSError, ValueError, AttributeError):
            return []
        return [event for event in events if isinstance(event, dict)] if isinstance(events, list) else []


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _plugin_info(pm: pluggy.PluginManager) -> dict[str, dict[str, Any]]:
    """Each registered plugin's name, distribution and version, for the trace-event file."""
    records = {rec.name: rec for rec in getattr(pm, "records", ())}
    info: dict[str, dict[str, Any]] = {}
    for name, plugin in pm.list_name_plugin():
        entry = {"plugin": name, "version": "passed object"}
        ep = getattr(records.get(name), "entry_point", None)
        if ep is not None:
            entry.update(distribution=ep.dist_name, version=ep.dist_version)
        else:
            module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
            for dist in _packages_distributions().get(module.partition(".")[0], [])[:1]:
                try:
                    entry.update(distribution=dist, version=importlib.metadata.version(dist))
                except importlib.metadata.PackageNotFoundError:
                    pass
        info[name] = entry
    return info


def _traced(name: str, hook: pluggy.HookCaller, impls: list[pluggy.HookImpl], firstresult: bool,
            tracer: _Tracer, plugins: dict[str, dict[str, Any]]) -> Caller:
    def owner(plugin_name: str) -> dict[str, Any]:
        return plugins.get(plugin_name) or {"plugin": plugin_name}

    if name in CHAINED_HOOKS:
        return _traced_chain(name, [(owner(i.plugin_name), i.function, i.argnames) for i in reversed(impls)], tracer)
    if any(impl.wrapper or impl.hookwrapper for impl in impls):
        involved = [owner(impl.plugin_name) for impl in reversed(impls)]
        wrapped: dict[str, Any] = {"plugin": ", ".join(o["plugin"] for o in involved)}
        if plugins:
            wrapped["plugins"] = involved

        def via_pluggy(**kwargs: Any) -> Any:
            start = tracer.start()
            try:
                result = hook(**kwargs)
            except BaseException as exc:
                tracer.record(name, wrapped, f"raised {type(exc).__name__}", start)
                raise
            tracer.record(name, wrapped, "wrapped", start)
            return result

        return via_pluggy

    ordered = [(owner(impl.plugin_name), impl.function, impl.argnames) for impl in reversed(impls)]

    def traced(**kwargs: Any) -> Any:
        if not ordered:
            tracer.unanswered(name)
        results = []
        for who, function, argnames in ordered:
            start = tracer.start()
            try:
                result = function(*[kwargs[a] for a in argnames])
            except BaseException as exc:
                tracer.record(name, who, f"raised {type(exc).__name__}", start)
                raise
            if firstresult and result is not None:
                tracer.record(name, who, "answered", start)
                return result
            tracer.record(name, who, "deferred" if firstresult else "ran", start)
            if result is not None:
                results.append(result)
        return None if firstresult else results

    return traced


def _traced_chain(name: str, steps: list[tuple[dict[str, Any], Caller, tuple[str, ...]]], tracer: _Tracer) -> Caller:
    def chain(*, model: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not steps:
            tracer.unanswered(name)
        for who, function, argnames in steps:
            kwargs = {"model": model, "args": args}
            start = tracer.start()
            try:
                result = function(*[kwargs[a] for a in argnames])
            except BaseException as exc:
                tracer.record(name, who, f"raised {type(exc).__name__}", start)
                raise
            tracer.record(name, who, "unchanged" if result is None else "new args", start)
            if result is not None:
                if not isinstance(result, tuple):
                    raise _not_args(name, who["plugin"], result)
                args = result
        return args

    return chain
