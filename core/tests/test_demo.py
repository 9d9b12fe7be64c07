"""``torchplug demo`` and ``torchplug fit`` from the command line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from torchplug import cli, discovery

pytest.importorskip("sklearn", reason="the demo extra (scikit-learn) is not installed")
pytest.importorskip("matplotlib", reason="the demo extra (matplotlib) is not installed")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    env = {**os.environ, "TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"}
    for name in ("TORCHPLUG_PLUGINS", "TORCHPLUG_BLOCK_PLUGINS", "OMP_NUM_THREADS"):
        env.pop(name, None)
    return env


@pytest.mark.timeout(120)
def test_demo_reaches_95_percent_and_plots_the_losses(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torchplug", "demo", "--json", "--root-dir", str(tmp_path)],
                            capture_output=True, text=True, env=_env(), timeout=110, cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # --json: stdout holds the JSON object alone
    assert result.stdout.count("\n") == 1
    assert summary["val_acc"] >= 0.95, summary
    assert summary["plugins"] == []
    assert summary["devices"] == 1
    assert summary["precision"] == "32"
    assert summary["global_step"] == summary["current_epoch"] * 23  # 1437 images / 64 per batch
    assert 0 < summary["seconds"] < seconds
    assert "plugins active: none (built-in defaults: one process, fp32)" in result.stderr
    plot = Path(summary["plot"])
    assert plot == Path(summary["log_dir"]) / "loss_curves.png"
    assert plot.is_absolute()
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert plot.stat().st_size > 10_000
    assert f"loss curves: {plot}" in result.stderr
    metrics = (Path(summary["log_dir"]) / "metrics.csv").read_text()
    assert ",train_loss," in metrics
    assert ",val_loss," in metrics
    assert ",val_acc," in metrics


USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import torchplug


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long())


class Classifier(torchplug.TrainingModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            print("hello from training_step")
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(_data(64, 0), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_data(32, 1), batch_size=16)


class NeedsArgs(Classifier):
    def __init__(self, width):
        super().__init__()


class NoData(torchplug.TrainingModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class NoStep(torchplug.TrainingModule):
    pass


not_a_class = 3
'''


@pytest.mark.timeout(120)
def test_fit_trains_a_user_module_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "usermodel.py").write_text(USER_MODULE)
    result = subprocess.run(
        [sys.executable, "-m", "torchplug", "fit", "usermodel:Classifier", "--max-epochs", "3", "--accumulate", "2",
         "--json"], capture_output=True, text=True, env=_env(), timeout=110, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # the user's prints and the messages went to stderr
    assert "hello from training_step" in result.stderr
    assert (summary["global_step"], summary["current_epoch"], summary["accumulate"]) == (6, 3, 2)
    assert set(summary["metrics"]) == {"train_loss", "val_loss"}
    assert Path(summary["log_dir"]).parent == tmp_path / "torchplug_logs"
    assert Path(summary["plot"]).read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def in_user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tp_cli_user.py").write_text(USER_MODULE)
    (tmp_path / "tp_cli_broken.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("tp_cli_user", "tp_cli_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


@pytest.mark.parametrize(("target", "message"), [
    ("tp_cli_user.Classifier", "Expected package.module:Class"),
    ("tp_cli_user:", "Expected package.module:Class"),
    ("no_such_module_xyz:Model", "Cannot import 'no_such_module_xyz'"),
    ("tp_cli_broken:Model", "Importing 'tp_cli_broken' failed: ModuleNotFoundError"),
    ("tp_cli_user:Missing", "has no attribute 'Missing'. It defines: Classifier, NeedsArgs, NoData, NoStep"),
    ("tp_cli_user:not_a_class", "is int 3, not a class"),
    ("tp_cli_user:NoStep", "does not define training_step() or configure_optimizers()"),
    ("tp_cli_user:NeedsArgs", "must be constructible with no arguments"),
    ("tp_cli_user:NoData", "has no train_dataloader()"),
])
def test_fit_rejects_bad_targets_clearly(in_user_dir: Path, capsys: pytest.CaptureFixture[str], target: str,
                                         message: str) -> None:
    assert cli.main(["fit", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchplug fit: error: ")
    assert message in err, err
    assert not (in_user_dir / "torchplug_logs").exists()


def test_demo_without_its_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    assert cli.main(["demo", "--root-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'torchplug demo needs sklearn' in err
    assert 'pip install "torchplug[demo]"' in err
    assert list(tmp_path.iterdir()) == []


def test_demo_with_a_plugin_that_is_not_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert cli.main(["demo", "--plugins", "no_such_plugin_xyz", "--root-dir", str(tmp_path)]) == 2
    assert "No plugin named 'no_such_plugin_xyz' is installed" in capsys.readouterr().err
    if discovery.find("native_amp") is None:
        assert cli.main(["demo", "--precision", "16", "--root-dir", str(tmp_path)]) == 2
        assert 'pip install "torchplug[native-amp]"' in capsys.readouterr().err
    assert not (tmp_path / "torchplug_logs").exists()


def test_demo_arguments_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["demo", "--devices", "0"], ["demo", "--precision", "8"], ["demo", "--max-epochs", "-1"],
                 ["demo", "--accumulate", "x"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_demo_module_pickles_for_spawned_workers() -> None:
    from torchplug.demo import DigitsClassifier

    model = DigitsClassifier(hidden=32)
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is DigitsClassifier
    assert all((a == b).all() for a, b in zip(model.parameters(), copy.parameters()))
    script = textwrap.dedent("""
        import pickle, sys
        model = pickle.loads(sys.stdin.buffer.read())
        print(type(model).__module__, type(model).__qualname__)
    """)
    result = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(model), capture_output=True,
                            env=_env(), timeout=60)
    assert result.stdout.decode().split() == ["torchplug.demo", "DigitsClassifier"], result.stderr


@pytest.mark.timeout(120)
def test_fit_without_max_epochs_says_how_many_it_trains(tmp_path: Path) -> None:
    (tmp_path / "usermodel.py").write_text(USER_MODULE)
    result = subprocess.run([sys.executable, "-m", "torchplug", "fit", "usermodel:Classifier", "--no-progress-bar"],
                            capture_output=True, text=True, env=_env(), timeout=110, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"training {cli.FIT_EPOCHS} epochs (the default without --max-epochs or --max-steps)" in result.stdout
    assert f"done: {cli.FIT_EPOCHS * 4} steps, {cli.FIT_EPOCHS} epochs" in result.stdout
    steps = subprocess.run([sys.executable, "-m", "torchplug", "fit", "usermodel:Classifier", "--max-steps", "3",
                            "--json"], capture_output=True, text=True, env=_env(), timeout=110, cwd=tmp_path)
    assert steps.returncode == 0, steps.stderr
    assert "training until 3 optimizer steps (--max-steps; no epoch limit)" in steps.stderr
    assert json.loads(steps.stdout)["global_step"] == 3


def test_fit_json_error_is_json(in_user_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fit", "tp_cli_user:Missing", "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"command": "fit", "error_type": "TargetError", "error": (
        "Module 'tp_cli_user' has no attribute 'Missing'. It defines: Classifier, NeedsArgs, NoData, NoStep.")}
    assert err.startswith("torchplug fit: error: ")
