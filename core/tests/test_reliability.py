"""Reliability and security (issue 9): faults and bad input end with a clear error and lose nothing.

Cases that other test files already cover are listed in .notes/RELIABILITY_TABLE.md (README's
"Reliability" section) and not repeated here. This file adds the missing ones: a plugin that
raises in a hook mid-run (with and without a real process group), a batch the model rejects, a
metrics file that stops being writable, a checkpoint writer killed at random moments, Ctrl-C and
SIGTERM on a two-rank DDP run, every Trainer argument's wrong types and ranges, contradictory
combinations, plugins from the working directory, and ``apex`` in any pyproject.toml.

A test marked ``xfail(strict=True)`` documents a bug that is reported, not yet fixed: it turns
into a failure (XPASS) once the fix lands, so the mark gets removed then.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from plugin_projects.support import make_fake_dist
from reliability_support.common import TinyNet, fds_of, loader, open_files_under, sha256
from torch import nn

from torchplug import (
    MisconfigurationError,
    PlanChangedWarning,
    Plugin,
    PluginConflictError,
    PluginHookError,
    PluginNotFoundError,
    PluginValidationError,
    TorchplugError,
    Trainer,
    hookimpl,
)
from torchplug import checkpoint as ckpt
from torchplug.metrics import read_csv

SUPPORT = Path(__file__).parent / "reliability_support"
REPO = Path(__file__).resolve().parents[2]
LINUX = sys.platform.startswith("linux")


def quiet(root: Path, **kwargs: Any) -> Trainer:
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("autoload_plugins", False)
    return Trainer(default_root_dir=root, **kwargs)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The caller's environment without TORCHPLUG_*/PYTHONPATH, one thread, no autoload."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHPLUG_") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def messages(exc: BaseException) -> str:
    """Every message of ``exc``'s chain, with notes (not the source lines of its frames)."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += traceback.format_exception_only(current)
        current = current.__cause__ or current.__context__
    return "".join(parts)


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(f"*{ckpt.TMP_SUFFIX}"))


# ============================================================================================
# Plugins: a plugin that raises inside a hook
# ============================================================================================


class RaiseInClip(Plugin):
    """Raises in ``clip_gradients`` while optimizer step ``at + 1`` is being taken; records
    ``on_exception`` and a ``trylast`` ``teardown_environment`` (runs after every other one)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.trainer: Trainer | None = None
        self.events: list[str] = []

    def clip_gradients(self, grad_clip_val: float, optimizer: Any, norm_type: float) -> None:
        assert self.trainer is not None
        if self.trainer.global_step == self.at:
            raise ValueError(f"injected failure at global step {self.at}")

    def on_exception(self, exception: BaseException) -> None:
        self.events.append(f"on_exception {type(exception).__name__}")

    @hookimpl(trylast=True)
    def teardown_environment(self) -> None:
        self.events.append("teardown_environment")


@pytest.mark.timeout(60)
def test_hook_error_names_plugin_and_hook_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    # Run 1: one epoch (4 steps) with checkpointing.
    first = quiet(tmp_path, max_epochs=1)
    first.fit(TinyNet(), loader())
    good = Path(first.checkpoint_path or "")
    digest = sha256(good)
    # Run 2 resumes from it, writes its own last.ckpt at the end of epoch 1 (step 8), then a
    # plugin raises in clip_gradients during step 11 (epoch 2).
    raiser = RaiseInClip(at=10)
    second = quiet(tmp_path, max_epochs=4, gradient_clip_val=1.0, plugins=[raiser], log_every_n_steps=1)
    raiser.trainer = second
    with pytest.raises(PluginHookError) as info, pytest.warns(PlanChangedWarning, match="plugin 'RaiseInClip'"):
        second.fit(TinyNet(), loader(), ckpt_path=good)
    assert str(info.value).startswith(
        "Plugin 'RaiseInClip' raised in hook 'clip_gradients': ValueError: injected failure at global step 10")
    assert isinstance(info.value.__cause__, ValueError)  # the plugin's own exception and traceback
    assert raiser.events == ["on_exception ValueError", "teardown_environment"]
    # The previous run's checkpoint is byte-for-byte unchanged, and still resumes.
    assert sha256(good) == digest
    # The failed run's own last good checkpoint (end of epoch 1) is intact; nothing half-written.
    (folder,) = (p for p in (tmp_path / "torchplug_logs").iterdir() if p != good.parents[1])
    assert sorted(p.name for p in folder.rglob("*")) == ["checkpoints", "last.ckpt", "metrics.csv"]
    assert temporaries(tmp_path) == []
    assert ckpt.load(folder / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert read_csv(folder / "metrics.csv")["train_loss"][-1][0] == 10  # complete rows up to the failure
    assert open_files_under(tmp_path) == []  # metrics.csv closed, no checkpoint left open
    third = quiet(tmp_path, max_epochs=3, logger=False, enable_checkpointing=False)
    with pytest.warns(PlanChangedWarning, match="setting gradient_clip_val: 1.0 -> 0.0"):
        third.fit(TinyNet(), loader(), ckpt_path=folder / "checkpoints" / "last.ckpt")
    assert third.global_step == 12
    third = quiet(tmp_path, max_epochs=2, logger=False, enable_checkpointing=False)
    third.fit(TinyNet(), loader(), ckpt_path=good)
    assert third.global_step == 8


@pytest.fixture
def single_rank_launcher_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torchrun's variables for a world of one, rendezvous on a port-0 TCPStore (no probing)."""
    pytest.importorskip("torchplug_ddp")
    import torch.distributed as dist

    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "0"}.items():
        monkeypatch.setenv(name, value)
    yield
    if dist.is_initialized():  # only after a failed assertion: never leave a group to other tests
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_hook_error_under_ddp_destroys_the_process_group(tmp_path: Path, single_rank_launcher_env: None) -> None:
    import torch.distributed as dist

    seen: dict[str, Any] = {}

    class RaiseBeforeStep(Plugin):
        def on_before_optimizer_step(self, trainer: Trainer) -> None:
            seen["group"] = (dist.is_initialized(), dist.get_backend(), dist.get_world_size())
            if trainer.global_step == 2:
                raise RuntimeError("injected failure")

        @hookimpl(trylast=True)
        def teardown_environment(self) -> None:
            seen["initialized_at_teardown_end"] = dist.is_initialized()

    trainer = quiet(tmp_path, strategy="ddp", max_epochs=1, plugins=[RaiseBeforeStep()])
    assert type(trainer.plugin_for("strategy")).__name__ == "DDPPlugin"
    with pytest.raises(PluginHookError, match="Plugin 'RaiseBeforeStep' raised in hook 'on_before_optimizer_step'"):
        trainer.fit(TinyNet(), loader())
    assert seen["group"] == (True, "gloo", 1)  # the ddp plugin created a real process group...
    assert seen["initialized_at_teardown_end"] is False  # ...and destroyed it after the failure
    assert not dist.is_initialized()
    assert open_files_under(tmp_path) == []


