"""``TORCHPLUG_TRACE``: ``=1`` prints every hook call on stderr (through logger
``torchplug.trace``, no logging setup needed) with the plugin that answered and its duration;
``=<path>.json`` writes a Chrome/Perfetto trace-event file, one span per implementation call,
with the plugin's version and the ``torch.distributed`` collectives issued inside."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from torchplug import Plugin, Trainer, TrainingModule, hookimpl, hookspecs, trace
from torchplug.hookcalls import Hooks
from torchplug.manager import get_plugin_manager
from torchplug.testing.models import TinyMLP, tiny_loader
from torchplug.testing.recorder import HookRecorder

DURATION = r"in \d+\.\d us"
PREFIX = "torchplug.trace: "


@pytest.fixture(autouse=True)
def _restore_trace_logger() -> Iterator[None]:
    """Tracing to stderr gives logger ``torchplug.trace`` a handler and stops its propagation:
    undo that after each test, so every test sees a logger in its initial state."""
    logger = logging.getLogger("torchplug.trace")
    state = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = state[0]
    logger.propagate, logger.level = state[1], state[2]


def trace_lines(err: str) -> list[str]:
    return [line.removeprefix(PREFIX) for line in err.splitlines() if line.startswith(PREFIX)]


class Deferring(Plugin):
    plugin_name = "deferring"

    def world_size(self) -> None:
        return None


class Answering(Plugin):
    plugin_name = "answering"

    def global_rank(self) -> int:
        return 3

    def on_before_forward(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return args


# --------------------------------------------------------------------------------------------
# TORCHPLUG_TRACE=1: lines on stderr
# --------------------------------------------------------------------------------------------


def test_trace_env_prints_plugin_and_duration(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCHPLUG_TRACE", "1")
    hooks = Hooks(get_plugin_manager([Deferring(), Answering()], autoload=False, env={}))
    assert hooks.trace
    assert hooks.trace_path is None

    assert hooks.world_size() == 1
    assert hooks.global_rank() == 3
    hooks.on_fit_start(trainer=None, model=None)  # type: ignore[arg-type]
    hooks.on_before_forward(model=nn.Linear(1, 1), args=(torch.zeros(1), 0))
    lines = trace_lines(capsys.readouterr().err)
    assert re.fullmatch(rf"world_size: deferring deferred {DURATION}", lines[0])
    assert re.fullmatch(rf"world_size: answered by torchplug\.defaults {DURATION}", lines[1])
    assert re.fullmatch(rf"global_rank: answered by answering {DURATION}", lines[2])
    assert lines[3] == "on_fit_start: no implementation"
    assert re.fullmatch(rf"on_before_forward: answering returned new args {DURATION}", lines[4])
    assert re.fullmatch(rf"on_before_forward: torchplug\.defaults returned new args {DURATION}", lines[5])
    assert len(lines) == 6
    assert hooks.close_trace() is None  # nothing to write


@pytest.mark.parametrize("value", ["true", "YES", " 1 "])
def test_trace_env_spellings(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TORCHPLUG_TRACE", value)
    assert Hooks(get_plugin_manager(autoload=False, env={})).trace


def test_trace_of_wrapped_and_all_called_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    class Wrap:
        @hookimpl(wrapper=True)
        def world_size(self) -> Generator[None, int, int]:
            return (yield) + 1

    class Barrier(Plugin):
        plugin_name = "barrier-plugin"

        def barrier(self, name: str) -> None:
            pass

    pm = get_plugin_manager([Barrier()], autoload=False, env={})
    pm.register(Wrap(), name="wrap")
    hooks = Hooks(pm, trace=True)
    assert hooks.world_size() == 2
    assert hooks.barrier(name="x") == []
    lines = trace_lines(capsys.readouterr().err)
    assert re.fullmatch(rf"world_size: wrapped call through wrap, torchplug\.defaults {DURATION}", lines[0])
    assert re.fullmatch(rf"barrier: barrier-plugin ran {DURATION}", lines[1])


def test_trace_lines_are_not_printed_twice_with_logging_configured(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # logging.basicConfig(), as a script would
    handler.setFormatter(logging.Formatter("ROOT %(name)s %(message)s"))
    root.addHandler(handler)
    try:
        hooks = Hooks(get_plugin_manager(autoload=False, env={}), trace=True)
        hooks.world_size()
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert len(trace_lines(err)) == 1
    assert "ROOT" not in err


def test_a_handler_of_the_users_own_gets_the_lines_instead(capsys: pytest.CaptureFixture[str]) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("torchplug.trace")
    logger.addHandler(handler)
    hooks = Hooks(get_plugin_manager(autoload=False, env={}), trace=True)
    hooks.global_rank()
    assert len(records) == 1
    assert re.fullmatch(rf"global_rank: answered by torchplug\.defaults {DURATION}", records[0].getMessage())
    assert logger.handlers == [handler]
    assert logger.propagate  # left as the user set it up
    assert trace_lines(capsys.readouterr().err) == []


def test_no_trace_by_default(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TORCHPLUG_TRACE", raising=False)
    barrier = dist.barrier
    hooks = Hooks(get_plugin_manager(autoload=False, env={}))
    assert not hooks.trace
    assert hooks.trace_path is None
    # the plain callers: a direct call for one implementation, no tracing wrapper, nothing counted
    assert hooks.world_size.__qualname__ == "direct.<locals>.call"
    assert hooks.on_before_forward.__qualname__ == "chained.<locals>.chain"
    assert dist.barrier is barrier
    hooks.world_size()
    assert trace_lines(capsys.readouterr().err) == []
    assert hooks.close_trace() is None
    for value in ("0", "false", "no", "off", ""):
        monkeypatch.setenv("TORCHPLUG_TRACE", value)
        assert not Hooks(get_plugin_manager(autoload=False, env={})).trace


class Tiny(TrainingModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.layer(batch).pow(2).mean()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trace_during_a_fit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHPLUG_TRACE", "1")
    trainer = Trainer(max_steps=2, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, autoload_plugins=False)
    trainer.fit(Tiny(), [torch.randn(4, 2) for _ in range(2)])
    lines = trace_lines(capsys.readouterr().err)
    steps = [line for line in lines if line.startswith("optimizer_step:")]
    assert len(steps) == 2
    assert all(re.fullmatch(rf"optimizer_step: answered by torchplug\.defaults {DURATION}", s) for s in steps)
    hooks_seen = {line.split(":")[0] for line in lines}
    assert {"launch", "setup_environment", "configure_ddp", "on_before_forward", "forward_context", "backward",
            "teardown_environment"} <= hooks_seen


FIT_SCRIPT = textwrap.dedent("""
    import logging
    from torchplug import Trainer
    from torchplug.testing.models import TinyMLP, tiny_loader

    def fit():
        Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                autoload_plugins=False).fit(TinyMLP(), tiny_loader(n=16))

    fit()                                  # no logging configuration at all
    print("--- basicConfig", flush=True)
    logging.basicConfig(level=logging.INFO, format="LOGGED %(name)s: %(message)s")
    fit()                                  # configured logging: still once per call
