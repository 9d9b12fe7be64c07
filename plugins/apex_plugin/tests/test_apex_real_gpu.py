"""REAL NVIDIA apex (<= 25.05) on CUDA: skipped unless both are here.

Run them on a GPU machine with apex 25.05's python package on ``PYTHONPATH`` (no build needed)::

    PYTHONPATH=third_party/apex-25.05 python -m pytest plugins/apex_plugin/tests -m gpu

``scripts/gpu_check.py`` runs them too. They train a model shaped like ``torchplug demo``'s
(MLP 64-128-64-10, Adam) on synthetic data, at O1 and O2, and check what the fake cannot show:
real fp16 parameters and fp32 master weights, real overflow skipping, clipping and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from apex_test_support import grad, weight0
from torch import nn

import torchplug
from torchplug_apex import CHECKPOINT_KEY, ApexPlugin, ApexUnavailableError, load_amp

HERE = Path(__file__).resolve().parent


def _real_apex() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA"
    try:
        amp = load_amp()
    except ApexUnavailableError as exc:
        return False, f"no usable NVIDIA apex amp ({exc.reason})"
    if Path(str(amp.__file__)).resolve().is_relative_to(HERE):
        return False, "only the test fake of apex is importable"
    return True, ""


AVAILABLE, WHY = _real_apex()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not AVAILABLE, reason=f"needs CUDA and real NVIDIA apex <= 25.05: {WHY}"),
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore::torchplug_apex.ApexAmpDeprecationWarning"),
    # apex 25.05 itself uses APIs that torch warns about (e.g. torch.cuda.IntTensor): apex's noise
    pytest.mark.filterwarnings("ignore::UserWarning:apex"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:apex"),
    pytest.mark.filterwarnings("ignore::FutureWarning:apex"),
]

QUIET: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                         "autoload_plugins": False}


class DemoLike(torchplug.TrainingModule):
    """``torchplug demo``'s classifier shape (64-128-64-10 MLP, Adam), without dropout."""

    def __init__(self, inject_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        self.inject_at = inject_at
        self.seen: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if not self.seen:  # the dtype the first layer computes in (O1: patched F.linear; O2: fp16 weights)
            handle = self.net[0].register_forward_hook(
                lambda module, args, output: self.seen.update(first_layer_dtype=output.dtype))
        out = self(x)  # through forward: O2 casts the inputs to fp16 there
        if "output_dtype" not in self.seen:
            handle.remove()
            self.seen.update(param_dtype=self.net[0].weight.dtype, output_dtype=out.dtype)
        if batch_idx in self.inject_at:
            out.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return F.cross_entropy(out.float(), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def demo_batches(n: int = 8, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rule = torch.randn(64, 10, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 64, generator=g)
        out.append((x.cuda(), (x @ rule).argmax(1).cuda()))
    return out


def amp_of(trainer: torchplug.Trainer) -> Any:
    """The ``apex.amp`` module the trainer's apex plugin uses."""
    plugin = trainer.plugin_for("precision")
    assert isinstance(plugin, ApexPlugin)
    return plugin.amp


class Losses(torchplug.Plugin):
    plugin_name = "losses"

    def __init__(self) -> None:
        self.values: list[float] = []
        self.scale_at_start: float | None = None
        self.scales: list[float] = []
        self.params_after: list[list[torch.Tensor]] = []

    def on_fit_start(self, trainer: torchplug.Trainer) -> None:
        amp = amp_of(trainer)
        self.scale_at_start = float(amp._amp_state.loss_scalers[0].loss_scale())

    def on_train_batch_end(self, trainer: torchplug.Trainer, outputs: Any) -> None:
        self.values.append(float(outputs.detach()))
        amp = amp_of(trainer)
        self.scales.append(float(amp._amp_state.loss_scalers[0].loss_scale()))
        self.params_after.append([p.detach().clone() for p in trainer.optimizers[0].param_groups[0]["params"]])


@pytest.fixture
def undo_o1() -> Iterator[None]:
    """O1 patches torch functions for the rest of the process (apex never undoes it); undo it
    after the test so later tests run unpatched torch."""
    yield
    import apex.amp

    handle = getattr(apex.amp._amp_state, "handle", None)
    if handle is not None:
        handle._deactivate()


def fit(model: DemoLike, level: str, steps: int, ckpt_path: Any = None,
        **kwargs: Any) -> tuple[torchplug.Trainer, Losses]:
    losses = Losses()
    trainer = torchplug.Trainer(accelerator="cuda", precision=16, amp_backend="apex", amp_level=level,
                                max_steps=steps, plugins=[losses], **{**QUIET, **kwargs})
    trainer.fit(model, train_dataloaders=demo_batches(), ckpt_path=ckpt_path)
    return trainer, losses


def _decreased(values: list[float]) -> bool:
    return sum(values[-4:]) / 4 < 0.8 * sum(values[:4]) / 4


def test_real_apex_O2_trains_fp16_params_with_fp32_masters() -> None:
    model = DemoLike()
    trainer, losses = fit(model, "O2", 24)
    assert trainer.global_step == 24
    assert _decreased(losses.values), losses.values
    assert all(p.dtype == torch.float16 and p.is_cuda for p in model.parameters())
    amp = amp_of(trainer)
    masters = list(amp.master_params(trainer.optimizers[0]))
    assert len(masters) == 6
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(m is not p for m, p in zip(masters, model.parameters()))
    for m, p in zip(masters, model.parameters()):  # step copies masters into the fp16 model
        assert torch.equal(m.half(), p.detach())
    assert model.seen == {"first_layer_dtype": torch.float16, "param_dtype": torch.float16,
                          "output_dtype": torch.float32}


def test_real_apex_O1_trains_fp32_params_with_fp16_compute(undo_o1: None) -> None:
    model = DemoLike()
    trainer, losses = fit(model, "O1", 24)
    assert _decreased(losses.values), losses.values
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.seen["first_layer_dtype"] == torch.float16  # O1's patched F.linear
    amp = amp_of(trainer)
    assert [m is p for m, p in zip(amp.master_params(trainer.optimizers[0]), model.parameters())] == [True] * 6


@pytest.mark.parametrize("level", ["O2", "O1"])
def test_real_apex_overflow_skips_one_step(level: str, undo_o1: None) -> None:
    trainer, losses = fit(DemoLike(inject_at=(1,)), level, 4)
    assert losses.scales[1] == losses.scales[0] / 2  # (a natural fp16 overflow may come on top)
    assert all(torch.equal(a, b) for a, b in zip(losses.params_after[0], losses.params_after[1]))
    assert any(not torch.equal(a, b) for a, b in zip(losses.params_after[1], losses.params_after[2]))
    assert trainer.callback_metrics["skipped_steps"] >= 1.0


def test_real_apex_clipping_over_fp32_masters() -> None:
    trainer = torchplug.Trainer(accelerator="cuda", precision=16, amp_backend="apex", amp_level="O2", **QUIET)
    plugin = trainer.plugin_for("precision")
    assert isinstance(plugin, ApexPlugin)
    demo = DemoLike().cuda()
    model, [opt] = plugin.connect_precision(trainer, demo, [demo.configure_optimizers()])
    x, y = demo_batches(1)[0]
    plugin.backward(F.cross_entropy(model(x).float(), y), [opt], sync_gradients=True)
    masters = list(plugin.amp.master_params(opt))  # type: ignore[union-attr]
    before = [p.grad.double().clone() for p in masters]
    total = math.sqrt(sum(float((g**2).sum()) for g in before))
    scaled_model_grad = grad(weight0(model)).clone()
    assert float(scaled_model_grad.float().norm()) > 1000 * float(before[0].norm())  # model grads stay scaled
    norm = plugin.clip_gradients(total / 3, opt, 2.0)
    assert math.isclose(float(norm), total, rel_tol=1e-4)
    coef = (total / 3) / (total + 1e-5)
    for p, b in zip(masters, before):
        assert torch.allclose(p.grad.double(), b * coef, rtol=1e-5, atol=1e-10)
    assert torch.equal(grad(weight0(model)), scaled_model_grad)


@pytest.mark.parametrize("level", ["O2", "O1"])
def test_real_apex_checkpoint_round_trip(level: str, tmp_path: Path, undo_o1: None) -> None:
    """Two fits in one process: at O1 the second initialize must not stack apex's torch patches."""
    first, _ = fit(DemoLike(), level, 3, enable_checkpointing=True, default_root_dir=tmp_path)
    assert first.checkpoint_path is not None
    saved = torch.load(first.checkpoint_path, weights_only=True)
    state = saved[CHECKPOINT_KEY]["loss_scaler0"]
    assert list(saved[CHECKPOINT_KEY]) == ["loss_scaler0"]
    assert state["loss_scale"] <= 65536.0
    assert all(t.dtype == torch.float32 for t in saved["state_dict"].values())  # O2: apex's fp32 state_dict hook
    second, losses = fit(DemoLike(), level, 5, ckpt_path=first.checkpoint_path)
    assert second.global_step == 5
    assert len(losses.values) == 2
    assert losses.scale_at_start == state["loss_scale"]  # initialised, then loaded
    amp = amp_of(second)
    if "skipped_steps" not in second.callback_metrics:
        assert amp.state_dict()["loss_scaler0"]["unskipped"] == state["unskipped"] + 2