@pytest.mark.timeout(30)
def test_invalid_hookimpl_fails_at_trainer_construction_before_any_work(tmp_path: Path) -> None:
    class Misspelled(Plugin):
        def clip_gradient(self, grad_clip_val: float, optimizer: Any) -> None:
            raise AssertionError("never called")

    class WrongArgument:
        @hookimpl
        def clip_gradients(self, max_norm: float, optimizer: Any) -> None:
            raise AssertionError("never called")

    with pytest.raises(PluginValidationError, match=r"unknown hook 'clip_gradient'.*Did you mean 'clip_gradients'"):
        quiet(tmp_path, plugins=[Misspelled()])
    with pytest.raises(PluginValidationError, match=r"argument\(s\) 'max_norm' that the hook does not pass"):
        quiet(tmp_path, plugins=[WrongArgument()])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(30)
def test_two_first_party_precision_plugins_conflict_naming_both_distributions(tmp_path: Path) -> None:
    from torchplug import discovery

    if discovery.find("native_amp") is None or discovery.find("apex") is None:
        pytest.skip("needs torchplug-native-amp and torchplug-apex installed")
    with pytest.raises(PluginConflictError) as info:
        quiet(tmp_path, plugins=["native_amp", "apex"])
    message = str(info.value)
    assert "Two precision plugins are selected" in message
    assert "distribution torchplug-native-amp" in message
    assert "distribution torchplug-apex" in message
    assert "Choose one" in message
    assert list(tmp_path.iterdir()) == []


# ============================================================================================
# Data: a batch the model rejects
# ============================================================================================


def _fit_into_bad_batch(tmp_path: Path) -> tuple[Path, str, BaseException]:
    """One good epoch with checkpointing, then a resumed fit whose batch 2 has 9 features for
    a Linear(8, ...): the shape error is raised inside training_step at epoch 1, step 6."""
    first = quiet(tmp_path, max_epochs=1)
    first.fit(TinyNet(), loader())
    good = Path(first.checkpoint_path or "")
    digest = sha256(good)
    with pytest.raises(RuntimeError) as info:
        quiet(tmp_path, max_epochs=3).fit(TinyNet(), loader(bad_batch=2), ckpt_path=good)
    return good, digest, info.value


@pytest.mark.timeout(60)
def test_a_batch_the_model_rejects_surfaces_unchanged_and_corrupts_no_checkpoint(tmp_path: Path) -> None:
    good, digest, error = _fit_into_bad_batch(tmp_path)
    assert not isinstance(error, TorchplugError)  # the model's own error, not blamed on a plugin
    assert "mat1 and mat2 shapes cannot be multiplied (8x9 and 8x4)" in str(error)
    assert sha256(good) == digest
    assert ckpt.load(good)["global_step"] == 4
    assert [p for p in tmp_path.rglob("*.ckpt") if p != good] == []  # the failed run wrote none
    assert temporaries(tmp_path) == []
    assert open_files_under(tmp_path) == []


@pytest.mark.timeout(60)
def test_a_batch_the_model_rejects_is_reported_with_its_epoch_batch_and_step(tmp_path: Path) -> None:
    _, _, error = _fit_into_bad_batch(tmp_path)
    text = messages(error)
    assert "epoch 1" in text
    assert "batch 2" in text
    assert "global step 6" in text


# ============================================================================================
# Faults: metrics that cannot be written
# ============================================================================================


