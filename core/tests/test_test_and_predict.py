"""``Trainer.test`` and ``Trainer.predict`` (torchplug.evalrun): numbers against a hand loop, the
module's test/predict hooks in Lightning's order, the fitted module and checkpoints, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchplug
from torchplug.modulehooks import MODULE_HOOKS


class Evaluated(torchplug.TrainingModule):
    """Linear regression on (x, y); records the test/predict hooks it gets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)
        self.calls: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        assert not self.training
        assert not torch.is_grad_enabled()
        self.log("test_loss", nn.functional.cross_entropy(logits, y))
        self.log("test_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return {"n": torch.tensor(len(y))}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int | None = None) -> torch.Tensor:
        return self(batch[0]).argmax(1)

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup:{stage}")

    def teardown(self, stage: str) -> None:
        self.calls.append(f"teardown:{stage}")

    def on_test_start(self) -> None:
        self.calls.append("on_test_start")

    def on_test_epoch_start(self) -> None:
        self.calls.append("on_test_epoch_start")

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self.calls.append(f"on_test_batch_start:{batch_idx}:{dataloader_idx}")

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self.calls.append(f"on_test_batch_end:{batch_idx}:{int(outputs['n'])}")

    def test_epoch_end(self, outputs: list[Any]) -> None:
        flat = [o for group in outputs for o in group] if isinstance(outputs[0], list) else outputs  # per loader
        self.calls.append(f"test_epoch_end:{sum(int(o['n']) for o in flat)}")
        self.log("test_epoch_value", 7.0)

    def on_test_epoch_end(self) -> None:
        self.calls.append("on_test_epoch_end")

    def on_test_end(self) -> None:
        self.calls.append("on_test_end")

    def on_predict_start(self) -> None:
        self.calls.append("on_predict_start")

    def on_predict_epoch_start(self) -> None:
        self.calls.append("on_predict_epoch_start")

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self.calls.append(f"on_predict_batch_start:{batch_idx}")

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self.calls.append(f"on_predict_batch_end:{batch_idx}:{len(outputs)}")

    def on_predict_epoch_end(self, outputs: list[Any]) -> None:
        self.calls.append(f"on_predict_epoch_end:{len(outputs)}")

    def on_predict_end(self) -> None:
        self.calls.append("on_predict_end")


def hand_test(model: nn.Module, loader: Any) -> dict[str, float]:
    """The test metrics by hand: each the mean over the batches of the batch value."""
    losses, accs = [], []
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            losses.append(nn.functional.cross_entropy(logits, y))
            accs.append((logits.argmax(1) == y).float().mean())
    return {"test_loss": float(sum(losses) / len(losses)), "test_acc": float(sum(accs) / len(accs))}


def test_test_metrics_equal_a_hand_loop_and_the_module_hooks_run_in_order(tp: Any, make_trainer: Any,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model, loader = Evaluated(), tp.loader(n=20, shuffle=False)  # batches of 8, 8, 4
    results = make_trainer(logger=False).test(model, loader)
    assert results == [{**hand_test(model, loader), "test_epoch_value": 7.0}]
    assert model.training  # given back in train mode
    assert model.calls == ["setup:test", "on_test_start", "on_test_epoch_start",
                           "on_test_batch_start:0:0", "on_test_batch_end:0:8", "on_test_batch_start:1:0",
                           "on_test_batch_end:1:8", "on_test_batch_start:2:0", "on_test_batch_end:2:4",
                           "test_epoch_end:20", "on_test_epoch_end", "on_test_end", "teardown:test"]
    defined = {call.split(":")[0] for call in model.calls} - {"setup", "teardown"}
    assert defined | {name for name in MODULE_HOOKS if name.startswith("on_predict_")} == {
        name for name in MODULE_HOOKS if name.startswith(("on_test_", "test_", "on_predict_"))}
    out = capsys.readouterr().out  # verbose=True: Lightning 1.x's results block
    assert "DATALOADER:0 TEST RESULTS" in out
    assert "test_acc" in out


def test_several_test_loaders_give_one_dict_each_with_lightning_names(tp: Any, make_trainer: Any) -> None:
    model = Evaluated()
    first, second = tp.loader(n=16, shuffle=False), tp.loader(n=8, shuffle=False, seed=1)
    with pytest.raises(torchplug.MisconfigurationError, match="takes no dataloader_idx, but 2 test loaders"):
        make_trainer(logger=False).test(model, [first, second])
    model.test_step = lambda batch, batch_idx, dataloader_idx: Evaluated.test_step(model, batch, batch_idx)
    results = make_trainer(logger=False).test(model, [first, second], verbose=False)
    one, two = hand_test(model, first), hand_test(model, second)
    assert results == [
        {"test_loss/dataloader_idx_0": one["test_loss"], "test_acc/dataloader_idx_0": one["test_acc"],
         "test_epoch_value": 7.0},
        {"test_loss/dataloader_idx_1": two["test_loss"], "test_acc/dataloader_idx_1": two["test_acc"],
         "test_epoch_value": 7.0},
    ]
    assert "on_test_batch_start:0:1" in model.calls
    assert "test_epoch_end:24" in model.calls


def test_test_after_fit_uses_the_fitted_module_and_ckpt_path_loads_weights(tp: Any, make_trainer: Any,
                                                                           tmp_path: Path) -> None:
    trainer = make_trainer(max_epochs=2, logger=False)
    fitted, test_loader = Evaluated(), tp.loader(n=16, shuffle=False, seed=2)
    trainer.fit(fitted, tp.loader(n=32))
    before = hand_test(Evaluated(), test_loader)
    expected = hand_test(fitted, test_loader)
    assert expected != before  # training changed the numbers
    assert trainer.test(dataloaders=test_loader, verbose=False)[0]["test_loss"] == expected["test_loss"]
    assert trainer.callback_metrics["test_loss"] == expected["test_loss"]
    fresh = Evaluated()
    result = make_trainer(logger=False).test(fresh, test_loader, ckpt_path=trainer.checkpoint_path, verbose=False)
    assert result[0]["test_loss"] == expected["test_loss"]
    last = trainer.test(Evaluated(), test_loader, ckpt_path="last", verbose=False)
    assert last[0]["test_acc"] == expected["test_acc"]
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(torchplug.CheckpointError, match=r"nope\.ckpt"):
        make_trainer(logger=False).test(Evaluated(), test_loader, ckpt_path=missing)


def test_predict_returns_every_batch_in_order(tp: Any, make_trainer: Any) -> None:
    model, loader = Evaluated(), tp.loader(n=20, shuffle=False)
    trainer = make_trainer(logger=False)
    predictions = trainer.predict(model, loader)
    with torch.no_grad():
        hand = [model(x).argmax(1) for x, _ in loader]
    assert len(predictions) == 3
    assert all(torch.equal(p, h) for p, h in zip(predictions, hand))
    assert model.calls == ["setup:predict", "on_predict_start", "on_predict_epoch_start",
                           "on_predict_batch_start:0", "on_predict_batch_end:0:8", "on_predict_batch_start:1",
                           "on_predict_batch_end:1:8", "on_predict_batch_start:2", "on_predict_batch_end:2:4",
                           "on_predict_epoch_end:3", "on_predict_end", "teardown:predict"]
    several = trainer.predict(model, [loader, tp.loader(n=8, shuffle=False)])
    assert [len(p) for p in several] == [3, 1]
    assert trainer.predict(model, loader, return_predictions=False) is None


def test_default_predict_step_is_the_forward(make_trainer: Any) -> None:
    class Plain(torchplug.TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(x)
            return out

    x = torch.randn(10, 3)
    model = Plain()
    predictions = make_trainer(logger=False).predict(model, torch.utils.data.DataLoader(x, batch_size=4))
    with torch.no_grad():
        assert torch.equal(torch.cat(predictions), model(x))


def test_refusals_name_what_is_missing(tp: Any, make_trainer: Any) -> None:
    trainer = make_trainer(logger=False)
    with pytest.raises(torchplug.MisconfigurationError, match="has no test_step"):
        trainer.test(tp.fresh_net(), tp.loader())
    with pytest.raises(torchplug.MisconfigurationError, match="without a model needs a fit first"):
        trainer.test()
    with pytest.raises(torchplug.MisconfigurationError, match=r"No test data.*Evaluated.test_dataloader"):
        trainer.test(Evaluated())
    with pytest.raises(torchplug.MisconfigurationError, match="ckpt_path='last'"):
        trainer.test(Evaluated(), tp.loader(), ckpt_path="last")
    with pytest.raises(torchplug.MisconfigurationError, match=r"test_dataloaders= is Lightning 1\.1's spelling"):
        trainer.test(Evaluated(), tp.loader(), test_dataloaders=tp.loader())
    assert trainer.test(Evaluated(), test_dataloaders=tp.loader(), verbose=False)[0].keys() == {
        "test_loss", "test_acc", "test_epoch_value"}

    class Typo(Evaluated):
        def on_test_batch_ends(self) -> None:
            pass

    with pytest.raises(torchplug.MisconfigurationError, match=r"on_test_batch_ends.*Did you mean 'on_test_batch_end'"):
        trainer.test(Typo(), tp.loader())
