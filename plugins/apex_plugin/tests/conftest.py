from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from apex_test_support import FAKE_APEX, drop_apex_modules

# One thread per process: small models on 2 cores (spawned gloo workers inherit it).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCHPLUG_PLUGINS", "TORCHPLUG_BLOCK_PLUGINS", "TORCHPLUG_TRACE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_amp(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The FAKE apex 25.05 ``apex.amp`` (tests/fake_apex), freshly imported with fresh global
    state. Real apex amp needs CUDA and the fake does not: drive it with ``CPUApexPlugin``
    (apex_test_support), e.g. through ``cpu_apex_trainer``."""
    monkeypatch.syspath_prepend(str(FAKE_APEX))
    drop_apex_modules()
    yield importlib.import_module("apex.amp")
    drop_apex_modules()