class DiskFullAt(Plugin):
    """At the end of step ``at``, points metrics.csv's file descriptor at /dev/full: every
    later write to it fails with ENOSPC, as on a full disk (root-proof, unlike chmod)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.checkpoint_digest: str | None = None
        self.events: list[str] = []

    def on_train_batch_end(self, trainer: Trainer, batch_idx: int) -> None:
        if trainer.global_step == self.at and self.checkpoint_digest is None:
            (fd,) = fds_of("metrics.csv")
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
            (last,) = Path(trainer.default_root_dir).glob("torchplug_logs/version_*/checkpoints/last.ckpt")
            self.checkpoint_digest = sha256(last)

    @hookimpl(trylast=True)
    def teardown_environment(self) -> None:
        self.events.append("teardown_environment")


def _fit_until_metrics_fail(tmp_path: Path) -> tuple[DiskFullAt, BaseException]:
    plugin = DiskFullAt(at=6)
    trainer = quiet(tmp_path, max_epochs=3, log_every_n_steps=1, plugins=[plugin])
    with pytest.raises(OSError) as info:
        trainer.fit(TinyNet(), loader())
    return plugin, info.value


@pytest.mark.skipif(not (LINUX and Path("/dev/full").exists()), reason="needs /proc and /dev/full")
@pytest.mark.timeout(60)
def test_metrics_file_that_becomes_unwritable_stops_the_run_and_keeps_the_checkpoints(tmp_path: Path) -> None:
    plugin, error = _fit_until_metrics_fail(tmp_path)
    assert "No space left on device" in messages(error)
    assert plugin.events == ["teardown_environment"]
    (last,) = tmp_path.rglob("last.ckpt")
    assert sha256(last) == plugin.checkpoint_digest  # epoch 0's checkpoint, untouched
    assert ckpt.load(last)["global_step"] == 4
    assert temporaries(tmp_path) == []
    assert fds_of("metrics.csv") == []  # closed despite the failure
    assert fds_of("/dev/full") == []
    resumed = quiet(tmp_path, max_epochs=2, logger=False, enable_checkpointing=False)
    with pytest.warns(PlanChangedWarning, match="plugin 'DiskFullAt'"):
        resumed.fit(TinyNet(), loader(), ckpt_path=last)
    assert resumed.global_step == 8


@pytest.mark.skipif(not (LINUX and Path("/dev/full").exists()), reason="needs /proc and /dev/full")
@pytest.mark.timeout(60)
def test_metrics_file_that_becomes_unwritable_is_named_in_the_error(tmp_path: Path) -> None:
    _, error = _fit_until_metrics_fail(tmp_path)
    assert "metrics.csv" in str(error), f"{type(error).__name__}: {error}"


@pytest.mark.skipif(not LINUX, reason="RLIMIT_FSIZE semantics")
@pytest.mark.timeout(60)
def test_metrics_file_that_cannot_be_created_fails_before_training_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    done = subprocess.run([sys.executable, str(SUPPORT / "fsize_limited_run.py"), str(root)], capture_output=True,
                          text=True, timeout=50, env=subprocess_env(), cwd=SUPPORT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["type"] == "MisconfigurationError"
    metrics = root / "torchplug_logs" / "version_0" / "metrics.csv"
    assert result["message"].startswith(f"Cannot write metrics to {metrics}: [Errno 27] File too large.")
    assert "Trainer(logger=False)" in result["message"]
    assert list(root.rglob("*")) == []  # the empty run folder was removed again


# ============================================================================================
# Faults: SIGKILL while a checkpoint is written
# ============================================================================================


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks its writers")
@pytest.mark.timeout(60)
def test_sigkill_at_random_moments_of_checkpoint_writes_never_tears_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    seed = int(time.time())
    done = subprocess.run([sys.executable, str(SUPPORT / "ckpt_kill_harness.py"), str(path), "6", str(seed)],
                          capture_output=True, text=True, timeout=50, env=subprocess_env())
    assert done.returncode == 0, f"seed {seed}:\n{done.stderr}"
    rounds = json.loads(done.stdout.splitlines()[-1])
    steps = [r["step"] for r in rounds]
    assert all(r["intact"] for r in rounds), (seed, rounds)
    assert steps == sorted(steps), (seed, rounds)  # never an older file after a newer one
    for r in rounds:  # a killed writer leaves at most its hidden temporary, never another *.ckpt
        assert all(name.startswith(".last.ckpt.") and name.endswith(ckpt.TMP_SUFFIX) for name in r["others"]), r
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]
    assert any(r["others"] for r in rounds), f"no kill landed inside a write (seed {seed}): {rounds}"
    data = ckpt.load(path)
    ckpt.save(data, path)  # the next save removes temporaries of dead writers
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ============================================================================================
# Faults: Ctrl-C and SIGTERM on a two-rank DDP run
# ============================================================================================


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _ddp_run_signalled(root: Path, send: Any) -> dict[str, Any]:
    """Start ddp_signal_run.py in its own session, wait until both ranks finished step 3, call
    ``send(proc)``, and collect what the processes left behind."""
    pytest.importorskip("torchplug_ddp")
    root.mkdir()
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "ddp_signal_run.py"), str(root)], cwd=SUPPORT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        pidfiles = [root / "rank0.pid", root / "rank1.pid"]
        while not all(p.exists() and p.read_text() for p in pidfiles):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the ranks never reached step 3"
            time.sleep(0.02)
        workers = [int(p.read_text()) for p in pidfiles]
        send(proc)
        stdout, stderr = proc.communicate(timeout=40)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    teardowns = {rank: json.loads(p.read_text()) for rank in (0, 1) if (p := root / f"teardown{rank}.json").exists()}
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "workers_alive":
            [pid for pid in workers if _alive(pid)], "teardowns": teardowns,
            "checkpoints": sorted(root.glob("torchplug_logs/version_*/checkpoints/last.ckpt"))}


def _assert_clean_ddp_stop(result: dict[str, Any]) -> None:
    assert result["returncode"] == 3, result["stderr"][-3000:]
    assert result["workers_alive"] == []
    assert sorted(result["teardowns"]) == [0, 1], result["stderr"][-3000:]  # every rank tore down...
    assert all(not t["initialized"] for t in result["teardowns"].values())  # ...its process group
    (last,) = result["checkpoints"]  # rank 0 wrote the last completed step
    data = ckpt.load(last)
    assert data["global_step"] >= 3
    assert data["batch_in_epoch"] == data["global_step"]  # at a step boundary (no accumulation)
    assert temporaries(last.parent) == []


@pytest.mark.skipif(not LINUX, reason="POSIX signals and /proc")
@pytest.mark.timeout(120)
def test_ctrl_c_on_a_two_rank_ddp_run_checkpoints_and_destroys_the_process_group(tmp_path: Path) -> None:
    # A terminal's Ctrl-C: SIGINT to the whole foreground process group (launcher and ranks).
    result = _ddp_run_signalled(tmp_path / "run", lambda proc: os.killpg(proc.pid, signal.SIGINT))
    _assert_clean_ddp_stop(result)


@pytest.mark.skipif(not LINUX, reason="POSIX signals and /proc")
@pytest.mark.timeout(120)
def test_sigterm_to_the_launcher_of_a_two_rank_ddp_run_stops_cleanly(tmp_path: Path) -> None:
    # kill PID / a scheduler's stop: SIGTERM to the launching process only.
    result = _ddp_run_signalled(tmp_path / "run", lambda proc: proc.send_signal(signal.SIGTERM))
    _assert_clean_ddp_stop(result)


# ============================================================================================
# Arguments: wrong types and ranges of every Trainer argument, contradictory combinations
# ============================================================================================


class _PluginClass(Plugin):
    pass


#: (kwargs, exception type, fragments of the message); at least one case per Trainer argument.
BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], tuple[str, ...]]] = [
    ({"plugins": 42}, MisconfigurationError, ("plugins= takes", "42")),
    ({"plugins": [3.5]}, MisconfigurationError, ("plugins= takes", "3.5")),
    ({"plugins": [{"name": "ddp"}]}, MisconfigurationError, ("plugins= takes", "dict")),
    ({"plugins": [_PluginClass]}, PluginValidationError, ("pass an instance", "_PluginClass()")),
    ({"plugins": ["no_such_plugin"]}, PluginNotFoundError, ("No plugin named 'no_such_plugin'",)),
    ({"callbacks": ["early_stopping"]}, MisconfigurationError, ("callbacks= takes callback objects", "plugins=")),
    ({"callbacks": [_PluginClass]}, MisconfigurationError, ("callbacks= takes callback objects", "_PluginClass")),
    ({"callbacks": [object()]}, PluginValidationError, ("implements no torchplug hook",)),
    ({"accelerator": 3}, MisconfigurationError, ("accelerator must be a string", "3")),
    ({"accelerator": "tpu"}, PluginNotFoundError, ("No plugin named 'tpu'",)),
    ({"strategy": 2}, MisconfigurationError, ("strategy must be str", "2")),
    ({"strategy": "no_such_strategy"}, PluginNotFoundError, ("No plugin named 'no_such_strategy'", "strategy")),
    ({"devices": 0}, MisconfigurationError, ("devices must be a positive integer", "0")),
    ({"devices": -1}, MisconfigurationError, ("devices must be a positive integer", "-1")),
    ({"devices": 1.5}, MisconfigurationError, ("devices must be a positive integer", "1.5")),
    ({"devices": [0, 1]}, MisconfigurationError, ("devices must be a positive integer", "[0, 1]")),
    ({"devices": True}, MisconfigurationError, ("devices must be a positive integer", "True")),
    ({"num_nodes": 0}, MisconfigurationError, ("num_nodes must be >= 1", "0")),
    ({"num_nodes": "2"}, MisconfigurationError, ("num_nodes must be an integer", "'2'")),
    ({"num_nodes": 1.0}, MisconfigurationError, ("num_nodes must be an integer",)),
    ({"precision": 64}, MisconfigurationError, ("precision must be 32, 16 or 'bf16'", "64")),
    ({"precision": 16.0}, MisconfigurationError, ("precision must be 32, 16 or 'bf16'", "16.0")),
    ({"precision": True}, MisconfigurationError, ("precision must be 32, 16 or 'bf16'", "True")),
    ({"precision": None}, MisconfigurationError, ("precision must be 32, 16 or 'bf16'", "None")),
    ({"amp_backend": "cuda"}, MisconfigurationError, ("amp_backend must be 'native' or 'apex'", "'cuda'")),
    ({"amp_backend": None}, MisconfigurationError, ("amp_backend must be 'native' or 'apex'", "None")),
    ({"amp_backend": "apex", "amp_level": "O4"}, MisconfigurationError, ("amp_level must be one of", "'O4'")),
    ({"amp_backend": "apex", "amp_level": "o1"}, MisconfigurationError, ("amp_level must be one of", "'o1'")),
    ({"amp_backend": "apex", "amp_level": 1}, MisconfigurationError, ("amp_level must be one of", "1")),
    ({"max_epochs": 0}, MisconfigurationError, ("max_epochs must be >= 1", "0")),
    ({"max_epochs": 2.5}, MisconfigurationError, ("max_epochs must be an integer", "2.5")),
    ({"max_epochs": True}, MisconfigurationError, ("max_epochs must be an integer", "True")),
    ({"max_steps": 0}, MisconfigurationError, ("max_steps must be positive, or -1",)),
    ({"max_steps": -2}, MisconfigurationError, ("max_steps must be >= -1", "-2")),
    ({"max_steps": "10"}, MisconfigurationError, ("max_steps must be an integer", "'10'")),
    ({"accumulate_grad_batches": 0}, MisconfigurationError, ("accumulate_grad_batches must be >= 1", "0")),
    ({"accumulate_grad_batches": -3}, MisconfigurationError, ("accumulate_grad_batches must be >= 1", "-3")),
    ({"accumulate_grad_batches": {"0": 2}}, MisconfigurationError, ("schedule keys are epochs", "'0'")),
    ({"accumulate_grad_batches": {1: 0}}, MisconfigurationError, ("epoch 1 accumulates 0 batches", "int >= 1")),
    ({"accumulate_grad_batches": {-1: 2}}, MisconfigurationError, ("schedule keys are epochs", "-1")),
    ({"accumulate_grad_batches": {}}, MisconfigurationError, ("empty schedule",)),
    ({"accumulate_grad_batches": 2.0}, MisconfigurationError, ("accumulate_grad_batches must be an integer",)),
    ({"gradient_clip_val": -0.5}, MisconfigurationError, ("gradient_clip_val must be >= 0", "-0.5")),
    ({"gradient_clip_val": float("nan")}, MisconfigurationError, ("gradient_clip_val must be a number", "nan")),
    ({"gradient_clip_val": "1.0"}, MisconfigurationError, ("gradient_clip_val must be a number", "'1.0'")),
    ({"gradient_clip_val": True}, MisconfigurationError, ("gradient_clip_val must be a number", "True")),
    ({"gradient_clip_norm_type": 0}, MisconfigurationError, ("gradient_clip_norm_type must be > 0",)),
    ({"gradient_clip_norm_type": -2.0}, MisconfigurationError, ("gradient_clip_norm_type must be > 0",)),
    ({"gradient_clip_norm_type": "inf"}, MisconfigurationError, ("gradient_clip_norm_type must be a number",)),
    ({"limit_train_batches": 0}, MisconfigurationError, ("limit_train_batches must be >= 1", "0")),
    ({"limit_train_batches": 1.5}, MisconfigurationError, ("limit_train_batches as a float is a fraction", "1.5")),
    ({"limit_train_batches": 0.0}, MisconfigurationError, ("limit_train_batches as a float", "(0.0, 1.0]")),
    ({"limit_train_batches": "all"}, MisconfigurationError, ("limit_train_batches must be an int", "'all'")),
    ({"limit_val_batches": -1}, MisconfigurationError, ("limit_val_batches must be >= 0", "-1")),
    ({"limit_val_batches": -0.25}, MisconfigurationError, ("limit_val_batches as a float", "[0.0, 1.0]", "-0.25")),
    ({"limit_val_batches": True}, MisconfigurationError, ("limit_val_batches must be an int", "True")),
    ({"check_val_every_n_epoch": 0}, MisconfigurationError, ("check_val_every_n_epoch must be >= 1", "0")),
    ({"check_val_every_n_epoch": None}, MisconfigurationError, ("check_val_every_n_epoch must be an integer",)),
    ({"val_check_interval": 0.0}, MisconfigurationError, ("val_check_interval must be a float fraction", "0.0")),
    ({"val_check_interval": 1.5}, MisconfigurationError, ("val_check_interval must be", "1.5")),
    ({"val_check_interval": 0}, MisconfigurationError, ("val_check_interval must be", "int number of training")),
    ({"num_sanity_val_steps": -2}, MisconfigurationError, ("num_sanity_val_steps must be >= -1", "-2")),
    ({"num_sanity_val_steps": 2.0}, MisconfigurationError, ("num_sanity_val_steps must be an integer", "2.0")),
    ({"fast_dev_run": -1}, MisconfigurationError, ("fast_dev_run must be True/False or a number", "-1")),
    ({"fast_dev_run": 0.5}, MisconfigurationError, ("fast_dev_run must be", "0.5")),
    ({"gpus": 2}, MisconfigurationError, ("gpus=2 asks for CUDA GPUs", "torch.cuda.is_available() is False",
                                          "Drop gpus")),
    ({"gpus": [1, 3]}, MisconfigurationError, ("gpus=[1, 3] names GPU indices", "CUDA_VISIBLE_DEVICES=1,3",
                                               "devices=2")),
    ({"gpus": "two"}, MisconfigurationError, ("gpus must be a number of GPUs", "'two'")),
    ({"gpus": 2, "devices": 4}, MisconfigurationError, ("gpus=2", "devices=4", "both give the device count")),
    ({"gpus": 1, "accelerator": "cpu"}, MisconfigurationError, ("gpus=1 asks for CUDA GPUs", "accelerator='cpu'")),
    ({"num_processes": 0}, MisconfigurationError, ("num_processes must be >= 1", "0")),
    ({"num_processes": 2, "devices": 4}, MisconfigurationError, ("num_processes=2", "devices=4")),
    ({"num_processes": 2, "gpus": 2}, MisconfigurationError, ("gpus=2 and num_processes=2", "devices=N")),
    ({"accelerator": "dp"}, MisconfigurationError, ("DataParallel (accelerator='dp') is not supported",
                                                    "strategy='ddp'")),
    ({"accelerator": "ddp2"}, MisconfigurationError, ("accelerator='ddp2'", "not supported", "num_nodes=M")),
    ({"accelerator": "ddp_cpu", "strategy": "fsdp"}, MisconfigurationError, ("accelerator='ddp_cpu'",
                                                                             "strategy='fsdp'", "pass one")),
    ({"resume_from_checkpoint": 3}, MisconfigurationError, ("resume_from_checkpoint must be a path", "3",
                                                            "ckpt_path")),
    ({"profiler": "simple"}, MisconfigurationError, ("Trainer(profiler='simple') is a Lightning 1.1 argument",
                                                     "TORCHPLUG_TRACE")),
    ({"weights_summary": None}, MisconfigurationError, ("weights_summary=None", "drop it")),
    ({"distributed_backend": "ddp", "strategy": "fsdp"}, MisconfigurationError, ("distributed_backend='ddp'",
                                                                                  "strategy='fsdp'", "one setting")),
    ({"log_every_n_steps": 0}, MisconfigurationError, ("log_every_n_steps must be >= 1", "0")),
    ({"log_every_n_steps": "50"}, MisconfigurationError, ("log_every_n_steps must be an integer", "'50'")),
    ({"enable_progress_bar": "yes"}, MisconfigurationError, ("enable_progress_bar must be bool", "'yes'")),
    ({"enable_progress_bar": 1}, MisconfigurationError, ("enable_progress_bar must be bool", "1")),
    ({"enable_checkpointing": None}, MisconfigurationError, ("enable_checkpointing must be bool", "None")),
    ({"logger": "csv"}, MisconfigurationError, ("logger must be bool", "'csv'")),
    ({"logger": object()}, MisconfigurationError, ("logger must be bool", "object")),
    ({"default_root_dir": 5}, MisconfigurationError, ("default_root_dir must be a path", "5")),
    ({"default_root_dir": b"logs"}, MisconfigurationError, ("default_root_dir must be a path", "b'logs'")),
    ({"deterministic": 1}, MisconfigurationError, ("deterministic must be bool", "1")),
    ({"on_nonfinite_loss": "warn"}, MisconfigurationError, ("on_nonfinite_loss must be one of", "'warn'")),
    ({"on_nonfinite_loss": None}, MisconfigurationError, ("on_nonfinite_loss must be one of", "None")),
    ({"checkpoint_weights_only": 0}, MisconfigurationError, ("checkpoint_weights_only must be bool", "0")),
    ({"checkpoint_weights_only": None}, MisconfigurationError, ("checkpoint_weights_only must be bool", "None")),
    ({"resume_plan": "ignore"}, MisconfigurationError, ("resume_plan must be one of ('warn', 'strict')", "'ignore'")),
    ({"resume_plan": True}, MisconfigurationError, ("resume_plan must be one of", "True")),
    ({"blocked_plugins": "ddp"}, MisconfigurationError, ("blocked_plugins must be a list of plugin names",)),
    ({"blocked_plugins": [1]}, MisconfigurationError, ("blocked_plugins must be a list of plugin names", "[1]")),
    ({"blocked_plugins": 5}, MisconfigurationError, ("blocked_plugins must be a list of plugin names", "5")),
    ({"autoload_plugins": "yes"}, MisconfigurationError, ("autoload_plugins must be bool or NoneType", "'yes'")),
    ({"autoload_plugins": 0}, MisconfigurationError, ("autoload_plugins must be bool or NoneType", "0")),
]


def _case_id(kwargs: dict[str, Any]) -> str:
    def show(value: Any) -> str:  # stable ids: no memory addresses
        if isinstance(value, type):
            return value.__name__
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(map(show, value)) + "]"
        if value is None or isinstance(value, (bool, int, float, str, bytes, dict)):
            return repr(value)
        return f"{type(value).__name__}()"

    return ",".join(f"{k}={show(v)}" for k, v in kwargs.items())


def test_every_trainer_argument_has_bad_value_cases() -> None:
    parameters = {name for name, p in inspect.signature(Trainer.__init__).parameters.items()
                  if name != "self" and p.kind is not p.VAR_KEYWORD}  # **lightning_1_1: its own cases below
    covered = {name for kwargs, _, _ in BAD_ARGUMENTS for name in kwargs}
    assert parameters - covered == set(), "Trainer arguments without a bad-value case"


@pytest.mark.parametrize(("kwargs", "error", "fragments"), BAD_ARGUMENTS,
                         ids=[_case_id(kwargs) for kwargs, _, _ in BAD_ARGUMENTS])
def test_bad_trainer_argument_fails_at_construction_naming_it(tmp_path: Path, kwargs: dict[str, Any],
                                                              error: type[Exception], fragments: tuple[str, ...]
                                                              ) -> None:
    arguments = {"default_root_dir": tmp_path, "autoload_plugins": False, **kwargs}
    with pytest.raises(error) as info:
        Trainer(**arguments)
    assert isinstance(info.value, TorchplugError)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    assert list(tmp_path.iterdir()) == []


def test_fit_arguments_are_checked_before_any_work(tmp_path: Path) -> None:
    trainer = quiet(tmp_path)
    with pytest.raises(MisconfigurationError, match="ckpt_path must be a path, got 3"):
        trainer.fit(TinyNet(), loader(), ckpt_path=3)  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationError, match=r"Expected a torch\.nn\.Module"):
        trainer.fit(loader(), TinyNet())  # arguments swapped
    with pytest.raises(MisconfigurationError, match="save_checkpoint needs a path"):
        trainer.save_checkpoint(None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_more_devices_than_a_single_device_strategy_runs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationError, match="devices=2"):
        quiet(tmp_path, devices=2, strategy="single_device")


def test_skip_nonfinite_with_several_processes_is_refused_at_construction(tmp_path: Path) -> None:
    pytest.importorskip("torchplug_ddp")
    with pytest.raises(MisconfigurationError, match="on_nonfinite_loss='skip'"):
        quiet(tmp_path, devices=2, on_nonfinite_loss="skip")


# ============================================================================================
# Security: plugins come only from installed distributions or from objects the user passes
# ============================================================================================

#: A module that, when imported, leaves ``IMPORTED-<name>`` next to itself.
MARKER_MODULE = 'import pathlib\npathlib.Path(__file__).with_name("IMPORTED-" + __name__).write_text("x")\n'
PLUGIN_MODULE = (
    "from torchplug import Plugin\n\n\nclass RelPlugin(Plugin):\n    def on_fit_start(self):\n        pass\n"
)


@pytest.fixture
def installed_and_cwd(tmp_path: Path) -> tuple[Path, Path]:
    """``site``: a distribution ``torchplug-reltest`` providing plugin ``reltest`` (module
    ``reltest_plugin``), made importable through PYTHONPATH like any installed one; ``cwd``: a
    working directory with look-alike modules that must never be imported."""
    site, cwd = tmp_path / "site", tmp_path / "cwd"
    make_fake_dist(site, "torchplug-reltest", "1.0", {"torchplug.plugins": {"reltest": "reltest_plugin:RelPlugin"}},
                   modules={"reltest_plugin": PLUGIN_MODULE}, requires=["torchplug>=0.1"])
    cwd.mkdir()
    for name in ("reltest_plugin", "reltest", "evil", "ddp"):
        (cwd / f"{name}.py").write_text(MARKER_MODULE)
    return site, cwd


def _imported(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("IMPORTED-*"))


def _run_in(cwd: Path, site: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=50,
                          env=subprocess_env(PYTHONPATH=str(site)))


SELECT_BY_NAME = """
import json, sys
import torchplug
out = {"sys_path_0": sys.path[0]}
try:
    torchplug.Trainer(plugins=["evil"])
