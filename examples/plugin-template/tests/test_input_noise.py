"""Tests of the input_noise plugin, using torchplug's testing kit.

The fixtures ``register_plugin``, ``hook_recorder``, ``tiny_module`` and ``tiny_loader`` come
from torchplug's pytest plugin (installed with torchplug); ``PluginContract`` is the
conformance suite every plugin passes. Run them after installing this project with its test
extra (README.md, "Set up, test, build"): the entry-point tests need its metadata.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchplug_input_noise import STD_ENV, InputNoisePlugin

from torchplug import MisconfigurationError, Trainer
from torchplug.discovery import find, installed_plugins
from torchplug.testing.conformance import PluginContract
from torchplug.testing.models import TinyMLP, parameters_vector

QUIET: dict[str, Any] = {"max_epochs": 2, "enable_progress_bar": False, "logger": False,
                         "enable_checkpointing": False, "autoload_plugins": False}


class TestConformance(PluginContract):
    """torchplug's contracts for every plugin: registration, pickling, every hook still fires."""

    @pytest.fixture
    def plugin_factory(self) -> type[InputNoisePlugin]:
        return InputNoisePlugin


def test_registers(register_plugin: Any) -> None:
    plugin = register_plugin(InputNoisePlugin(std=0.2))
    assert plugin.std == 0.2


def test_noise_on_float_inputs_in_training_only(tiny_module: TinyMLP) -> None:
    plugin = InputNoisePlugin(std=0.5)
    x, y = torch.zeros(4, 8), torch.arange(4)
    batch, idx = plugin.on_before_forward(tiny_module.train(), ((x, y), 3))  # type: ignore[misc]
    assert idx == 3
    assert torch.equal(batch[1], y)  # labels untouched
    assert 0.2 < float(batch[0].std()) < 0.8
    assert plugin.on_before_forward(tiny_module.eval(), ((x, y), 0)) is None  # validation: unchanged


def test_changes_training_and_is_reproducible(tiny_loader: Any) -> None:
    def train(*plugins: object) -> torch.Tensor:
        module = TinyMLP()
        Trainer(plugins=list(plugins), **QUIET).fit(module, tiny_loader)
        return parameters_vector(module)

    plain, noisy, again = train(), train(InputNoisePlugin(std=0.3)), train(InputNoisePlugin(std=0.3))
    assert torch.isfinite(noisy).all()
    assert not torch.allclose(plain, noisy), "the plugin did not change training"
    assert torch.equal(noisy, again), "same seed, different weights"


def test_hooks_fire_once_per_batch(hook_recorder: Any, tiny_module: TinyMLP, tiny_loader: Any) -> None:
    Trainer(plugins=[InputNoisePlugin(), hook_recorder], **QUIET).fit(tiny_module, tiny_loader)
    assert hook_recorder.counts()["on_before_forward"] == 2 * len(tiny_loader)
    hook_recorder.assert_fired("on_fit_start", "on_before_forward", "optimizer_step")


def test_bad_std_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STD_ENV, "loud")
    with pytest.raises(MisconfigurationError, match=STD_ENV):
        InputNoisePlugin()


def test_installed_entry_point_selects_it_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    info = find("input_noise")
    assert info is not None, f"entry point input_noise not installed; found: {[p.name for p in installed_plugins()]}"
    assert info.dist_name == "torchplug-input-noise"
    monkeypatch.setenv(STD_ENV, "0.05")
    trainer = Trainer(plugins=["input_noise"], **QUIET)
    plugin = trainer.pm.record("input_noise").plugin
    assert isinstance(plugin, InputNoisePlugin)
    assert plugin.std == 0.05
