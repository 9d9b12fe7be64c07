"""pytest fixtures for plugin authors, registered through the ``pytest11`` entry point.

Available in every test of an environment where torchplug is installed (no conftest needed):

* ``torchplug_pm``: a fresh plugin manager with only the core's built-in defaults (no autoload,
  ``TORCHPLUG_PLUGINS``/``TORCHPLUG_BLOCK_PLUGINS`` ignored);
* ``register_plugin``: ``register_plugin(obj)`` registers a plugin on ``torchplug_pm`` for one
  test, with the same validation and role checks as a Trainer;
* ``hook_recorder``: a :class:`~torchplug.testing.recorder.HookRecorder` to pass in
  ``Trainer(plugins=[..., hook_recorder])`` (or ``hook_recorder.register(pm)``); it also records
  in worker processes;
* ``tiny_module``, ``tiny_loader``: :class:`~torchplug.testing.models.TinyMLP` and a DataLoader of
  64 seeded random samples (batches of 8), both picklable for spawned workers.

Kept free of heavy imports at module level: everything is imported inside the fixtures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # The conformance suite marks its multi-process tests; keep --strict-markers happy when
    # pytest-timeout is not installed (it registers the same marker when it is).
    config.addinivalue_line("markers", "timeout(seconds): fail a test that runs longer (pytest-timeout)")


@pytest.fixture
def torchplug_pm(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh plugin manager with only the built-in defaults: autoload, ``TORCHPLUG_PLUGINS``
    and ``TORCHPLUG_BLOCK_PLUGINS`` are ignored, so installed plugins do not leak into the test."""
    from torchplug.manager import get_plugin_manager

    for name in ("TORCHPLUG_PLUGINS", "TORCHPLUG_BLOCK_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    return get_plugin_manager(autoload=False, env={})


@pytest.fixture
def register_plugin(torchplug_pm: Any) -> Iterator[Callable[..., object]]:
    """``register_plugin(obj, name=None)`` registers ``obj`` on ``torchplug_pm`` and returns it.

    Validation is the Trainer's: an unknown hook or argument raises
    :class:`torchplug.PluginValidationError`, a second plugin of one role
    :class:`torchplug.PluginConflictError`. Unregistered at the end of the test.
    """
    added: list[object] = []

    def register(plugin: object, name: str | None = None) -> object:
        label = name or getattr(plugin, "plugin_name", None) or getattr(plugin, "__name__", None)
        label = label or type(plugin).__name__
        torchplug_pm.register_plugin(plugin, label, "object")
        added.append(plugin)
        try:
            torchplug_pm.check_roles()
        except Exception:
            torchplug_pm.unregister(plugin)  # also drops its record
            added.remove(plugin)
            raise
        return plugin

    yield register
    for plugin in added:
        if torchplug_pm.is_registered(plugin):
            torchplug_pm.unregister(plugin)
    torchplug_pm.records[:] = [rec for rec in torchplug_pm.records if rec.plugin not in added]


@pytest.fixture
def hook_recorder(tmp_path: Path) -> Any:
    """A :class:`~torchplug.testing.recorder.HookRecorder` that also records in worker
    processes (into ``tmp_path / "hookcalls"``)."""
    from torchplug.testing.recorder import HookRecorder

    return HookRecorder(tmp_path / "hookcalls")


@pytest.fixture
def tiny_module() -> Any:
    """A new :class:`~torchplug.testing.models.TinyMLP` with seeded weights (8 → 16 → 3)."""
    from torchplug.testing.models import TinyMLP

    return TinyMLP()


@pytest.fixture
def tiny_loader() -> Any:
    """A DataLoader of 64 seeded random samples in batches of 8 (8 batches), not shuffled."""
    from torchplug.testing.models import tiny_loader

    return tiny_loader()