except torchplug.PluginNotFoundError as exc:
    out["evil"] = str(exc)
t = torchplug.Trainer(plugins=["reltest"])
out["plugins"] = t.plugin_names
out["module_file"] = sys.modules["reltest_plugin"].__file__
print(json.dumps(out))
"""


@pytest.mark.timeout(60)
def test_selecting_by_name_never_imports_modules_from_the_working_directory(
        installed_and_cwd: tuple[Path, Path]) -> None:
    site, cwd = installed_and_cwd
    (cwd / "reltest_plugin.py").unlink()  # under python -c it would shadow: Python's rule, not ours
    # python -c puts the working directory first on sys.path: the worst case for the API.
    done = _run_in(cwd, site, [sys.executable, "-c", SELECT_BY_NAME])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["sys_path_0"] == ""  # the working directory was importable
    assert out["evil"].startswith("No plugin named 'evil' is installed")  # evil.py is no plugin
    assert out["plugins"] == ["reltest"]
    assert Path(out["module_file"]).parent == site  # the distribution's module, not ./reltest.py
    assert _imported(cwd) == []


@pytest.mark.timeout(60)
def test_torchplug_command_does_not_import_plugin_modules_from_the_working_directory(
        installed_and_cwd: tuple[Path, Path]) -> None:
    site, cwd = installed_and_cwd
    command = Path(sys.executable).with_name("torchplug")
    if not command.exists():
        pytest.skip("needs the torchplug console script next to the interpreter")
    done = _run_in(cwd, site, [str(command), "plugins", "--check"])
    assert "reltest (torchplug.plugins, torchplug-reltest 1.0): ok" in done.stdout, done.stdout + done.stderr
    assert _imported(cwd) == []


@pytest.mark.timeout(60)
def test_python_m_torchplug_does_not_import_plugin_modules_from_the_working_directory(
        installed_and_cwd: tuple[Path, Path]) -> None:
    site, cwd = installed_and_cwd
    done = _run_in(cwd, site, [sys.executable, "-m", "torchplug", "plugins", "--check"])
    assert _imported(cwd) == [], done.stdout
    assert "reltest (torchplug.plugins, torchplug-reltest 1.0): ok" in done.stdout, done.stdout + done.stderr


@pytest.mark.timeout(60)
def test_python_m_torchplug_does_not_see_distributions_in_the_working_directory(
        installed_and_cwd: tuple[Path, Path]) -> None:
    site, cwd = installed_and_cwd
    make_fake_dist(cwd, "evil", "1.0", {"torchplug.autoload": {"evil": "evil"}})
    done = _run_in(cwd, site, [sys.executable, "-m", "torchplug", "plugins", "--json"])
    assert done.returncode == 0, done.stderr
    names = [p["name"] for p in json.loads(done.stdout)["plugins"]]
    assert "reltest" in names
    assert "evil" not in names


USER_MODULE = """
import torch, torchplug
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class M(torchplug.TrainingModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.lin(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
"""


@pytest.mark.timeout(60)
def test_torchplug_fit_imports_the_user_module_but_no_plugin_module_from_the_working_directory(
        installed_and_cwd: tuple[Path, Path], tmp_path: Path) -> None:
    site, cwd = installed_and_cwd
    command = Path(sys.executable).with_name("torchplug")
    if not command.exists():
        pytest.skip("needs the torchplug console script next to the interpreter")
    (cwd / "usermodel.py").write_text(USER_MODULE)
    done = _run_in(cwd, site, [str(command), "fit", "usermodel:M", "--plugins", "reltest", "--max-steps", "1",
                               "--root-dir", str(tmp_path / "runs"), "--no-progress-bar", "--json"])
    assert _imported(cwd) == [], done.stdout + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["plugins"] == ["reltest"]


# ============================================================================================
# Security: no distribution depends on PyPI's "apex"
# ============================================================================================


def _pyprojects() -> list[Path]:
    """Every pyproject.toml of the repository (environments, build output and vendored code aside)."""
    skip = {".venv", ".nox", ".git", "build", "dist", "node_modules", "third_party", "__pycache__"}
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        if "pyproject.toml" in files:
            found.append(Path(folder) / "pyproject.toml")
    return sorted(found)


def _requirement_strings(data: dict[str, Any]) -> list[str]:
    project = data.get("project", {})
    texts = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        texts += extra
    texts += data.get("build-system", {}).get("requires", [])
    for group in data.get("dependency-groups", {}).values():
        texts += [item for item in group if isinstance(item, str)]  # {include-group = ...} tables aside
    return texts


def test_no_pyproject_in_the_repository_depends_on_pypi_apex() -> None:
    pyprojects = _pyprojects()
    assert REPO / "core" / "pyproject.toml" in pyprojects
    assert REPO / "plugins" / "apex_plugin" / "pyproject.toml" in pyprojects
    offenders = []
    for path in pyprojects:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        for text in _requirement_strings(data):
            if canonicalize_name(Requirement(text).name) == "apex":
                offenders.append(f"{path.relative_to(REPO)}: {text}")
        extras = data.get("project", {}).get("optional-dependencies", {})
        # an extra may be called "apex" (torchplug[apex]); it must not pull a distribution named apex
        for name, requirements in extras.items():
            if canonicalize_name(name) == "apex":
                assert all(canonicalize_name(Requirement(r).name) != "apex" for r in requirements), path
    assert offenders == []


def test_the_pyproject_scan_would_catch_apex(tmp_path: Path) -> None:
    """The scanner itself: every place a requirement can hide is read."""
    data = tomllib.loads(
        '[build-system]\nrequires = ["setuptools", "Apex>=0.9"]\n'
        '[project]\ndependencies = ["torch"]\n[project.optional-dependencies]\namp = ["apex; extra == \'amp\'"]\n'
        '[dependency-groups]\ndev = ["APEX==0.9.10.dev0", {include-group = "x"}]\n')
    names = [canonicalize_name(Requirement(t).name) for t in _requirement_strings(data)]
    assert names.count("apex") == 3



@pytest.mark.parametrize("passed", [object(), nn.Linear(2, 2)], ids=["object", "nn.Module"])
def test_a_passed_object_that_implements_no_hook_is_refused(passed: object) -> None:
    """plugins=[model] or plugins=[some callback] would otherwise silently change nothing."""
    with pytest.raises(PluginValidationError, match="implements no torchplug hook"):
        Trainer(plugins=[passed], autoload_plugins=False)
