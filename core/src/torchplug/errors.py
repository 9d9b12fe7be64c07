"""Exceptions torchplug raises; every message names the plugin, its distribution and the fix."""

from __future__ import annotations


class TorchplugError(Exception):
    """Base class of every error torchplug raises on purpose."""


class MisconfigurationError(TorchplugError, ValueError):
    """Trainer arguments, a module or a plugin set that cannot run; raised before any work."""


class PluginError(TorchplugError):
    """A plugin could not be found, loaded, validated or combined with the others."""


class PluginNotFoundError(PluginError, LookupError):
    """A plugin name that no installed distribution provides."""


class PluginLoadError(PluginError, ImportError):
    """Importing a plugin's entry point failed; ``__cause__`` keeps the original traceback."""


class PluginValidationError(PluginError, TypeError):
    """A hook implementation that does not match its hookspec (unknown hook, wrong argument)."""


class PluginConflictError(PluginError):
    """Two plugins claim the same role (precision or strategy), or two distributions provide
    the same plugin name."""


class PluginIncompatibleError(PluginError):
    """A plugin whose declared ``torchplug`` requirement excludes the installed core."""


class PluginBlockedError(PluginError):
    """A plugin selected by name that ``TORCHPLUG_BLOCK_PLUGINS`` or ``blocked_plugins=`` blocks."""


class PluginHookError(PluginError):
    """A plugin raised inside a hook; ``__cause__`` is the plugin's own exception."""


class CheckpointError(TorchplugError):
    """A checkpoint that cannot be read, or refers to state this run cannot restore."""


class NonFiniteLossError(TorchplugError, FloatingPointError):
    """``training_step`` returned a NaN or infinite loss."""


class PlanMismatchError(PluginConflictError):
    """The ranks of one run resolved different plans (another plugin version on one node, say):
    raised on every rank by the start-up handshake, naming the ranks and what differs."""


class PlanChangedError(CheckpointError):
    """``Trainer(resume_plan="strict")``: the checkpoint was written under a plan whose numerics
    (precision, strategy, their plugins or versions) differ from this run's."""


class PlanChangedWarning(UserWarning):
    """A run resumes from a checkpoint written under a different plan, or one without a plan."""


class LightningSpellingWarning(FutureWarning):
    """A Trainer argument written as Lightning 1.1 spelled it (``gpus=2``, ``num_processes=2``,
    ``resume_from_checkpoint=``): it runs as today's spelling, which the message names."""
