"""The first-party plugins and callbacks against torchplug's conformance suite.

Each class is skipped, saying why, when its distribution is not installed in the environment
under test (``pip install -e plugins/<name>``, or the wheels of ``nox -s wheels``). The apex
plugin runs against the fake NVIDIA apex 25.05 in ``plugins/apex_plugin/tests/fake_apex/``
(real apex needs CUDA) through ``CPUApexPlugin``, defined here: ApexPlugin without its CUDA
requirement (``plugins/apex_plugin/tests`` is not importable from the installed wheels). Its
autocast contract is skipped, because the fake does not cast.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torchplug.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from torchplug.testing.conformance import CallbackPluginContract, PrecisionPluginContract, StrategyPluginContract
from torchplug.testing.models import TinyMLP

REPO = Path(__file__).resolve().parents[2]
FAKE_APEX = REPO / "plugins" / "apex_plugin" / "tests" / "fake_apex"


def _plugin_class(module: str, name: str, distribution: str, folder: str) -> tuple[Any, str]:
    try:
        return getattr(importlib.import_module(module), name), ""
    except ImportError as exc:
        return None, (f"{distribution} is not installed ({exc}); install it: "
                      f"pip install -e {folder}, or run nox -s wheels")


DDPPlugin, _ddp_missing = _plugin_class("torchplug_ddp", "DDPPlugin", "torchplug-ddp", "plugins/ddp_plugin")
TensorBoardLogger, _tb_missing = _plugin_class("torchplug_tensorboard", "TensorBoardLogger", "torchplug-tensorboard",
                                               "plugins/tensorboard_plugin")
FSDPPlugin, _fsdp_missing = _plugin_class("torchplug_fsdp", "FSDPPlugin", "torchplug-fsdp", "plugins/fsdp_plugin")
DDPZeroPlugin, _zero_missing = _plugin_class("torchplug_ddp", "DDPZeroPlugin", "torchplug-ddp", "plugins/ddp_plugin")
NativeAMPPlugin, _amp_missing = _plugin_class("torchplug_native_amp", "NativeAMPPlugin", "torchplug-native-amp",
                                              "plugins/native_amp")


@pytest.mark.skipif(DDPPlugin is None, reason=_ddp_missing)
class TestDDPPlugin(StrategyPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return lambda: DDPPlugin(timeout=60)

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        return {"accelerator": "cpu"}


@pytest.mark.skipif(FSDPPlugin is None, reason=_fsdp_missing)
class TestFSDPPlugin(StrategyPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return lambda: FSDPPlugin(timeout=60)

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        return {"accelerator": "cpu"}


@pytest.mark.skipif(DDPZeroPlugin is None, reason=_zero_missing)
class TestDDPZeroPlugin(StrategyPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return lambda: DDPZeroPlugin(timeout=60)

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        return {"accelerator": "cpu"}


@pytest.mark.skipif(NativeAMPPlugin is None, reason=_amp_missing)
class TestNativeAMPBf16(PrecisionPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return NativeAMPPlugin

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        return {"precision": "bf16", "accelerator": "cpu"}


@pytest.mark.skipif(NativeAMPPlugin is None, reason=_amp_missing)
class TestNativeAMPFp16(PrecisionPluginContract):
    """fp16 autocast with a real ``torch.amp.GradScaler("cpu")``: the unscale contracts bite."""

    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return NativeAMPPlugin

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        return {"precision": 16, "accelerator": "cpu"}


@pytest.fixture
def fake_apex(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fake apex 25.05 on sys.path, with its global amp state reset around the test (real
    apex amp needs CUDA; the fake does not: the class below drives it with CPUApexPlugin)."""
    monkeypatch.syspath_prepend(str(FAKE_APEX))
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        monkeypatch.delitem(sys.modules, name)
    amp = importlib.import_module("apex.amp")
    assert Path(amp.__file__).is_relative_to(FAKE_APEX), f"apex.amp comes from {amp.__file__}, not the fake"
    amp._reset_fake_state()
    yield amp
    amp._reset_fake_state()


def _apex_plugin_class() -> tuple[Any, str]:
    if importlib.util.find_spec("torchplug_apex") is None:
        return None, ("torchplug-apex is not installed; install it: pip install -e plugins/apex_plugin, "
                      "or run nox -s wheels")
    return "torchplug_apex", ""


_apex_module, _apex_missing = _apex_plugin_class()

if _apex_module is not None:
    from torchplug_apex import ApexPlugin

    class CPUApexPlugin(ApexPlugin):
        """ApexPlugin without its CUDA requirement, for the CPU fake of apex.amp only (as
        plugins/apex_plugin/tests/apex_test_support.py defines it for the plugin's own tests)."""

        _needs_cuda = False


@pytest.mark.skipif(_apex_module is None, reason=_apex_missing)
@pytest.mark.filterwarnings("ignore:NVIDIA apex amp is deprecated:FutureWarning")
class TestApexPluginWithFakeApex(PrecisionPluginContract):
    @pytest.fixture
    def plugin_factory(self, fake_apex: Any) -> Callable[[], object]:
        return CPUApexPlugin

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        return {"precision": 16, "amp_backend": "apex", "amp_level": "O2"}

    @pytest.fixture
    def host_reads_per_step(self) -> float:
        # apex without its CUDA extension amp_C (which the fake mirrors) checks each gradient for
        # overflow with a host read (scale_check_overflow_python), once per parameter tensor of
        # TinyMLP. A hand-written apex loop reads the same; with amp_C it is one read per step.
        return float(len(list(TinyMLP().parameters())))

    @pytest.mark.skip(reason="the fake apex marks parameters half but computes in fp32 (fake_apex/apex/amp "
                      "docstring); real apex casts only on CUDA, where plugins/apex_plugin's GPU test checks it")
    def test_autocast_active_in_forward(self) -> None:
        raise AssertionError("skipped")


class TestEarlyStopping(CallbackPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return functools.partial(EarlyStopping, monitor="train_loss", patience=1)


class TestModelCheckpoint(CallbackPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return functools.partial(ModelCheckpoint, monitor="train_loss", save_top_k=2, save_last=True)


class TestLearningRateMonitor(CallbackPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return functools.partial(LearningRateMonitor, logging_interval="step")


@pytest.mark.skipif(TensorBoardLogger is None, reason=_tb_missing)
class TestTensorBoardLogger(CallbackPluginContract):
    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        return TensorBoardLogger
