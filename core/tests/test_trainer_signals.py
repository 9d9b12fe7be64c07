"""Stopping a fit from outside, in a real subprocess: SIGTERM, Ctrl-C (SIGINT) and a raw
KeyboardInterrupt end the run cleanly with the last completed step checkpointed; the progress
bar shows on a terminal only."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from torchplug import PlanChangedWarning
from torchplug import checkpoint as ckpt

SCRIPT = '''
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
import torchplug
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(torchplug.TrainingModule):
    def __init__(self, sleep=0.0, interrupt_at=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.sleep, self.interrupt_at = sleep, interrupt_at

    def training_step(self, batch, batch_idx):
        if self.interrupt_at == (self.trainer_step(), batch_idx):
            raise KeyboardInterrupt("raw interrupt inside training_step")
        time.sleep(self.sleep)
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def trainer_step(self):
        return TRAINER.global_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(56, 8, generator=g)
    return TensorDataset(x, (x @ torch.randn(8, 4, generator=g)).argmax(1))


class Signaller(torchplug.Plugin):
    """Sends signals to its own process at a given (global_step, batch_idx), or marks a file."""

    def __init__(self, at, signals=(), marker=None):
        self.at, self.signals, self.marker = at, signals, marker

    def on_train_batch_end(self, trainer, batch_idx):
        if (trainer.global_step, batch_idx) == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)
            if self.marker:
                open(self.marker, "w").close()


class CleanupWitness(torchplug.Plugin):
    """A launcher's SIGTERM arriving while the run already stops: it must not cut the cleanup."""

    def __init__(self, root):
        self.root = root

    def on_exception(self, exception):
        os.kill(os.getpid(), signal.SIGTERM)

    def teardown_environment(self):
        open(os.path.join(self.root, "teardown-done"), "w").close()


TRAINER = None


def fit(root, max_steps, accumulate=2, plugins=(), sleep=0.0, interrupt_at=None, progress=False, ckpt_path=None):
    global TRAINER
    torch.manual_seed(42)
    model = Net(sleep, interrupt_at)
    TRAINER = torchplug.Trainer(default_root_dir=root, max_steps=max_steps, accumulate_grad_batches=accumulate,
                                plugins=list(plugins), autoload_plugins=False, enable_progress_bar=progress,
                                log_every_n_steps=1)
    TRAINER.fit(model, DataLoader(data(), batch_size=8, shuffle=True), ckpt_path=ckpt_path)
    return model, TRAINER


if __name__ == "__main__":
    mode, root = sys.argv[1], sys.argv[2]
    plugins, sleep, interrupt_at, progress = [], 0.0, None, False
    if mode == "self-sigterm":       # mid-window of step 6 (epoch 1, batches 2-3)
        plugins = [Signaller((5, 2), [signal.SIGTERM])]
    elif mode == "double-sigterm":   # the second signal stops at once; a third during cleanup is ignored
        plugins = [Signaller((5, 2), [signal.SIGTERM, signal.SIGTERM]), CleanupWitness(root)]
    elif mode in ("external", "progress"):
        plugins, sleep, progress = [Signaller((2, 4), marker=sys.argv[3])], 0.02, True
    elif mode == "raw":
        interrupt_at = (5, 2)
    try:
        model, trainer = fit(root, 10_000 if mode == "external" else 12, plugins=plugins, sleep=sleep,
                             interrupt_at=interrupt_at, progress=progress)
    except KeyboardInterrupt as exc:
        print(json.dumps({"interrupted": str(exc), "global_step": TRAINER.global_step,
                          "checkpoint": TRAINER.checkpoint_path}), flush=True)
        sys.exit(3)
    print(json.dumps({"interrupted": None, "global_step": trainer.global_step}), flush=True)
