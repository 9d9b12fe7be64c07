"""The public plugin-facing Trainer API (torchplug.trainer_api) on real runs, and a scan that
fails when a plugin or callback in this repository touches a private attribute of the Trainer."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import torchplug
from torchplug.callbacks import EarlyStopping
from torchplug.errors import PlanChangedWarning
from torchplug.metrics import postfix, read_csv
from torchplug.testing.models import TinyMLP, tiny_loader

ROOT = Path(__file__).resolve().parents[2]


class Watcher(torchplug.Plugin):
    """Stops at a step, logs from event hooks, and records what the public API shows."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.models: list[Any] = []
        self.rows: list[tuple[int, dict[str, float]]] = []

    def on_fit_start(self, trainer: Any) -> None:
        self.models.append(trainer.model)
        self.models.append(trainer.lightning_module)

    def on_train_batch_end(self, trainer: Any) -> None:
        trainer.log("plugin_step", torch.tensor(float(trainer.global_step)), prog_bar=True)
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: Any, epoch: int) -> None:
        trainer.log("plugin_epoch", float(epoch))
        trainer.log("hidden", 1.0, logger=False)

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        trainer.log("plugin_val", metrics["val_loss"] * 2)

    def on_log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))


def test_public_api_during_fit(make_trainer: Any) -> None:
    watcher = Watcher()
    trainer = make_trainer(max_epochs=2, plugins=[watcher], log_every_n_steps=3)
    model = TinyMLP()
    trainer.fit(model, tiny_loader(n=32, batch_size=8), tiny_loader(n=8))
    assert watcher.models == [model, model]
    assert trainer.model is model
    assert trainer.lightning_module is model
    # Rows: step 3 (interval), epoch 0's end (step 4), its validation, step 6, epoch 1's end, validation
    steps = [step for step, _ in watcher.rows]
    assert steps == [3, 4, 4, 6, 8, 8]
    assert watcher.rows[1][1].keys() == {"train_loss", "plugin_step", "plugin_epoch"}  # the epoch's own row
    assert watcher.rows[2][1].keys() == {"val_loss", "plugin_val"}  # logged in on_validation_end: that row
    assert watcher.rows[2][1]["plugin_val"] == pytest.approx(2 * watcher.rows[2][1]["val_loss"])
    series = read_csv(Path(trainer.log_dir) / "metrics.csv")
    assert [(s, e) for s, e, _ in series["plugin_val"]] == [(4, 0), (8, 1)]
    assert "hidden" not in series
    assert "hidden" not in trainer.logged_metrics
    assert trainer.callback_metrics["hidden"] == 1.0
    assert trainer.logged_metrics["plugin_epoch"] == 1.0
    assert not trainer.should_stop


def test_should_stop_ends_the_fit_like_max_steps_and_resumes(make_trainer: Any) -> None:
    trainer = make_trainer(max_epochs=5, plugins=[Watcher(stop_at=3)])
    trainer.fit(TinyMLP(), tiny_loader(n=32, batch_size=8))
    assert trainer.global_step == 3
    assert trainer.current_epoch == 0
    assert trainer.should_stop
    resumed = make_trainer(max_epochs=1)
    with pytest.warns(PlanChangedWarning, match="Watcher"):  # resumed without the stopping plugin
        resumed.fit(TinyMLP(), tiny_loader(n=32, batch_size=8), ckpt_path=trainer.checkpoint_path)
    assert resumed.global_step == 4  # the last.ckpt of step 3 continued at batch 3
    assert resumed.current_epoch == 1


def test_reduce_boolean_decision_in_one_process_and_trainer_log_outside_fit(make_trainer: Any) -> None:
    trainer = make_trainer()
    assert trainer.reduce_boolean_decision(True) is True
    assert trainer.reduce_boolean_decision(False, all=True) is False
    with pytest.raises(torchplug.MisconfigurationError, match="outside a fit"):
        trainer.log("x", 1.0)
    assert not trainer.fitting