""")


def test_trace_env_prints_on_stderr_of_a_plain_script(tmp_path: Path) -> None:
    env = {**os.environ, "TORCHPLUG_TRACE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FIT_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    lines = trace_lines(done.stderr)
    steps = [line for line in lines if line.startswith("optimizer_step:")]
    assert len(steps) == 4, done.stderr  # two fits of two steps, each line once
    assert all(re.fullmatch(rf"optimizer_step: answered by torchplug\.defaults {DURATION}", s) for s in steps)
    assert "LOGGED torchplug.trace" not in done.stderr
    assert "torchplug.trace" not in done.stdout


# --------------------------------------------------------------------------------------------
# TORCHPLUG_TRACE=<path>.json: a trace-event file
# --------------------------------------------------------------------------------------------


def _trainer(**kwargs: Any) -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, autoload_plugins=False,
                   **kwargs)


def _spans(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    spans = [event for event in document["traceEvents"] if event["ph"] == "X"]
    for span in spans:
        assert span["name"] in hookspecs.HOOK_NAMES
        assert isinstance(span["ts"], (int, float))
        assert isinstance(span["dur"], (int, float))
        assert span["dur"] >= 0
        assert span["pid"] == os.getpid()
        assert isinstance(span["tid"], int)
        assert span["args"]["plugin"]
        assert isinstance(span["args"]["collectives"], int)
    return spans


def test_json_trace_has_one_span_per_hook_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    monkeypatch.setenv("TORCHPLUG_TRACE", str(path))
    recorder = HookRecorder()
    trainer = _trainer(max_steps=3, plugins=[recorder], default_root_dir=tmp_path)
    assert trainer.hooks.trace
    assert trainer.hooks.trace_path == path
    trainer.fit(TinyMLP(), tiny_loader(n=32))
    assert trainer.hooks.close_trace() == path

    spans = _spans(path)
    counts = Counter(span["name"] for span in spans)
    recorded = recorder.counts()
    assert recorded["optimizer_step"] == 3
    for hook in hookspecs.HOOK_NAMES:
        if hook in hookspecs.CHAINED_HOOKS:
            # called implementation by implementation: the recorder's and the default's
            assert counts[hook] == 2 * recorded[hook], hook
        else:
            assert counts[hook] == recorded[hook], hook  # one span per pluggy call (the recorder wraps)
    steps = [span for span in spans if span["name"] == "optimizer_step"]
    assert {span["args"]["plugin"] for span in steps} == {"hook_recorder, torchplug.defaults"}
    assert {p["plugin"] for p in steps[0]["args"]["plugins"]} == {"hook_recorder", "torchplug.defaults"}
    assert all(span["args"]["collectives"] == 0 for span in spans)  # one process, no group


class Stepper(Plugin):
    """A user's object plugin (defined in a test module: no distribution)."""

    plugin_name = "stepper"

    def optimizer_step(self, optimizers: list[torch.optim.Optimizer]) -> bool | None:
        return None  # defer to the default


