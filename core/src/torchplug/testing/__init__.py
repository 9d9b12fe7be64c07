"""Testing kit for plugin authors: pytest fixtures (loaded automatically as the ``torchplug``
pytest plugin) and a conformance suite (:mod:`torchplug.testing.conformance`)."""