def test_progress_bar_shows_prog_bar_metrics() -> None:
    assert postfix({"a": 1.0, "b": 2.0}, {"b"}) == {"b": "2"}
    assert postfix({"a": 1.0, "b": float("nan")}) == {"a": "1", "b": "nan"}  # none marked: all


def test_callbacks_argument_and_configure_callbacks(make_trainer: Any) -> None:
    from_trainer = EarlyStopping(monitor="val_loss", patience=100)
    from_module = EarlyStopping(monitor="val_loss", stopping_threshold=100.0)

    class WithCallbacks(TinyMLP):
        def configure_callbacks(self) -> Any:
            return [from_module]

    trainer = make_trainer(max_epochs=4, callbacks=[from_trainer], plugins=[Watcher()])
    assert [rec.name for rec in trainer.pm.records][-2:] == ["Watcher", "early_stopping"]  # after plugins=
    trainer.fit(WithCallbacks(), tiny_loader(n=16), tiny_loader(n=8))
    # the module's EarlyStopping replaced the Trainer's (same class), and stopped after the first check
    assert trainer.current_epoch == 1
    assert not trainer.pm.is_registered(from_trainer)
    assert trainer.pm.is_registered(from_module)


def test_a_callback_named_like_an_entry_point_is_not_taken_for_it(make_trainer: Any) -> None:
    class Named(torchplug.Plugin):
        plugin_name = "ddp"

        def on_fit_start(self) -> None:
            pass

    trainer = make_trainer(callbacks=[Named()], blocked_plugins=["ddp"])
    assert trainer.plugin_for("strategy") is None
    assert [rec.source for rec in trainer.pm.records if rec.name == "ddp"] == ["object"]


# -- no private attribute of the Trainer, the run or the loop in any plugin of this repository -----
SCANNED = [
    *sorted(ROOT.glob("plugins/*/src")),
    ROOT / "core/src/torchplug/callbacks",
    ROOT / "examples/plugin-template",
    ROOT / "core/src/torchplug/templates",
]
#: names that hold the Trainer (or its run and loop) in plugin code
HOLDERS = {"trainer", "_trainer", "run", "_run", "loop", "fit_loop"}


def private_uses(source: str, filename: str) -> list[str]:
    """``trainer._x``, ``self.trainer._x``, ``self._trainer._x``, ``trainer.fit_loop._x`` …"""
    found: list[tuple[int, int, str]] = []
    source = re.sub(r"\{\{(\w+)\}\}", r"\1_placeholder", source)  # the packaged template's fields
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        holder = node.value
        name = holder.id if isinstance(holder, ast.Name) else holder.attr if isinstance(holder, ast.Attribute) else None
        if name in HOLDERS:
            found.append((node.lineno, node.col_offset, f"{filename}:{node.lineno}: {ast.unparse(node)}"))
    return [text for *_, text in sorted(found)]


def test_the_scan_catches_private_access() -> None:
    code = ("def f(trainer, self):\n    trainer._run.x\n    self.trainer._outcome\n    self._trainer._pm\n"
            "    trainer.log\n")
    assert [line.split(": ")[1] for line in private_uses(code, "x.py")] == [
        "trainer._run", "self.trainer._outcome", "self._trainer._pm"]


def test_no_plugin_or_callback_touches_a_private_trainer_attribute() -> None:
    files = [p for folder in SCANNED for p in sorted(folder.rglob("*")) if p.suffix in (".py", ".tmpl")
             and (p.suffix == ".py" or p.name.endswith(".py.tmpl"))]
    assert len(files) > 10  # the scan sees the plugins
    found = [use for path in files for use in private_uses(path.read_text(encoding="utf-8"), str(path))]
    assert found == [], "plugins must use the public Trainer API (torchplug.trainer_api):\n" + "\n".join(found)
