"""``TORCHPLUG_TRACE=1``: every hook call is logged (logger ``torchplug.trace``) with the plugin
that answered and its duration."""

from __future__ import annotations

import logging
import re
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torchplug import Plugin, Trainer, TrainingModule, hookimpl
from torchplug.hookcalls import Hooks
from torchplug.manager import get_plugin_manager

DURATION = r"in \d+\.\d us"


def trace_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "torchplug.trace"]


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


def test_trace_env_logs_plugin_and_duration(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TORCHPLUG_TRACE", "1")
    hooks = Hooks(get_plugin_manager([Deferring(), Answering()], autoload=False, env={}))
    assert hooks.trace
    caplog.set_level(logging.INFO, logger="torchplug.trace")

    assert hooks.world_size() == 1
    assert hooks.global_rank() == 3
    hooks.on_fit_start(trainer=None, model=None)
    hooks.on_before_forward(model=nn.Linear(1, 1), args=(torch.zeros(1), 0))
    lines = trace_lines(caplog)
    assert re.fullmatch(rf"world_size: deferring deferred {DURATION}", lines[0])
    assert re.fullmatch(rf"world_size: answered by torchplug\.defaults {DURATION}", lines[1])
    assert re.fullmatch(rf"global_rank: answered by answering {DURATION}", lines[2])
    assert lines[3] == "on_fit_start: no implementation"
    assert re.fullmatch(rf"on_before_forward: answering returned new args {DURATION}", lines[4])
    assert re.fullmatch(rf"on_before_forward: torchplug\.defaults returned new args {DURATION}", lines[5])
    assert len(lines) == 6


def test_trace_of_wrapped_and_all_called_hooks(caplog: pytest.LogCaptureFixture) -> None:
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
    caplog.set_level(logging.INFO, logger="torchplug.trace")
    assert hooks.world_size() == 2
    assert hooks.barrier(name="x") == []
    lines = trace_lines(caplog)
    assert re.fullmatch(rf"world_size: wrapped call through wrap, torchplug\.defaults {DURATION}", lines[0])
    assert re.fullmatch(rf"barrier: barrier-plugin ran {DURATION}", lines[1])


def test_no_trace_by_default(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("TORCHPLUG_TRACE", raising=False)
    caplog.set_level(logging.INFO, logger="torchplug.trace")
    hooks = Hooks(get_plugin_manager(autoload=False, env={}))
    assert not hooks.trace
    hooks.world_size()
    assert trace_lines(caplog) == []
    monkeypatch.setenv("TORCHPLUG_TRACE", "0")
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


def test_trace_during_a_fit(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHPLUG_TRACE", "1")
    caplog.set_level(logging.INFO, logger="torchplug.trace")
    trainer = Trainer(max_steps=2, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, autoload_plugins=False)
    trainer.fit(Tiny(), [torch.randn(4, 2) for _ in range(2)])
    lines = trace_lines(caplog)
    steps = [line for line in lines if line.startswith("optimizer_step:")]
    assert len(steps) == 2
    assert all(re.fullmatch(rf"optimizer_step: answered by torchplug\.defaults {DURATION}", s) for s in steps)
    hooks_seen = {line.split(":")[0] for line in lines}
    assert {"launch", "setup_environment", "configure_ddp", "on_before_forward", "forward_context", "backward",
            "teardown_environment"} <= hooks_seen
