"""The conformance suite, one module per plugin kind. Plugin projects import it from
:mod:`torchplug.testing.conformance`, whose docstring documents the contracts.

* :mod:`~torchplug.testing.contracts.plugin`: :class:`PluginContract`, every plugin;
* :mod:`~torchplug.testing.contracts.precision`: :class:`PrecisionPluginContract`;
* :mod:`~torchplug.testing.contracts.strategy`: :class:`StrategyPluginContract`;
* :mod:`~torchplug.testing.contracts.callback`: :class:`CallbackPluginContract`;
* :mod:`~torchplug.testing.contracts._runs`: what they share (the contract runs, caching, failure
  messages, the multi-process runner and its probe).
"""

from __future__ import annotations

from torchplug.testing.contracts.callback import CallbackPluginContract
from torchplug.testing.contracts.plugin import PluginContract
from torchplug.testing.contracts.precision import PrecisionPluginContract
from torchplug.testing.contracts.strategy import StrategyPluginContract

__all__ = ["CallbackPluginContract", "PluginContract", "PrecisionPluginContract", "StrategyPluginContract"]
