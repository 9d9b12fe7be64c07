"""What a fit leaves behind and reports: counters with Lightning's meaning, callback_metrics,
metrics.csv, run folders, validate()."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

import torchplug
from torchplug.metrics import read_csv


@pytest.mark.parametrize(("kwargs", "step", "epoch"), [
    ({"max_epochs": 3}, 21, 3),                             # 7 batches per epoch
    ({"max_epochs": 2, "accumulate_grad_batches": 3}, 6, 2),  # windows 3, 3, 1
    ({"max_steps": 5}, 5, 0),                               # stopped inside epoch 0
    ({"max_steps": 7}, 7, 1),                               # stopped at the end of epoch 0: it completed
    ({"max_steps": 9, "max_epochs": 5}, 9, 1),
    ({"max_steps": 100, "max_epochs": 2}, 14, 2),           # the first limit wins
    ({"max_epochs": 2, "limit_train_batches": 3}, 6, 2),
])
def test_global_step_and_current_epoch_as_in_lightning(tp: Any, make_trainer: Any, kwargs: dict[str, Any],
                                                       step: int, epoch: int) -> None:
    trainer = make_trainer(logger=False, enable_checkpointing=False, **kwargs)
    assert (trainer.global_step, trainer.current_epoch) == (0, 0)
    trainer.fit(tp.fresh_net(), tp.loader())
    assert (trainer.global_step, trainer.current_epoch) == (step, epoch)


def test_counters_are_live_during_fit(tp: Any, make_trainer: Any) -> None:
    seen = []

    class Watch(torchplug.Plugin):
        def on_train_batch_end(self, trainer: torchplug.Trainer, batch_idx: int) -> None:
            seen.append((trainer.current_epoch, batch_idx, trainer.global_step))

    trainer = make_trainer(plugins=[Watch()], max_epochs=2, accumulate_grad_batches=2, logger=False,
                           enable_checkpointing=False)
    trainer.fit(tp.fresh_net(), tp.loader(n=24))  # 3 batches: windows 2, 1
    assert seen == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 2), (1, 1, 3), (1, 2, 4)]


def test_metrics_csv_and_callback_metrics(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    trainer = make_trainer(max_epochs=2, log_every_n_steps=3)
    trainer.fit(tp.fresh_net(), tp.loader(), tp.loader(n=24, batch_size=12, shuffle=False))
    assert trainer.log_dir == str(tmp_path / "torchplug_logs" / "version_0")
    assert trainer.checkpoint_path == str(Path(trainer.log_dir) / "checkpoints" / "last.ckpt")
    assert tp.files_under(Path(trainer.log_dir)) == ["checkpoints", "checkpoints/last.ckpt", "metrics.csv"]
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "epoch", "metric", "value"]
    # train_loss every 3 steps and at each epoch's end; validation at each epoch's end
    keys = [(int(s), int(e), m) for s, e, m, _ in rows[1:]]
    assert keys == [
        (3, 0, "train_loss"), (6, 0, "train_loss"), (7, 0, "train_loss"), (7, 0, "val_loss"), (7, 0, "val_acc"),
        (9, 1, "train_loss"), (12, 1, "train_loss"), (14, 1, "train_loss"), (14, 1, "val_loss"),
        (14, 1, "val_acc"),
    ]
    series = read_csv(Path(trainer.log_dir) / "metrics.csv")
    assert set(trainer.callback_metrics) == {"train_loss", "val_loss", "val_acc"}
    assert all(type(v) is float for v in trainer.callback_metrics.values())
    assert trainer.callback_metrics["val_loss"] == series["val_loss"][-1][2]
    assert trainer.callback_metrics["train_loss"] == series["train_loss"][-1][2]
    # The validation value is the mean over the validation batches, computed here by hand.
    model = tp.Net()
    model.load_state_dict(torchplug.checkpoint.load(trainer.checkpoint_path)["state_dict"])
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(x), y) for x, y in tp.loader(n=24, batch_size=12,
                                                                                         shuffle=False)]
    assert trainer.callback_metrics["val_loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-6)


def test_each_fit_gets_a_new_version_folder_and_switches_work(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    make_trainer(max_steps=2).fit(tp.fresh_net(), tp.loader())
    make_trainer(max_steps=2, enable_checkpointing=False).fit(tp.fresh_net(), tp.loader())
    make_trainer(max_steps=2, logger=False).fit(tp.fresh_net(), tp.loader())
    trainer = make_trainer(max_steps=2, logger=False, enable_checkpointing=False)
    trainer.fit(tp.fresh_net(), tp.loader())
    assert trainer.log_dir is None
    assert trainer.checkpoint_path is None
    assert tp.files_under(tmp_path / "torchplug_logs") == [
        "version_0", "version_0/checkpoints", "version_0/checkpoints/last.ckpt", "version_0/metrics.csv",
        "version_1", "version_1/metrics.csv",
        "version_2", "version_2/checkpoints", "version_2/checkpoints/last.ckpt",
    ]
    assert set(trainer.callback_metrics) == {"train_loss"}  # metrics are kept without a logger too


def test_validation_schedule_and_limits(tp: Any, make_trainer: Any) -> None:
    ends = []

    class Watch(torchplug.Plugin):
        def on_validation_end(self, trainer: torchplug.Trainer, metrics: dict[str, float]) -> None:
            ends.append(trainer.current_epoch)

    val = tp.loader(n=24, shuffle=False)
    make_trainer(plugins=[Watch()], max_epochs=4, check_val_every_n_epoch=2, logger=False,
                 enable_checkpointing=False).fit(tp.fresh_net(), tp.loader(), val)
    assert ends == [1, 3]
    ends.clear()
    make_trainer(plugins=[Watch()], max_epochs=2, limit_val_batches=0, logger=False,
                 enable_checkpointing=False).fit(tp.fresh_net(), tp.loader(), val)
    assert ends == []


def test_validate(tp: Any, make_trainer: Any) -> None:
    model = tp.fresh_net()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(max_epochs=1)
    val = tp.loader(n=24, batch_size=24, shuffle=False)
    metrics = trainer.validate(model, val)
    assert set(metrics) == {"val_loss", "val_acc"}
    x, y = next(iter(val))
    model.eval()
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(x), y))
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert trainer.callback_metrics == metrics
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not list(Path(trainer.default_root_dir).iterdir())  # validate writes nothing
    # after fit too, and it does not replace the fit's state for save_checkpoint
    trainer.fit(model, tp.loader(), ckpt_path=None)
    trainer.validate(model, val)
    trainer.save_checkpoint(Path(trainer.default_root_dir) / "after.ckpt")
    assert torchplug.checkpoint.load(Path(trainer.default_root_dir) / "after.ckpt")["global_step"] == 7


def test_validate_errors(tp: Any, make_trainer: Any) -> None:
    class NoValidation(torchplug.TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)

    with pytest.raises(torchplug.MisconfigurationError, match=r"has no validation_step\(\)"):
        make_trainer().validate(NoValidation(), tp.loader())
    with pytest.raises(torchplug.MisconfigurationError, match="No validation data"):
        make_trainer().validate(tp.fresh_net())


def test_model_methods_supply_the_data(tp: Any, make_trainer: Any) -> None:
    class WithData(tp.Net):  # type: ignore[misc, name-defined]
        def train_dataloader(self) -> Any:
            return tp.loader()

        def val_dataloader(self) -> Any:
            return tp.loader(n=16, shuffle=False)

    trainer = make_trainer(max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(WithData())
    assert trainer.global_step == 7
    assert "val_loss" in trainer.callback_metrics


def test_deterministic_flag_is_restored_after_fit(tp: Any, make_trainer: Any) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    seen = []

    class Watch(torchplug.Plugin):
        def on_fit_start(self) -> None:
            seen.append(torch.are_deterministic_algorithms_enabled())

    make_trainer(plugins=[Watch()], deterministic=True, max_steps=1, logger=False,
                 enable_checkpointing=False).fit(tp.fresh_net(), tp.loader())
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled()


def test_log_outside_a_trainer_is_a_no_op_and_log_checks_values(tp: Any) -> None:
    model = tp.fresh_net()
    model.log("x", 1.0)  # nothing attached: ignored
    from torchplug.module import MetricStore

    store = MetricStore()
    with pytest.raises(ValueError, match="needs a scalar"):
        store.log("x", torch.ones(3))
    with pytest.raises(TypeError, match="needs a number or a scalar tensor"):
        store.log("x", "high")


def test_trainer_pickles_as_its_arguments(tp: Any, tmp_path: Path) -> None:
    import pickle

    trainer = torchplug.Trainer(default_root_dir=tmp_path, max_epochs=3, accumulate_grad_batches=2,
                                autoload_plugins=False)
    copy = pickle.loads(pickle.dumps(trainer))
    assert copy.launched_copy
    assert not trainer.launched_copy
    assert (copy.max_epochs, copy.accumulate_grad_batches, copy.default_root_dir) == (3, 2, tmp_path)
