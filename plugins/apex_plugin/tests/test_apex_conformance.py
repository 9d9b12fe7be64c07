"""torchplug's conformance suite for precision plugins (torchplug.testing.conformance), run on
ApexPlugin against the FAKE of apex 25.05's ``apex.amp`` (tests/fake_apex), on the CPU, through
``CPUApexPlugin`` (apex_test_support: ApexPlugin without its CUDA requirement).

The autocast contract is skipped: the CPU fake does not compute in fp16 (it only marks tensors
apex would cast, see REAL_APEX_NOTES.md); test_apex_real_gpu.py checks real fp16 on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from apex_test_support import CPUApexPlugin

from torchplug.testing.conformance import PrecisionPluginContract
from torchplug.testing.models import TinyMLP

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::torchplug_apex.ApexAmpDeprecationWarning"),
]


@pytest.mark.parametrize("amp_level", ["O1", "O2"], indirect=True)
class TestApexPluginConformance(PrecisionPluginContract):
    @pytest.fixture
    def amp_level(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture(autouse=True)
    def _fake_apex(self, fake_amp: ModuleType) -> ModuleType:
        return fake_amp  # the fake on sys.path

    @pytest.fixture
    def plugin_factory(self, amp_level: str) -> Callable[[], object]:
        return lambda: CPUApexPlugin(amp_level)

    @pytest.fixture
    def expected_dtype(self) -> torch.dtype | None:
        return None  # the CPU fake of apex does not cast to fp16

    @pytest.fixture
    def host_reads_per_step(self) -> float:
        # apex without amp_C (which the fake mirrors) reads each gradient for its overflow check
        # (scale_check_overflow_python), once per parameter tensor of TinyMLP: what a hand loop
        # reads too (test_apex_contract.py::test_contract_host_reads_match_a_hand_written_apex_loop).
        return float(len(list(TinyMLP().parameters())))
