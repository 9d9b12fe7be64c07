"""torchplug.callbacks on real runs: EarlyStopping, ModelCheckpoint, LearningRateMonitor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import torchplug
from torchplug import checkpoint as ckpt
from torchplug.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from torchplug.errors import MisconfigurationError, PlanChangedWarning, PluginHookError
from torchplug.metrics import read_csv
from torchplug.testing.models import TinyMLP, tiny_loader

#: val_loss per epoch: best at epoch 2, then no improvement
SCHEDULE = (1.0, 0.8, 0.5, 0.6, 0.55, 0.7, 0.9, 0.95, 1.0, 1.1)


class Scripted(TinyMLP):
    """Trains like TinyMLP; logs a scripted val_loss per epoch (one validation batch)."""

    def __init__(self, schedule: tuple[float, ...] = SCHEDULE) -> None:
        super().__init__()
        self.schedule = schedule
        self.calls = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.schedule[self.calls])
        self.calls += 1


def fit(make_trainer: Any, model: Any, epochs: int = 10, **kwargs: Any) -> torchplug.Trainer:
    trainer = make_trainer(max_epochs=epochs, **kwargs)
    trainer.fit(model, tiny_loader(n=16, batch_size=8), tiny_loader(n=8, batch_size=8))
    return trainer


def test_early_stopping_stops_at_the_expected_epoch(make_trainer: Any) -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    trainer = fit(make_trainer, Scripted(), callbacks=[stopper])
    # best at epoch 2 (0.5); epochs 3 and 4 do not improve: stop after epoch 4
    assert trainer.current_epoch == 5
    assert stopper.stopped_epoch == 4
    assert stopper.wait_count == 2
    assert stopper.best_score == 0.5
    assert trainer.global_step == 10
    assert trainer.should_stop
    saved = ckpt.load(trainer.checkpoint_path)
    assert saved["epoch"] == 5
    assert saved["callbacks"][stopper.state_key]["wait_count"] == 2


def test_early_stopping_min_delta_thresholds_and_train_epoch_end(make_trainer: Any) -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=5, stopping_threshold=0.55)
    assert fit(make_trainer, Scripted(), callbacks=[stopper]).current_epoch == 3  # 0.5 <= 0.55 at epoch 2
    stopper = EarlyStopping(monitor="val_loss", patience=1, min_delta=0.25)
    assert fit(make_trainer, Scripted(), callbacks=[stopper]).current_epoch == 2  # 0.8 is not 0.25 better
    nan = (1.0, float("nan"), 0.1)
    assert fit(make_trainer, Scripted(nan), callbacks=[EarlyStopping("val_loss", patience=9)]).current_epoch == 2
    # No validation: checked at the train epoch's end, on the training metric
    trainer = make_trainer(max_epochs=6, callbacks=[EarlyStopping(monitor="train_loss", mode="max", patience=1)])
    trainer.fit(TinyMLP(), tiny_loader(n=16, batch_size=8))
    assert trainer.current_epoch == 2  # the loss falls: "max" never improves after the first check


def test_early_stopping_resume_continues_the_patience_counter(make_trainer: Any) -> None:
    first = fit(make_trainer, Scripted(), epochs=4, callbacks=[EarlyStopping("val_loss", patience=2)])
    assert first.current_epoch == 4  # one epoch without improvement so far
    model = Scripted()
    model.calls = 4  # the scripted metric continues where the first fit left off
    stopper = EarlyStopping("val_loss", patience=2)
    trainer = make_trainer(max_epochs=10, callbacks=[stopper])
    trainer.fit(model, tiny_loader(n=16, batch_size=8), tiny_loader(n=8, batch_size=8), ckpt_path=first.checkpoint_path)
    assert trainer.current_epoch == 5
    assert stopper.stopped_epoch == 4


def test_a_monitor_never_logged_names_the_logged_metrics(make_trainer: Any) -> None:
    with pytest.raises(PluginHookError, match="early_stopping") as info:
        fit(make_trainer, Scripted(), callbacks=[EarlyStopping(monitor="val_acc")])
    cause = info.value.__cause__
    assert isinstance(cause, MisconfigurationError)
    assert "'val_acc', which was never logged" in str(cause)
    assert "'train_loss', 'val_loss'" in str(cause)
    with pytest.raises(PluginHookError, match="model_checkpoint"):
        fit(make_trainer, Scripted(), callbacks=[ModelCheckpoint(monitor="val_acc")])
    with pytest.raises(MisconfigurationError, match="enable_checkpointing=False"):
        make_trainer(callbacks=[ModelCheckpoint()], enable_checkpointing=False)
    with pytest.raises(MisconfigurationError, match="callbacks= takes callback objects"):
        make_trainer(callbacks=["early_stopping"])


def test_model_checkpoint_keeps_exactly_the_top_k_and_each_resumes(make_trainer: Any, tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", save_top_k=3, save_last=True,
                            filename="{epoch}-{val_loss:.2f}")
    trainer = fit(make_trainer, Scripted(), epochs=8, callbacks=[saver])
    expected = {"epoch=2-val_loss=0.50.ckpt", "epoch=4-val_loss=0.55.ckpt", "epoch=3-val_loss=0.60.ckpt"}
    assert {p.name for p in (tmp_path / "best").iterdir()} == expected | {"last.ckpt"}
    assert {Path(p).name: s for p, s in saver.best_k_models.items()} == pytest.approx({  # float32 means
        "epoch=2-val_loss=0.50.ckpt": 0.5, "epoch=4-val_loss=0.55.ckpt": 0.55, "epoch=3-val_loss=0.60.ckpt": 0.6})
    assert Path(saver.best_model_path).name == "epoch=2-val_loss=0.50.ckpt"
    assert saver.best_model_score == 0.5
    for name in expected:
        path = tmp_path / "best" / name
        data = ckpt.load(path)
        epoch = int(name.split("-")[0].split("=")[1])
        assert data["epoch"] == epoch
        assert data["global_step"] == 2 * (epoch + 1)
        resumed = make_trainer(max_epochs=epoch + 2, enable_checkpointing=True)
        with pytest.warns(PlanChangedWarning, match="model_checkpoint"):  # resumed without the callback
            resumed.fit(TinyMLP(), tiny_loader(n=16, batch_size=8), ckpt_path=path)
        assert resumed.current_epoch == epoch + 2
        assert resumed.global_step == 2 * (epoch + 2)
    # resume continues the top-k list: the files from before count, new better ones replace them
    model = Scripted((0.1, 0.2) * 5)
    again = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", save_top_k=3,
                            filename="{epoch}-{val_loss:.2f}")
    make_trainer(max_epochs=9, callbacks=[again]).fit(model, tiny_loader(n=16, batch_size=8),
                                                      tiny_loader(n=8, batch_size=8), ckpt_path=trainer.checkpoint_path)
    assert sorted(Path(p).name for p in again.best_k_models) == [
        "epoch=2-val_loss=0.50.ckpt", "epoch=4-val_loss=0.55.ckpt", "epoch=8-val_loss=0.10.ckpt"]
    assert Path(again.best_model_path).name == "epoch=8-val_loss=0.10.ckpt"
    assert {p.name for p in (tmp_path / "best").glob("epoch=*")} == {Path(p).name for p in again.best_k_models}


def test_model_checkpoint_defaults_steps_and_no_monitor(make_trainer: Any, tmp_path: Path) -> None:
    saver = ModelCheckpoint(monitor="val_loss")  # the run folder's checkpoints/, the best one
    trainer = fit(make_trainer, Scripted(), epochs=4, callbacks=[saver])
    folder = Path(trainer.log_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=2-val_loss=0.500.ckpt", "last.ckpt"]
    latest = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=3, save_top_k=2)
    make_trainer(max_epochs=5, callbacks=[latest]).fit(TinyMLP(), tiny_loader(n=16, batch_size=8))
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["epoch=2-step=6.ckpt", "epoch=4-step=9.ckpt"]


def test_model_checkpoint_sigkill_during_a_save_leaves_every_kept_file_loadable(tmp_path: Path) -> None:
    """The save of epoch 2's file (better than epoch 0's, which it is to replace in the top 2)
    is killed half-way through writing: the two files kept so far are both still there and
    load, and the half-written one never got a .ckpt name."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_callbacks import Scripted
        import torchplug
        from torchplug.callbacks import ModelCheckpoint
        from torchplug.testing.models import tiny_loader
        real_save = torch.save
        def dying_save(obj, f, *args, **kwargs):
            states = obj.get("callbacks", {{}}).values()  # the file's own name is only in its bookkeeping
            if obj["epoch"] == 2 and any("epoch=2-" in k for st in states for k in st["best_k_models"]):
                f.write(b"PK half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
        saver = ModelCheckpoint(dirpath={str(tmp_path / "best")!r}, monitor="val_loss", save_top_k=2)
        trainer = torchplug.Trainer(max_epochs=8, callbacks=[saver], enable_progress_bar=False, logger=False,
                                    enable_checkpointing=True, default_root_dir={str(tmp_path)!r},
                                    autoload_plugins=False)
        trainer.fit(Scripted(), tiny_loader(n=16, batch_size=8), tiny_loader(n=8, batch_size=8))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    kept = sorted((tmp_path / "best").glob("*.ckpt"))
    assert kept, "nothing was saved before the kill"
    for path in kept:
        data = ckpt.load(path)
        assert set(data["callbacks"])
        assert data["global_step"] > 0
    assert [p.name for p in kept] == ["epoch=0-val_loss=1.000.ckpt", "epoch=1-val_loss=0.800.ckpt"]
    partial = [p.name for p in (tmp_path / "best").iterdir() if p.suffix != ".ckpt"]
    assert len(partial) == 1
    assert partial[0].startswith(".epoch=2-val_loss=0.500.ckpt.")  # the temporary, never renamed


def test_learning_rate_monitor_logs_lightning_names(make_trainer: Any) -> None:
    class TwoGroups(TinyMLP):
        def configure_optimizers(self) -> Any:
            first, second = self.net[0], self.net[2]
            opt = torch.optim.SGD([{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.01}],
                                  lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trainer = make_trainer(max_epochs=1, log_every_n_steps=1, callbacks=[LearningRateMonitor()])
    trainer.fit(TwoGroups(), tiny_loader(n=24, batch_size=8))
    series = read_csv(Path(trainer.log_dir) / "metrics.csv")
    assert [(s, v) for s, _, v in series["lr-SGD/pg1"]] == [(1, 0.1), (2, 0.05), (3, 0.025)]
    assert [v for _, _, v in series["lr-SGD/pg2"]] == [0.01, 0.005, 0.0025]
    trainer = make_trainer(max_epochs=2, callbacks=[LearningRateMonitor(logging_interval="epoch")])
    trainer.fit(TinyMLP(), tiny_loader(n=16, batch_size=8))
    assert trainer.logged_metrics["lr-SGD"] == 0.1
    assert [(s, e) for s, e, _ in read_csv(Path(trainer.log_dir) / "metrics.csv")["lr-SGD"]] == [(2, 0), (4, 1)]
