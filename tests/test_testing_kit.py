"""torchplug.testing: the fixtures plugin authors get, the hook recorder, the tiny model, and
fresh environments sharing one torch."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from torchplug import Plugin, PluginConflictError, PluginValidationError, Trainer, hookimpl
from torchplug.hookspecs import HOOK_NAMES
from torchplug.testing import venv
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader
from torchplug.testing.recorder import HookRecorder

QUIET: dict[str, Any] = {"max_epochs": 1, "enable_progress_bar": False, "logger": False,
                         "enable_checkpointing": False, "autoload_plugins": False}


class Precision(Plugin):
    role = "precision"


def test_torchplug_pm_has_only_the_defaults(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.setenv("TORCHPLUG_PLUGINS", "no_such_plugin")  # would raise if it were read
    pm = request.getfixturevalue("torchplug_pm")
    assert [rec.name for rec in pm.records] == ["torchplug.defaults"]


def test_register_plugin_validates_like_a_trainer(torchplug_pm: Any, register_plugin: Any) -> None:
    class Typo(Plugin):
        def clip_gradient(self, optimizer: Any) -> None: ...

    with pytest.raises(PluginValidationError, match="clip_gradient"):
        register_plugin(Typo())
    register_plugin(Precision(), name="first")
    with pytest.raises(PluginConflictError, match="Two precision plugins"):
        register_plugin(Precision(), name="second")
    assert [rec.name for rec in torchplug_pm.records] == ["torchplug.defaults", "first"]


def test_registered_plugin_answers_hooks(torchplug_pm: Any, register_plugin: Any) -> None:
    class Unwrap:
        @hookimpl
        def get_model_from_plugin(self, model: Any) -> str:
            return "unwrapped"

    register_plugin(Unwrap())
    assert torchplug_pm.hook.get_model_from_plugin(model=torch.nn.Linear(1, 1)) == "unwrapped"


def test_recorder_implements_every_hook(torchplug_pm: Any) -> None:
    recorder = HookRecorder().register(torchplug_pm)
    assert sorted(caller.name for caller in torchplug_pm.get_hookcallers(recorder)) == sorted(HOOK_NAMES)


def test_recorder_records_a_fit_without_changing_it(hook_recorder: HookRecorder) -> None:
    plain, recorded = TinyMLP(), TinyMLP()
    Trainer(**QUIET, accumulate_grad_batches=2, gradient_clip_val=1.0).fit(plain, tiny_loader())
    Trainer(plugins=[hook_recorder], **QUIET, accumulate_grad_batches=2, gradient_clip_val=1.0).fit(
        recorded, tiny_loader())
    assert torch.equal(parameters_vector(plain), parameters_vector(recorded))
    counts = hook_recorder.counts()
    assert counts["on_before_forward"] == counts["backward"] == 8
    assert counts["clip_gradients"] == counts["optimizer_step"] == 4
    assert counts["block_backward_sync"] == 4  # entered for the first micro-batch of each window
    clip = hook_recorder.getcalls("clip_gradients")[0]
    assert clip.kwargs == {"grad_clip_val": "1.0", "optimizer": "SGD", "norm_type": "2.0"}
    assert clip.result == "Tensor(shape=[], dtype=float32, device=cpu)"
    assert hook_recorder.names()[:2] == ["check_configuration", "launch"]
    hook_recorder.assert_fired("setup_environment", "on_fit_end", "teardown_environment")
    with pytest.raises(AssertionError, match="on_exception"):
        hook_recorder.assert_fired("on_exception")


def test_recorder_reports_errors_and_writes_every_process(tmp_path: Path) -> None:
    recorder = HookRecorder(tmp_path / "calls")

    class Boom(Plugin):
        def on_train_epoch_start(self) -> None:
            raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        Trainer(plugins=[Boom(), recorder], **QUIET).fit(TinyMLP(), tiny_loader())
    (call,) = recorder.getcalls("on_train_epoch_start")
    assert call.error == "RuntimeError: boom"
    copy = pickle.loads(pickle.dumps(recorder))  # what a worker process gets
    assert copy.calls == []
    assert copy.path == recorder.path
    on_disk = recorder.by_process()
    assert [c.name for c in on_disk[call.pid]] == recorder.names()


def test_tiny_model_and_data_are_deterministic_and_picklable(tiny_module: TinyMLP, tiny_loader: Any) -> None:
    assert torch.equal(parameters_vector(tiny_module), parameters_vector(TinyMLP()))
    copy = pickle.loads(pickle.dumps(tiny_module))
    assert torch.equal(parameters_vector(copy), parameters_vector(tiny_module))
    assert len(tiny_loader) == 8
    first = next(iter(tiny_loader))
    assert torch.equal(first[0], next(iter(pickle.loads(pickle.dumps(tiny_loader))))[0])
    trainer = Trainer(**{**QUIET, "max_epochs": 20})
    trainer.fit(tiny_module, tiny_loader, tiny_loader)
    assert trainer.callback_metrics["val_loss"] < 0.5  # learnable


def test_venv_shares_torch_and_nothing_else(tmp_path: Path) -> None:
    python = venv.create(tmp_path / "env", share=("torch",))
    probe = ("import importlib.util, torch; print(torch.__version__); "
             "print(importlib.util.find_spec('torchplug') is None, importlib.util.find_spec('pluggy') is None)")
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    assert out == [torch.__version__, "True", "True"]  # the running env's editable torchplug does not leak
    listed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "list", "--format=freeze"],
                            check=True, capture_output=True, text=True).stdout
    assert f"torch=={torch.__version__}" in listed  # pip sees it as installed: it never resolves torch again
