"""The conformance suite must fail broken plugins, naming the broken contract.

Each case runs the suite with pytester on a plugin with one known bug (several are bugs real
plugins shipped: Lightning 1.1's un-entered ``no_sync``, a second ``GradScaler.unscale_``, a
host read of the loss scale every step) and checks the outcome and the message. A correct
minimal precision plugin passes, as a control.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

PRECISION_PLUGINS = '''
import contextlib
import torch
from torchplug import Plugin
from torchplug.utils import optimizer_params
from torchplug.testing.conformance import PrecisionPluginContract


class GoodAMP(Plugin):
    """A minimal correct fp16 precision plugin (CPU autocast + GradScaler)."""

    role = "precision"

    def connect_precision(self, model, optimizers):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.unscaled = set()
        return model, optimizers

    def forward_context(self):
        return torch.autocast("cpu", dtype=torch.float16)

    def backward(self, loss):
        self.scaler.scale(loss).backward()
        return True

    def unscale_gradients(self, optimizer):
        if id(optimizer) not in self.unscaled:
            self.scaler.unscale_(optimizer)
            self.unscaled.add(id(optimizer))

    def clip_gradients(self, grad_clip_val, optimizer, norm_type):
        self.unscale_gradients(optimizer)
        return torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), grad_clip_val, norm_type)

    def optimizer_step(self, optimizers):
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.unscaled.clear()
        return True


class NoAutocast(GoodAMP):
    def forward_context(self):
        return contextlib.nullcontext()


class UnscalesTwice(GoodAMP):
    def unscale_gradients(self, optimizer):
        self.scaler.unscale_(optimizer)  # GradScaler raises on the second call in a step

    def optimizer_step(self, optimizers):
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        return True


class NeverUnscales(GoodAMP):
    def unscale_gradients(self, optimizer):
        pass

    def clip_gradients(self, grad_clip_val, optimizer, norm_type):
        return torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), grad_clip_val, norm_type)


class IgnoresNormType(GoodAMP):
    def clip_gradients(self, grad_clip_val, optimizer, norm_type):
        self.unscale_gradients(optimizer)
        return torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), grad_clip_val, 2.0)


class SkipsTheFit(GoodAMP):
    def launch(self, trainer, function):
        from torchplug import FitOutcome
        return FitOutcome(0, 0, {}, None, None)


class ReadsTheScale(GoodAMP):
    """Tells a skipped step by comparing the loss scale before and after it (a common pattern):
    two more host reads per step, each a full device sync on a GPU."""

    def optimizer_step(self, optimizers):
        before = self.scaler.get_scale()
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.unscaled.clear()
        return self.scaler.get_scale() >= before


def make(cls):
    class Contract(PrecisionPluginContract):
        @pytest.fixture
        def plugin_factory(self):
            return cls

        @pytest.fixture
        def trainer_kwargs(self):
            return {"precision": 16}
    Contract.__name__ = f"Test{cls.__name__}"
    return Contract


import pytest
TestGoodAMP = make(GoodAMP)
TestNoAutocast = make(NoAutocast)
TestUnscalesTwice = make(UnscalesTwice)
TestNeverUnscales = make(NeverUnscales)
TestIgnoresNormType = make(IgnoresNormType)
TestSkipsTheFit = make(SkipsTheFit)
TestReadsTheScale = make(ReadsTheScale)
'''


MUTANTS = [
    ("TestNoAutocast", "test_autocast_active_in_forward", "autocast is active inside the forward"),
    ("TestUnscalesTwice", "test_unscale_exactly_once_before_clipping", "second unscale_gradients"),
    ("TestNeverUnscales", "test_unscale_exactly_once_before_clipping", "not brought to their true scale"),
    ("TestIgnoresNormType", "test_clip_gradients_returns_total_norm[inf]", "honours norm_type=inf"),
    ("TestSkipsTheFit", "test_every_hook_fires_in_process", "every hook fires (in-process)"),
    ("TestReadsTheScale", "test_no_host_read_per_step", "3 host reads per optimizer step"),
]


def _run_suite(directory: Path, name: str, source: str, *args: str) -> dict[str, tuple[str, str]]:
    """Run a test module in a fresh interpreter; ``Class::test`` -> (outcome, failure text)."""
    (directory / f"{name}.py").write_text(source, encoding="utf-8")
    report = directory / f"{name}.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", f"{name}.py", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", *args],
        cwd=directory, capture_output=True, text=True, timeout=600,
    )
    if not report.exists():
        raise AssertionError(f"the suite did not run:\n{proc.stdout}\n{proc.stderr}")
    results = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                text = f"{child.get('message', '')}\n{child.text or ''}"
        results[test_id] = (outcome, text)
    return results


@pytest.fixture(scope="module")
def precision_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    # The control runs every contract; each mutant its own contract and one unrelated to it.
    selected = " or ".join(["TestGoodAMP", "registers_cleanly"] + [
        f"({mutant} and {test.split('[')[0]})" for mutant, test, _ in MUTANTS])
    return _run_suite(tmp_path_factory.mktemp("mutants"), "test_mutants", PRECISION_PLUGINS, "-k", selected)


def test_a_correct_plugin_passes(precision_results: dict[str, tuple[str, str]]) -> None:
    good = {k: v for k, v in precision_results.items() if k.startswith("TestGoodAMP::")}
    assert len(good) >= 8
    assert {outcome for outcome, _ in good.values()} == {"passed"}, good


@pytest.mark.parametrize(("mutant", "failing_test", "message"), MUTANTS)
def test_a_broken_plugin_fails_its_contract(precision_results: dict[str, tuple[str, str]], mutant: str,
                                            failing_test: str, message: str) -> None:
    outcome, text = precision_results[f"{mutant}::{failing_test}"]
    assert outcome == "failed", precision_results
    assert message in text, text
    assert f"plugin: {mutant.removeprefix('Test')}()" in text, text
    assert precision_results[f"{mutant}::test_registers_cleanly"][0] == "passed"


STRATEGY_PLUGINS = '''
import contextlib
import pytest
from torchplug_ddp import DDPPlugin
from torchplug.testing.conformance import StrategyPluginContract


class ForgetsNoSync(DDPPlugin):
    """A block_backward_sync that blocks nothing (Lightning 1.1's DDPPlugin had that effect by
    yielding no_sync() unentered, which the core now enters); and the wrapper is handed back as
    "the user's module"."""

    @contextlib.contextmanager
    def _blocker(self, model):
        yield  # no model.no_sync(): every micro-batch all-reduces

    def block_backward_sync(self, model):
        return self._blocker(model)

    def get_model_from_plugin(self, model):
        return model


class TestForgetsNoSync(StrategyPluginContract):
    @pytest.fixture
    def plugin_factory(self):
        return lambda: ForgetsNoSync(timeout=60)


class NoGather(DDPPlugin):
    """A strategy that leaves all_gather_object to the one-process default: the plan handshake
    would compare nothing."""

    def all_gather_object(self, obj):
        return None


class TestNoGather(StrategyPluginContract):
    @pytest.fixture
    def plugin_factory(self):
        return lambda: NoGather(timeout=60)
'''


@pytest.mark.skipif(importlib.util.find_spec("torchplug_ddp") is None, reason="torchplug-ddp is not installed")
@pytest.mark.timeout(300)
def test_a_strategy_that_syncs_inside_block_backward_sync_fails(tmp_path: Path) -> None:
    results = _run_suite(tmp_path, "test_ddp_mutant", STRATEGY_PLUGINS,
                         "-k", "(TestForgetsNoSync and (no_gradient_sync or round_trips or exactly_one)) "
                               "or (TestNoGather and all_gather)")
    outcome, text = results["TestForgetsNoSync::test_no_gradient_sync_inside_block_backward_sync"]
    assert outcome == "failed", results
    assert "Contract broken: no gradient all-reduce inside block_backward_sync" in text, text
    assert "all-reduced the gradients of 4 parameters through DDP" in text, text
    outcome, text = results["TestForgetsNoSync::test_get_model_from_plugin_round_trips"]
    assert outcome == "failed", results
    assert "get_model_from_plugin(configure_ddp(model)) is the user's module" in text, text
    # Syncing every micro-batch still all-reduces each gradient once in the window's last one.
    assert results["TestForgetsNoSync::test_exactly_one_gradient_sync_after_block_backward_sync"][0] == "passed"
    outcome, text = results["TestNoGather::test_all_gather_object_returns_every_rank_in_rank_order"]
    assert outcome == "failed", results
    assert "all_gather_object returns every rank's object, in rank order" in text, text
    assert "rank 0 got [{'rank': 0}], expected [{'rank': 0}, {'rank': 1}]" in text, text


FSDP_MUTANT = '''
import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchplug import TrainingStepModule
from torchplug_fsdp import FSDPPlugin
from torchplug.testing.conformance import StrategyPluginContract


class ShardsAfterTheOptimizers(FSDPPlugin):
    """The Lightning 1.1 setup order: the optimizers exist before fully_shard replaces the
    parameters with DTensors, so they step stale tensors and the model never trains."""

    def model_transforms(self):
        return None

    def configure_ddp(self, model, device_ids):
        mesh = init_device_mesh("cpu", (2,))
        for layer in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
            fully_shard(layer, mesh=mesh)
        root = TrainingStepModule(model)
        fully_shard(root, mesh=mesh)
        self._root = root
        return root


class TestShardsAfterTheOptimizers(StrategyPluginContract):
    @pytest.fixture
    def plugin_factory(self):
        return lambda: ShardsAfterTheOptimizers(timeout=60)
'''


@pytest.mark.skipif(importlib.util.find_spec("torchplug_fsdp") is None, reason="torchplug-fsdp is not installed")
@pytest.mark.timeout(300)
def test_a_strategy_that_builds_the_optimizer_before_sharding_fails(tmp_path: Path) -> None:
    results = _run_suite(tmp_path, "test_fsdp_mutant", FSDP_MUTANT, "-k", "optimizers_hold")
    outcome, text = results["TestShardsAfterTheOptimizers::test_optimizers_hold_the_parameters_that_train"]
    assert outcome == "failed", results
    assert "Contract broken: the optimizers update the parameters the model trains with" in text, text
    assert "no optimizer holds module.net.0.weight" in text or "no optimizer holds net.0.weight" in text, text
