"""``HookRecorder``: a plugin that records every hook call, in every process of a run.

It implements every hook of :mod:`torchplug.hookspecs` without changing anything: firstresult
and all-called hooks as pluggy wrappers (``wrapper=True``: they see every call whatever the
call order and never supply a result), chained hooks (``on_before_forward``, see
:data:`torchplug.hookspecs.CHAINED_HOOKS`: they cannot be wrappers) as ``tryfirst``
implementations returning ``None``. Pass it like any plugin, so the Trainer's call sites include
it::

    recorder = HookRecorder()
    Trainer(plugins=[MyPlugin(), recorder]).fit(model, loader)
    assert recorder.counts()["clip_gradients"] == trainer.global_step

A Trainer pickles its plugins into the worker processes it starts (``devices=2``); give the
recorder a folder (``HookRecorder(path)``) and every process appends its calls there as JSON
lines, read back with :meth:`HookRecorder.by_process`.
"""

from __future__ import annotations

import inspect
import json
import os
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torchplug import hookspecs
from torchplug.hookspecs import CHAINED_HOOKS, hookimpl
from torchplug.plugin import Plugin


@dataclass
class HookCall:
    """One hook call: the hook, a short text for each argument, and where it ran."""

    name: str
    kwargs: dict[str, str]
    pid: int
    rank: int | None = None
    #: what the other implementations returned (wrapped hooks), as a short text
    result: str | None = None
    #: the exception that ended the call, as ``Type: message``
    error: str | None = None


class HookRecorder(Plugin):
    """Records ``HookCall``\\ s for every hook call of the Trainer (or manager) it is registered in.

    :param path: a folder; when given, every process (also spawned workers that received a
        pickled copy) appends its calls to ``path/hookcalls-<pid>.jsonl``.
    """

    plugin_name = "hook_recorder"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.calls: list[HookCall] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}  # the calls belong to this process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"HookRecorder({len(self.calls)} calls)"

    # -- queries -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Hook names in call order (this process)."""
        return [call.name for call in self.calls]

    def counts(self) -> Counter[str]:
        return Counter(self.names())

    def fired(self) -> set[str]:
        return set(self.names())

    def getcalls(self, *names: str) -> list[HookCall]:
        return [call for call in self.calls if call.name in names]

    def assert_fired(self, *names: str) -> None:
        """Fail naming every hook of ``names`` that was never called in this process."""
        missing = [name for name in names if name not in self.fired()]
        if missing:
            raise AssertionError(f"hooks never called: {', '.join(missing)}; called: {', '.join(sorted(self.fired()))}")

    def by_process(self) -> dict[int, list[HookCall]]:
        """Calls of every process that recorded into ``path`` (this one included), by pid."""
        if self.path is None:
            return {os.getpid(): list(self.calls)}
        result: dict[int, list[HookCall]] = {}
        for file in sorted(self.path.glob("hookcalls-*.jsonl")):
            with open(file, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        call = HookCall(**json.loads(line))
                        result.setdefault(call.pid, []).append(call)
        return result

    def clear(self) -> None:
        self.calls.clear()
        if self.path is not None:
            for file in self.path.glob("hookcalls-*.jsonl"):
                file.unlink()

    def register(self, pm: Any) -> HookRecorder:
        """Register on a plugin manager (:func:`torchplug.get_plugin_manager`'s or a pluggy one)."""
        if hasattr(pm, "register_plugin"):
            pm.register_plugin(self, self.plugin_name, "object")
        else:
            pm.register(self, name=self.plugin_name)
        return self

    # -- recording ---------------------------------------------------------------------------
    def _record(self, name: str, kwargs: dict[str, Any]) -> HookCall:
        call = HookCall(name, {k: summarize(v) for k, v in kwargs.items()}, os.getpid(), _rank())
        self.calls.append(call)
        if self.path is not None:
            self._write(call)
        return call

    def _write(self, call: HookCall) -> None:
        # Open, append, close: no handle to leak, and a process killed mid-run loses nothing.
        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"hookcalls-{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(call)) + "\n")

    def _wrap(self, name: str, kwargs: dict[str, Any]) -> Generator[None, Any, Any]:
        call = self._record(name, kwargs)
        try:
            result = yield
        except BaseException as exc:
            call.error = f"{type(exc).__name__}: {exc}"[:200]
            raise
        call.result = summarize(result)
        return result


def summarize(value: Any) -> str:
    """A short, stable text for a hook argument (tensors by shape and dtype, objects by class)."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"Tensor(shape={list(value.shape)}, dtype={dtype}, device={value.device})"
    if isinstance(value, torch.device):
        return f"device({str(value)!r})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(summarize(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        keys = ", ".join(map(str, list(value)[:8])) + (", ..." if len(value) > 8 else "")
        return f"dict(keys=[{keys}])"
    if inspect.isfunction(value) or inspect.ismethod(value) or hasattr(value, "func"):
        return f"callable {getattr(value, '__qualname__', type(value).__name__)}"
    return type(value).__name__


def _rank() -> int | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return None


def _make_impl(name: str, argnames: tuple[str, ...]) -> Callable[..., Any]:
    """A method with exactly the hook's argument names (pluggy passes arguments by name and
    only those a signature asks for), recording them all."""
    params = "".join(f", {a}" for a in argnames)
    captured = "{" + ", ".join(f"{a!r}: {a}" for a in argnames) + "}"
    if name in CHAINED_HOOKS:
        source = f"def {name}(self{params}):\n    self._record({name!r}, {captured})\n"
    else:
        source = f"def {name}(self{params}):\n    return (yield from self._wrap({name!r}, {captured}))\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<HookRecorder.{name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    function.__qualname__ = f"HookRecorder.{name}"
    function.__doc__ = f"Records calls of ``{name}``."
    if name in CHAINED_HOOKS:
        return hookimpl(tryfirst=True)(function)
    return hookimpl(wrapper=True)(function)


def _argnames(name: str) -> tuple[str, ...]:
    return tuple(inspect.signature(getattr(hookspecs, name)).parameters)


for _name in hookspecs.HOOK_NAMES:
    setattr(HookRecorder, _name, _make_impl(_name, _argnames(_name)))
del _name
