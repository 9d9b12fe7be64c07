"""pytest fixtures for plugin authors, registered through the ``pytest11`` entry point.

Kept free of heavy imports at module level: pytest loads this plugin in every run of an
environment where torchplug is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def torchplug_pm(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh plugin manager with only the built-in defaults: autoload and
    ``TORCHPLUG_PLUGINS`` are ignored, so installed plugins do not leak into the test."""
    from torchplug.manager import get_plugin_manager

    monkeypatch.delenv("TORCHPLUG_PLUGINS", raising=False)
    return get_plugin_manager(autoload=False)


@pytest.fixture
def register_plugin(torchplug_pm: Any) -> Iterator[Any]:
    """``register_plugin(obj)`` registers a plugin on ``torchplug_pm`` for one test."""
    added: list[object] = []

    def register(plugin: object, name: str | None = None) -> object:
        torchplug_pm.register_plugin(plugin, name or type(plugin).__name__, "object")
        added.append(plugin)
        return plugin

    yield register
    for plugin in added:
        if torchplug_pm.is_registered(plugin):
            torchplug_pm.unregister(plugin)
