"""``Plugin``: the base class of class-based plugins (Lightning 1.1 style)."""

from __future__ import annotations

from typing import ClassVar, Literal

Role = Literal["precision", "strategy"]


class Plugin:
    """Base class for class-based plugins.

    Any method of a subclass whose name is a hook name (see :mod:`torchplug.hookspecs`) is
    registered as an implementation of that hook, with or without ``@torchplug.hookimpl``
    (the decorator is only needed for options such as ``tryfirst`` or ``wrapper``)::

        class MyDDP(DDPPlugin):
            def configure_ddp(self, model, device_ids):
                return MyDDPWrapper(TrainingStepModule(model), device_ids)

        Trainer(accelerator="ddp", plugins=[MyDDP()])

    So that a typo never silently disables a hook, registration refuses a public method whose
    name is one edit away from a hook name (two for names longer than 8 letters), any public
    ``on_*`` method that is not a hook (Lightning habits such as ``on_train_batch_start``), an
    argument the hook does not pass, and a non-method attribute named like a hook. Prefix
    helpers with ``_``.
    """

    #: ``"precision"`` or ``"strategy"`` when the plugin decides the run's precision or its
    #: parallel strategy: at most one plugin of each role is active in a Trainer.
    role: ClassVar[Role | None] = None

    #: Name shown in listings and error messages; defaults to the class name.
    plugin_name: ClassVar[str | None] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
