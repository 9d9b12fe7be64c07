"""Tracing hook calls: ``TORCHPLUG_TRACE``, read when a Trainer's :class:`~torchplug.hookcalls.Hooks`
are built (unset: no tracing, and no cost per call: the callers are the plain ones).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

from torchplug.hookspecs import CHAINED_HOOKS

TRACE_ENV = "TORCHPLUG_TRACE"
trace_logger = logging.getLogger("torchplug.trace")

#: The ``torch.distributed`` functions a file trace counts (those that exist in this torch).
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
    "all_gather_single", "reduce_scatter_single",  # what FSDP2 issues (torch 2.13)
    "broadcast_object_list", "all_gather_object", "barrier", "monitored_barrier", "reduce", "scatter", "gather",
)

Caller = Callable[..., Any]


def not_args(name: str, plugin_name: str, result: Any) -> TypeError:
    return TypeError(
        f"Plugin '{plugin_name}': {name} must return the step arguments as a tuple "
        f"(e.g. (batch, batch_idx)) or None for unchanged, got {type(result).__name__}"
    )


_OFF = ("", "0", "false", "no", "off")


def trace_mode(value: bool | str | os.PathLike[str]) -> tuple[bool, Path | None]:
    """(stderr trace?, trace-event file) for a ``TORCHPLUG_TRACE`` value or a ``trace=`` argument."""
    if isinstance(value, bool):
        return value, None
    text = os.fspath(value).strip()
    if text.lower().endswith(".json"):
        return False, Path(text).expanduser().absolute()
    return text.lower() not in _OFF, None


class Tracer:
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


class TextTrace(Tracer):
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


class FileTrace(Tracer):
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


def plugin_info(pm: pluggy.PluginManager) -> dict[str, dict[str, Any]]:
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


def traced(name: str, hook: pluggy.HookCaller, impls: list[pluggy.HookImpl], firstresult: bool,
            tracer: Tracer, plugins: dict[str, dict[str, Any]]) -> Caller:
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


def _traced_chain(name: str, steps: list[tuple[dict[str, Any], Caller, tuple[str, ...]]], tracer: Tracer) -> Caller:
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
                    raise not_args(name, who["plugin"], result)
                args = result
        return args

    return chain
