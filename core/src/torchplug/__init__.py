"""torchplug: a small PyTorch training core whose GPU behaviour comes from plugins.

Public API::

    from torchplug import Trainer, TrainingModule, Plugin, hookimpl

Plugin authors: the hooks and their calling conventions are documented in
:mod:`torchplug.hookspecs`; a plugin is any object or module with hook implementations, found
by name through the ``torchplug.plugins`` entry-point group or loaded for every Trainer through
``torchplug.autoload``::

    [project.entry-points."torchplug.plugins"]
    my_plugin = "my_package.plugin:MyPlugin"
"""

from __future__ import annotations

__version__ = "0.1.0"

from torchplug.errors import (
    CheckpointError,
    MisconfigurationError,
    NonFiniteLossError,
    PluginConflictError,
    PluginError,
    PluginHookError,
    PluginLoadError,
    PluginNotFoundError,
    PluginValidationError,
    TorchplugError,
)
from torchplug.hookspecs import hookimpl, hookspec
from torchplug.manager import PluginManager, get_plugin_manager
from torchplug.module import TrainingModule
from torchplug.plugin import Plugin
from torchplug.seed import seed_everything
from torchplug.trainer import FitOutcome, Trainer
from torchplug.wrappers import TrainingStepModule

__all__ = [
    "CheckpointError",
    "FitOutcome",
    "MisconfigurationError",
    "NonFiniteLossError",
    "Plugin",
    "PluginConflictError",
    "PluginError",
    "PluginHookError",
    "PluginLoadError",
    "PluginManager",
    "PluginNotFoundError",
    "PluginValidationError",
    "TorchplugError",
    "Trainer",
    "TrainingModule",
    "TrainingStepModule",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "seed_everything",
]
