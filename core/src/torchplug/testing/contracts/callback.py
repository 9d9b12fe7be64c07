"""The contracts of callback-style plugins (callbacks, loggers): :class:`CallbackPluginContract`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from torchplug import checkpoint as ckpt
from torchplug.testing.contracts._runs import _broken, _fit_kwargs
from torchplug.testing.contracts.plugin import PluginContract
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader
from torchplug.trainer import Trainer

__all__ = ["CallbackPluginContract"]


class CallbackPluginContract(PluginContract):
    """What every callback keeps, beyond :class:`PluginContract`: a fit stopped and resumed from
    ``last.ckpt`` ends with the same weights as an uninterrupted one; the state it adds to a
    checkpoint comes back unchanged after a resume (``on_load_checkpoint`` restores what
    ``on_save_checkpoint`` wrote); no host read per step. Contract runs log ``train_loss`` and
    ``val_loss`` (:class:`~torchplug.testing.models.TinyMLP`): a callback that monitors a
    metric should monitor one of those."""

    @pytest.fixture
    def host_read_trainer_kwargs(self) -> dict[str, Any]:
        return {"enable_checkpointing": True}  # a checkpoint callback needs it; the last save cancels out

    def _fit(self, factory: Callable[[], object] | None, trainer_kwargs: dict[str, Any], root: Path,
             epochs: int, ckpt_path: str | None = None) -> tuple[Trainer, TinyMLP]:
        plugins = [factory()] if factory is not None else []
        kwargs = _fit_kwargs(root, trainer_kwargs, max_epochs=epochs, limit_train_batches=None)
        trainer, model = Trainer(plugins=plugins, **kwargs), TinyMLP()
        trainer.fit(model, tiny_loader(n=32, batch_size=4), tiny_loader(n=16), ckpt_path=ckpt_path)
        return trainer, model

    def test_resume_ends_with_the_same_weights(self, plugin_factory: Callable[[], object],
                                               trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
        plugin = plugin_factory()
        _, whole = self._fit(plugin_factory, trainer_kwargs, tmp_path / "whole", epochs=2)
        first, _ = self._fit(plugin_factory, trainer_kwargs, tmp_path / "first", epochs=1)
        if first.checkpoint_path is None:
            _broken("a fit with the callback writes last.ckpt", plugin, "no last.ckpt after one epoch")
        resumed, model = self._fit(plugin_factory, trainer_kwargs, tmp_path / "resumed", epochs=2,
                                   ckpt_path=first.checkpoint_path)
        if not torch.equal(parameters_vector(whole), parameters_vector(model)):
            diff = float((parameters_vector(whole) - parameters_vector(model)).abs().max())
            _broken("resume does not change the result", plugin,
                    f"2 epochs in one fit and 1 + 1 resumed from last.ckpt end with weights {diff:g} apart")
        if resumed.global_step != first.global_step * 2 or resumed.current_epoch != 2:
            _broken("resume does not change the result", plugin,
                    f"the resumed fit ended at step {resumed.global_step}, epoch {resumed.current_epoch}")

    def test_state_survives_the_checkpoint(self, plugin_factory: Callable[[], object],
                                           trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
        plugin = plugin_factory()
        plain, _ = self._fit(None, trainer_kwargs, tmp_path / "plain", epochs=1)
        first, _ = self._fit(plugin_factory, trainer_kwargs, tmp_path / "first", epochs=1)
        saved = ckpt.load(str(first.checkpoint_path))
        added = sorted(set(saved) - set(ckpt.load(str(plain.checkpoint_path))))
        # Resumed at the end of its last epoch: nothing trains, and last.ckpt is written again.
        again, _ = self._fit(plugin_factory, trainer_kwargs, tmp_path / "again", epochs=1,
                             ckpt_path=first.checkpoint_path)
        resaved = ckpt.load(str(again.checkpoint_path))
        for key in added:
            if not _same(saved[key], resaved.get(key)):
                _broken("the callback's checkpoint state survives a resume", plugin,
                        f"checkpoint[{key!r}] was {saved[key]!r}; after on_load_checkpoint and a new save it is "
                        f"{resaved.get(key)!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)
