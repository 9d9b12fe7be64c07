"""TensorBoardLogger on real runs, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tb_support import RankReport, Scripted, read_scalars
from torchplug_tensorboard import TensorBoardLogger

from torchplug import MisconfigurationError, Trainer
from torchplug.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from torchplug.metrics import read_csv
from torchplug.testing.conformance import CallbackPluginContract
from torchplug.testing.models import TinyMLP, tiny_loader
from torchplug_ddp import DDPPlugin


def quiet(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    return {"default_root_dir": tmp_path, "enable_progress_bar": False, "autoload_plugins": False, **kwargs}


def test_every_logged_scalar_is_in_the_event_files_at_its_step(tmp_path: Path) -> None:
    trainer = Trainer(**quiet(tmp_path, max_epochs=3, log_every_n_steps=3, plugins=["tensorboard"],
                              callbacks=[LearningRateMonitor(logging_interval="step")]))
    trainer.fit(TinyMLP(), tiny_loader(n=32, batch_size=8), tiny_loader(n=8))
    logger = next(rec.plugin for rec in trainer.pm.records if isinstance(rec.plugin, TensorBoardLogger))
    assert logger.written_dir == Path(trainer.log_dir)
    scalars = read_scalars(Path(trainer.log_dir))
    csv = read_csv(Path(trainer.log_dir) / "metrics.csv")
    assert set(scalars) == set(csv) == {"train_loss", "val_loss", "lr-SGD"}
    for tag, rows in csv.items():
        assert [step for step, _ in scalars[tag]] == [step for step, _, _ in rows]
        assert [value for _, value in scalars[tag]] == pytest.approx([value for *_, value in rows], rel=1e-6)
    assert [step for step, _ in scalars["val_loss"]] == [4, 8, 12]


def test_hyperparameters_and_an_explicit_folder(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder = tmp_path / "tb"
    Trainer(**quiet(tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                    plugins=[TensorBoardLogger(log_dir=folder)])).fit(Scripted(), tiny_loader(n=16), tiny_loader(n=8))
    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
               for k, v in start.session_start_info.hparams.items()}
    assert hparams == {"lr": 0.1, "hidden": 16.0, "schedule": "scripted"}
    assert [step for step, _ in read_scalars(folder)["val_loss"]] == [2]


def test_a_fast_dev_run_writes_no_event_file(tmp_path: Path) -> None:
    folder = tmp_path / "tb"
    trainer = Trainer(**quiet(tmp_path / "run", fast_dev_run=2, plugins=[TensorBoardLogger(log_dir=folder)]))
    trainer.fit(TinyMLP(), tiny_loader(n=32, batch_size=8), tiny_loader(n=8))
    assert trainer.global_step == 2
    assert not folder.exists()
    assert not (tmp_path / "run").exists()
    Trainer(**quiet(tmp_path / "run", fast_dev_run=True, plugins=["tensorboard"]))  # no run folder: no refusal


def test_without_a_run_folder_it_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationError, match=r"TensorBoardLogger.*log_dir=") as info:
        Trainer(**quiet(tmp_path, logger=False, enable_checkpointing=False, plugins=["tensorboard"]))
    assert "torchplug-tensorboard" in str(info.value)


@pytest.mark.timeout(180)
def test_two_gloo_ranks_stop_at_the_same_epoch_and_rank_zero_alone_writes(tmp_path: Path) -> None:
    """EarlyStopping under devices=2: every rank stops after epoch 4 (best at 2, patience 2);
    one event file, from rank 0; ModelCheckpoint keeps the best one in rank 0's run folder."""
    out = tmp_path / "ranks"
    out.mkdir()
    saver = ModelCheckpoint(monitor="val_loss")  # rank 0's run folder, broadcast to rank 1
    trainer = Trainer(**quiet(tmp_path, devices=2, max_epochs=10,
                              plugins=[DDPPlugin(timeout=60), TensorBoardLogger(), RankReport(str(out))],
                              callbacks=[EarlyStopping(monitor="val_loss", patience=2), saver]))
    trainer.fit(Scripted(), tiny_loader(n=32, batch_size=8), tiny_loader(n=16, batch_size=8))
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["epoch"], r["step"], r["should_stop"]) for r in reports] == [(5, 10, True), (5, 10, True)]
    assert reports[0]["pid"] != reports[1]["pid"]
    assert trainer.current_epoch == 5
    events = list(Path(trainer.log_dir).glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert [step for step, _ in read_scalars(Path(trainer.log_dir))["val_loss"]] == [2, 4, 6, 8, 10]
    folder = Path(trainer.log_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=2-val_loss=0.500.ckpt", "last.ckpt"]


class TestTensorBoardContract(CallbackPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Any:
        return TensorBoardLogger

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        return {"logger": True}