def test_json_trace_names_plugins_and_versions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "t.json"
    monkeypatch.setenv("TORCHPLUG_TRACE", str(path))
    trainer = _trainer(max_steps=2, plugins=[Stepper()], default_root_dir=tmp_path)
    trainer.fit(TinyMLP(), tiny_loader(n=16))
    trainer.hooks.close_trace()

    spans = _spans(path)
    steps = [span["args"] for span in spans if span["name"] == "optimizer_step"]
    # one span per implementation call: the plugin defers, the default answers, each step
    assert [(a["plugin"], a["outcome"]) for a in steps] == [("stepper", "deferred"),
                                                            ("torchplug.defaults", "answered")] * 2
    assert steps[0]["version"] == "passed object"
    assert steps[1]["distribution"] == "torchplug"
    assert steps[1]["version"] == importlib.metadata.version("torchplug")
    counts = Counter(span["name"] for span in spans)
    assert counts["backward"] == counts["forward_context"] == 2
    assert counts["launch"] == 1
    assert counts["on_fit_start"] == 0  # no implementation: no implementation call, no span
    (launch,) = [span for span in spans if span["name"] == "launch"]
    assert all(launch["ts"] <= s["ts"] and s["ts"] + s["dur"] <= launch["ts"] + launch["dur"] + 1
               for s in spans if s["name"] not in ("launch", "check_configuration"))


def test_close_trace_is_idempotent_and_later_calls_are_added(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    hooks = Hooks(get_plugin_manager(autoload=False, env={}), trace=str(path))
    hooks.world_size()
    assert hooks.close_trace() == path
    first = path.read_text(encoding="utf-8")
    assert hooks.close_trace() == path
    assert path.read_text(encoding="utf-8") == first
    assert len(_spans(path)) == 1
    hooks.global_rank()  # after close: kept, written by the next close
    hooks.close_trace()
    assert [span["name"] for span in _spans(path)] == ["world_size", "global_rank"]


def test_other_ranks_write_their_own_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trace, "_dist_rank", lambda: 2)
    hooks = Hooks(get_plugin_manager(autoload=False, env={}), trace=str(tmp_path / "t.json"))
    hooks.world_size()
    assert hooks.close_trace() == tmp_path / "t.rank2.json"
    assert not (tmp_path / "t.json").exists()
    with open(tmp_path / "t.rank2.json", encoding="utf-8") as f:
        names = [e["args"]["name"] for e in json.load(f)["traceEvents"] if e["ph"] == "M"]
    assert names == ["torchplug rank 2"]


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class BarrierAtEpochEnd(Plugin):
    plugin_name = "barrier_at_epoch_end"

    def on_train_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        dist.barrier()
        tensor = torch.ones(1)
        dist.all_reduce(tensor)


@pytest.mark.usefixtures("one_rank_group")
def test_json_trace_counts_collectives_issued_in_a_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    originals = {name: getattr(dist, name) for name in trace.COLLECTIVES}
    path = tmp_path / "t.json"
    monkeypatch.setenv("TORCHPLUG_TRACE", str(path))
    trainer = _trainer(max_epochs=2, plugins=[BarrierAtEpochEnd()], default_root_dir=tmp_path)
    assert dist.barrier is not originals["barrier"]  # counting while the trace is open
    trainer.fit(TinyMLP(), tiny_loader(n=16))
    assert trainer.hooks.close_trace() == path  # rank 0 writes exactly `path`
    assert {name: getattr(dist, name) for name in trace.COLLECTIVES} == originals  # restored

    spans = _spans(path)
    epoch_ends = [span for span in spans if span["name"] == "on_train_epoch_end"]
    assert [(s["args"]["plugin"], s["args"]["collectives"]) for s in epoch_ends] == [("barrier_at_epoch_end", 2)] * 2
    (launch,) = [span for span in spans if span["name"] == "launch"]
    assert launch["args"]["collectives"] == 4  # spans are inclusive: launch holds the whole fit
    others = [span for span in spans if span["name"] not in ("on_train_epoch_end", "launch")]
    assert others
    assert all(span["args"]["collectives"] == 0 for span in others)
