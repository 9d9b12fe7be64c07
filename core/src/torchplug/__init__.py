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

from typing import TYPE_CHECKING, Any

from torchplug.errors import (
    CheckpointError,
    LightningSpellingWarning,
    MisconfigurationError,
    NonFiniteLossError,
    PlanChangedError,
    PlanChangedWarning,
    PlanMismatchError,
    PluginBlockedError,
    PluginConflictError,
    PluginError,
    PluginHookError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginNotFoundError,
    PluginValidationError,
    TorchplugError,
)
from torchplug.hookspecs import hookimpl, hookspec
from torchplug.plugin import Plugin

if TYPE_CHECKING:
    from torchplug.datamodule import DataModule
    from torchplug.manager import PluginManager, get_plugin_manager
    from torchplug.module import TrainingModule
    from torchplug.run import FitOutcome
    from torchplug.seed import seed_everything
    from torchplug.trainer import Trainer
    from torchplug.transforms import ModelTransform
    from torchplug.wrappers import TrainingStepModule

# Names that need torch load on first use, so `import torchplug` (and `torchplug plugins`, which
# only reads metadata) does not pay for importing torch.
_LAZY = {
    "DataModule": "torchplug.datamodule",
    "PluginManager": "torchplug.manager",
    "get_plugin_manager": "torchplug.manager",
    "TrainingModule": "torchplug.module",
    "seed_everything": "torchplug.seed",
    "FitOutcome": "torchplug.run",
    "Trainer": "torchplug.trainer",
    "TrainingStepModule": "torchplug.wrappers",
    "ModelTransform": "torchplug.transforms",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchplug' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CheckpointError",
    "DataModule",
    "FitOutcome",
    "LightningSpellingWarning",
    "MisconfigurationError",
    "ModelTransform",
    "NonFiniteLossError",
    "PlanChangedError",
    "PlanChangedWarning",
    "PlanMismatchError",
    "Plugin",
    "PluginBlockedError",
    "PluginConflictError",
    "PluginError",
    "PluginHookError",
    "PluginIncompatibleError",
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
