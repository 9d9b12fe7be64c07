"""``torchplug.DataModule`` (Lightning's LightningDataModule) with fit, validate, test and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import torchplug
from torchplug import checkpoint as ckpt


class Digits(torchplug.DataModule):
    """The conftest data, built in setup; records what the Trainer called and keeps a counter
    in its state."""

    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.calls: list[str] = []
        self.state = {"seen": 0}

    def prepare_data(self) -> None:
        self.calls.append("prepare_data")

    def setup(self, stage: str | None = None) -> None:
        self.calls.append(f"setup:{stage}")

    def teardown(self, stage: str | None = None) -> None:
        self.calls.append(f"teardown:{stage}")

    def train_dataloader(self) -> Any:
        self.calls.append("train_dataloader")
        return self.tp.loader(n=32)

    def val_dataloader(self) -> Any:
        self.calls.append("val_dataloader")
        return self.tp.loader(n=16, shuffle=False, seed=1)

    def test_dataloader(self) -> Any:
        self.calls.append("test_dataloader")
        return self.tp.loader(n=16, shuffle=False, seed=2)

    def predict_dataloader(self) -> Any:
        self.calls.append("predict_dataloader")
        return self.tp.loader(n=16, shuffle=False, seed=3)

    def state_dict(self) -> dict[str, Any]:
        self.state["seen"] += 1
        return dict(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calls.append(f"load_state_dict:{state_dict['seen']}")


def test_fit_on_a_datamodule_equals_fit_on_its_loaders_and_keeps_its_state(tp: Any, make_trainer: Any) -> None:
    dm = Digits(tp)
    model = tp.fresh_net()
    trainer = make_trainer(max_epochs=2, logger=False)
    torch.manual_seed(0)  # dropout and shuffling draw from the global RNG
    trainer.fit(model, datamodule=dm)
    assert dm.calls == ["prepare_data", "setup:fit", "train_dataloader", "val_dataloader", "teardown:fit"]
    same = tp.fresh_net()
    torch.manual_seed(0)
    make_trainer(max_epochs=2, logger=False).fit(same, tp.loader(n=32), tp.loader(n=16, shuffle=False, seed=1))
    assert tp.params_equal(model, same)  # bit-identical: the datamodule only supplies the loaders
    assert trainer.callback_metrics["val_loss"] > 0
    saved = ckpt.load(trainer.checkpoint_path)
    assert saved["datamodule"] == {"seen": 2}  # one checkpoint per epoch
    dm.calls.clear()
    make_trainer(max_epochs=3, logger=False).fit(tp.fresh_net(), datamodule=dm, ckpt_path=trainer.checkpoint_path)
    assert "load_state_dict:2" in dm.calls


def test_validate_test_and_predict_on_a_datamodule(tp: Any, make_trainer: Any) -> None:
    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0])

    dm, model, trainer = Digits(tp), Net(), make_trainer(logger=False)
    assert trainer.validate(model, datamodule=dm) == trainer.validate(model, tp.loader(n=16, shuffle=False, seed=1))
    assert trainer.test(model, datamodule=dm, verbose=False) == trainer.test(
        model, tp.loader(n=16, shuffle=False, seed=2), verbose=False)
    assert len(trainer.predict(model, datamodule=dm)) == 2
    assert dm.calls == ["prepare_data", "setup:validate", "val_dataloader", "teardown:validate",
                        "prepare_data", "setup:test", "test_dataloader", "teardown:test",
                        "prepare_data", "setup:predict", "predict_dataloader", "teardown:predict"]


def test_module_dataloaders_are_used_without_loaders_or_datamodule(tp: Any, make_trainer: Any) -> None:
    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def train_dataloader(self) -> Any:
            return tp.loader(n=16)

        def test_dataloader(self) -> Any:
            return tp.loader(n=8, shuffle=False)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test_n", float(len(batch[1])))

    trainer = make_trainer(max_epochs=1, logger=False)
    trainer.fit(Net())
    assert trainer.global_step == 2
    assert trainer.test(verbose=False) == [{"test_n": 8.0}]  # the fitted module, its own test loader


def test_prepare_data_runs_on_the_machine_s_first_process_only(tp: Any, make_trainer: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    dm = Digits(tp)
    make_trainer(max_epochs=1, logger=False, enable_checkpointing=False).fit(tp.fresh_net(), datamodule=dm)
    assert dm.calls[0] == "setup:fit"


def test_refusals_before_any_work(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    trainer = make_trainer(max_epochs=1)
    dm = Digits(tp)
    with pytest.raises(torchplug.MisconfigurationError, match="train_dataloaders and val_dataloaders and datamodule"):
        trainer.fit(tp.fresh_net(), tp.loader(), tp.loader(), datamodule=dm)
    with pytest.raises(torchplug.MisconfigurationError, match="both dataloaders= and datamodule=Digits"):
        trainer.validate(tp.fresh_net(), tp.loader(), datamodule=dm)
    with pytest.raises(torchplug.MisconfigurationError, match="both dataloaders= and datamodule=Digits"):
        trainer.predict(tp.fresh_net(), tp.loader(), datamodule=dm)
    assert dm.calls == []  # refused before prepare_data/setup

    class Typo(Digits):
        def train_dataloder(self) -> Any:
            return None

    with pytest.raises(torchplug.MisconfigurationError, match=r"Typo\.train_dataloder.*'train_dataloader'"):
        trainer.fit(tp.fresh_net(), datamodule=Typo(tp))

    class Empty(torchplug.DataModule):
        pass

    with pytest.raises(torchplug.MisconfigurationError, match=r"its train_dataloader\(\) returned None"):
        trainer.fit(tp.fresh_net(), datamodule=Empty())
    with pytest.raises(torchplug.MisconfigurationError, match=r"takes a torchplug\.DataModule"):
        trainer.fit(tp.fresh_net(), datamodule=object())
    assert tp.files_under(tmp_path) == []