'''


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "fitscript.py"
    path.write_text(SCRIPT)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}


def _run(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=script.parent)


def _last_checkpoint(root: Path) -> Path:
    (path,) = root.glob("torchplug_logs/version_*/checkpoints/last.ckpt")
    assert list(path.parent.glob("*.tmp")) == []
    return path


def _import(script: Path) -> Any:
    spec = importlib.util.spec_from_file_location("fitscript", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(180)
def test_sigterm_stops_after_the_step_and_resume_is_exact(script: Path, tmp_path: Path) -> None:
    result = _run(script, "self-sigterm", str(tmp_path / "stopped"))
    assert result.returncode == 3, result.stderr
    path = _last_checkpoint(tmp_path / "stopped")
    assert json.loads(result.stdout.splitlines()[-1]) == {"interrupted": "stopped by SIGTERM", "global_step": 6,
                                                          "checkpoint": str(path)}
    assert "SIGTERM received, stopping after the current step" in result.stderr
    data = ckpt.load(path)
    assert (data["global_step"], data["epoch"], data["batch_in_epoch"]) == (6, 1, 4)  # the window finished
    # The checkpoint is an exact resume point: same weights as a run that was never stopped.
    fitscript = _import(script)
    full, _ = fitscript.fit(tmp_path / "full", 12)
    with pytest.warns(PlanChangedWarning, match="plugin 'Signaller'"):  # the stopped run had it
        resumed, trainer = fitscript.fit(tmp_path / "resumed", 12, ckpt_path=path)
    assert trainer.global_step == 12
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.timeout(120)
def test_second_signal_stops_at_once_with_the_last_completed_step(script: Path, tmp_path: Path) -> None:
    result = _run(script, "double-sigterm", str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["global_step"] == 5
    data = ckpt.load(_last_checkpoint(tmp_path))
    assert (data["global_step"], data["epoch"], data["batch_in_epoch"]) == (5, 1, 2)  # the open window dropped
    assert "SIGTERM received while stopping; finishing the checkpoint and teardown" in result.stderr
    assert (tmp_path / "teardown-done").exists()


@pytest.mark.timeout(120)
def test_raw_keyboard_interrupt_checkpoints_the_last_completed_step(script: Path, tmp_path: Path) -> None:
    result = _run(script, "raw", str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "interrupted": "raw interrupt inside training_step", "global_step": 5,
        "checkpoint": str(_last_checkpoint(tmp_path))}
    data = ckpt.load(_last_checkpoint(tmp_path))
    assert (data["global_step"], data["epoch"], data["batch_in_epoch"]) == (5, 1, 2)
    csv = next(tmp_path.glob("torchplug_logs/version_*/metrics.csv")).read_text().splitlines()
    assert csv[0] == "step,epoch,metric,value"
    assert csv[-1].startswith("5,1,train_loss,")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_external_signal_mid_epoch(script: Path, tmp_path: Path, signum: int) -> None:
    marker = tmp_path / "running"
    proc = subprocess.Popen([sys.executable, str(script), "external", str(tmp_path), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the fit never reached step 2"
            time.sleep(0.01)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, stderr
    report = json.loads(stdout.splitlines()[-1])
    assert report["interrupted"] == f"stopped by {signal.Signals(signum).name}"
    assert report["checkpoint"] == str(_last_checkpoint(tmp_path))
    data = ckpt.load(report["checkpoint"])
    assert data["global_step"] == report["global_step"] >= 3
    assert data["batch_in_epoch"] % 2 == 0 or data["batch_in_epoch"] == 7  # at a window's end
    # stderr is a pipe, not a terminal: no progress bar although enable_progress_bar=True
    assert "Epoch 0" not in stderr, stderr
    assert "it/s" not in stderr, stderr


@pytest.mark.timeout(120)
def test_progress_bar_on_a_terminal(script: Path, tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc = subprocess.Popen([sys.executable, str(script), "progress", str(tmp_path), str(tmp_path / "m")],
                            stdout=subprocess.PIPE, stderr=slave, text=True, env=_env(), cwd=tmp_path)
    os.close(slave)
    stdout, _ = proc.communicate(timeout=100)
    reader.join(timeout=10)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, shown
    assert json.loads(stdout.splitlines()[-1])["global_step"] == 12
    assert "Epoch 0" in shown, shown
    assert "Epoch 2" in shown, shown
    assert "train_loss" in shown
