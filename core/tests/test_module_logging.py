"""``self.log``/``log_dict`` with Lightning 1.x's arguments: step and epoch values, their
names, reduce_fx, logger=False, and every argument torchplug cannot honour refused. The epoch
values are checked against means computed by hand from the same losses, read back from
metrics.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from torchplug.metrics import read_csv


def test_epoch_means_equal_hand_computed_means(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    losses: list[float] = []

    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self(x), y)
            losses.append(loss.item())
            self.log("loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log_dict({"big": loss * 10, "hidden": loss}, on_step=False, on_epoch=True, reduce_fx="max")
            self.log("hidden2", loss, logger=False)
            return loss

        def training_epoch_end(self, outputs: list[Any]) -> None:
            self.log("n_outputs", float(len(outputs)))  # an epoch value by default here

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y), reduce_fx="sum")

    trainer = make_trainer(max_epochs=2, log_every_n_steps=1)
    trainer.fit(Net(), tp.loader(n=32), tp.loader(n=16, shuffle=False))
    series = read_csv(Path(trainer.log_dir) / "metrics.csv")
    per_epoch = [losses[:4], losses[4:]]
    epoch_means = [value for _, _, value in series["loss_epoch"]]
    assert epoch_means == pytest.approx([sum(e) / 4 for e in per_epoch], rel=1e-6)
    assert [v for _, _, v in series["loss_step"]] == pytest.approx(losses, rel=1e-6)
    assert [v for _, _, v in series["big"]] == pytest.approx([max(e) * 10 for e in per_epoch], rel=1e-6)
    assert [v for _, _, v in series["n_outputs"]] == [4.0, 4.0]
    assert "hidden2" not in series  # logger=False: not written ...
    assert trainer.callback_metrics["hidden2"] == pytest.approx(losses[-1], rel=1e-6)  # ... but kept
    assert len(series["val_loss"]) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reduce_fx": "median"}, "use 'mean', 'sum', 'max' or 'min'"),
    ({"tbptt_reduce_fx": torch.mean}, "drop tbptt_reduce_fx"),
    ({"sync_dist_group": object()}, "drop sync_dist_group"),
    ({"enable_graph": True}, "enable_graph=True"),
    ({"on_step": False, "on_epoch": False}, "would log nothing"),
    ({"reduce_fx": "max", "sync_dist": True}, "mean or sum only"),
])
def test_log_arguments_torchplug_cannot_honour_are_refused(kwargs: dict[str, Any], message: str, tp: Any,
                                                           make_trainer: Any) -> None:
    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.log("x", loss, **kwargs)
            return loss

    with pytest.raises(ValueError, match=message):
        make_trainer(max_steps=1, logger=False, enable_checkpointing=False).fit(Net(), tp.loader())


def test_on_step_in_validation_is_refused(tp: Any, make_trainer: Any) -> None:
    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("v", 1.0, on_step=True)

    with pytest.raises(ValueError, match="on_step=True"):
        make_trainer(max_epochs=1, logger=False, enable_checkpointing=False).fit(
            Net(), tp.loader(n=16), tp.loader(n=16))
