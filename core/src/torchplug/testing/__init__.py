"""Testing kit for plugin authors.

* :mod:`torchplug.testing.fixtures`: pytest fixtures, loaded automatically as the ``torchplug``
  pytest plugin (``torchplug_pm``, ``register_plugin``, ``hook_recorder``, ``tiny_module``,
  ``tiny_loader``);
* :mod:`torchplug.testing.conformance`: the contracts a plugin keeps, as test classes to subclass
  (``PluginContract``, ``PrecisionPluginContract``, ``StrategyPluginContract``);
* :mod:`torchplug.testing.recorder`: ``HookRecorder``, a plugin recording every hook call;
* :mod:`torchplug.testing.syncs`: ``HostReads``, counting the host reads (``.item()``, ``float(t)``,
  ``.cpu()``, ...) a run makes, each of which stalls a GPU;
* :mod:`torchplug.testing.models`: ``TinyMLP`` and ``tiny_loader``, small, seeded and picklable;
* :mod:`torchplug.testing.venv`: fresh virtual environments that share this interpreter's torch.

Nothing is imported here: pytest loads the fixtures module in every run of an environment that
has torchplug, so each module imports what it needs itself.
"""
