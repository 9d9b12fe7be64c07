"""NativeAMPPlugin on the CPU, driven by the real Trainer: autocast, loss scaling, skipped
steps, clipping, checkpoints and plugin selection. torch 2.13's CPU autocast supports fp16 and
bf16, and ``torch.amp.GradScaler("cpu")`` is a real scaler, so nothing here is mocked."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from native_amp_helpers import MLP, QUIET, RecordingAMP, StepRecorder, flat_params, loader, regression_data
from torch import nn

import torchplug
from torchplug import CheckpointError, MisconfigurationError, PlanChangedWarning, Trainer
from torchplug_native_amp import NativeAMPPlugin
from torchplug_native_amp.plugin import _check_autocast, _found_inf

pytestmark = pytest.mark.timeout(120)

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


# --- construction and configuration ---------------------------------------------------------------
@pytest.mark.parametrize("bad", [32, "32", 8, "fp8", "float16", True, 16.5])
def test_bad_precision_is_refused_with_the_fix(bad: object) -> None:
    with pytest.raises(MisconfigurationError, match=r"precision must be 16 or 'bf16'.*torchplug-native-amp|"
                                                    r"torchplug-native-amp.*precision must be 16 or 'bf16'"):
        NativeAMPPlugin(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"init_scale": 0}, "init_scale"),
    ({"init_scale": -1.0}, "init_scale"),
    ({"growth_factor": 1.0}, "growth_factor must be > 1"),
    ({"backoff_factor": 1.0}, "backoff_factor must be < 1"),
    ({"backoff_factor": 0}, "backoff_factor"),
    ({"growth_interval": 0}, "growth_interval"),
    ({"growth_interval": 2.5}, "growth_interval"),
])
def test_bad_scaler_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationError, match=match):
        NativeAMPPlugin(16, **kwargs)


def test_check_configuration_rereads_a_changed_precision() -> None:
    plugin = NativeAMPPlugin()
    plugin.requested_precision = "fp8"  # set by hand, past the constructor's check
    with pytest.raises(MisconfigurationError, match="precision must be 16 or 'bf16', got 'fp8'"):
        plugin.check_configuration(SimpleNamespace(precision="32", accelerator=None))  # type: ignore[arg-type]


@pytest.mark.parametrize(("spelling", "expected"), [
    (16, "16"), ("16", "16"), ("16-mixed", "16"), ("bf16", "bf16"), ("bf16-mixed", "bf16"),
])
def test_precision_spellings(spelling: int | str, expected: str) -> None:
    assert NativeAMPPlugin(spelling).precision == expected


@pytest.mark.parametrize(("trainer_precision", "expected"), [(32, "16"), (16, "16"), ("bf16", "bf16")])
def test_precision_none_follows_the_trainer(trainer_precision: int | str, expected: str) -> None:
    plugin = NativeAMPPlugin()
    trainer = Trainer(precision=trainer_precision, plugins=[plugin], **QUIET)
    assert trainer.plugin_for("precision") is plugin
    assert plugin.precision == expected


@NO_CUDA
def test_cuda_requested_without_cuda_is_refused() -> None:
    plugin = NativeAMPPlugin(16)
    fake_trainer = SimpleNamespace(precision="16", accelerator="cuda")  # Trainer itself refuses earlier
    with pytest.raises(MisconfigurationError, match=r"accelerator='cuda'.*is_available\(\) is False"):
        plugin.check_configuration(fake_trainer)  # type: ignore[arg-type]


@NO_CUDA
def test_self_disabling_grad_scaler_is_an_error_not_a_silent_fp32_run() -> None:
    # torch.amp.GradScaler("cuda") without CUDA only warns and becomes a no-op.
    with pytest.raises(MisconfigurationError, match=r"GradScaler\('cuda'\) disabled itself \(.*CUDA is not available"):
        NativeAMPPlugin(16)._create_scaler("cuda")


@NO_CUDA
def test_autocast_on_a_missing_device_is_an_error() -> None:
    with pytest.raises(MisconfigurationError, match=r"torch.autocast\('cuda'.*is not active"):
        _check_autocast(torch.device("cuda"), torch.float16)


def test_autocast_that_disables_itself_on_cpu_is_an_error() -> None:
    # CPU autocast with an unsupported dtype warns "...Disabling autocast." and runs fp32.
    with pytest.raises(MisconfigurationError, match=r"not active on cpu \(.*Disabling autocast"):
        _check_autocast(torch.device("cpu"), torch.float64)


def test_model_on_a_device_where_autocast_is_off_fails_at_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchplug_native_amp.plugin as plugin_module

    # As if the model's parameters reported a device type torch cannot autocast on here.
    monkeypatch.setattr(plugin_module, "DTYPES", {"16": torch.float64, "bf16": torch.bfloat16})
    trainer = Trainer(plugins=[NativeAMPPlugin(16)], max_steps=1, **QUIET)
    with pytest.raises(torchplug.TorchplugError, match="is not active on cpu"):
        trainer.fit(MLP(), loader())


# --- selection through the entry point ---------------------------------------------------------
@pytest.mark.parametrize(("precision", "expected"), [(16, "16"), ("bf16", "bf16")])
def test_trainer_precision_selects_the_plugin_by_entry_point(precision: int | str, expected: str) -> None:
    from torchplug import discovery

    ep = discovery.find("native_amp")
    assert ep is not None, "pip install -e plugins/native_amp registers the entry point"
    assert ep.dist_name.replace("_", "-") == "torchplug-native-amp"
    assert ep.value == "torchplug_native_amp:NativeAMPPlugin"
    trainer = Trainer(precision=precision, **QUIET)
    plugin = trainer.plugin_for("precision")
    assert type(plugin) is NativeAMPPlugin
    assert plugin.precision == expected
    assert "native_amp" in trainer.plugin_names


def test_a_passed_plugin_object_wins_over_the_shorthand() -> None:
    plugin = NativeAMPPlugin("bf16")
    model = MLP()
    trainer = Trainer(precision=16, plugins=[plugin], max_steps=2, **QUIET)
    assert trainer.plugin_for("precision") is plugin
    assert trainer.plugin_names.count("native_amp") == 1
    trainer.fit(model, loader())
    assert {s["out_dtype"] for s in model.seen} == {torch.bfloat16}
    assert plugin.scaler is None


# --- autocast really active; backward outside it -------------------------------------------------
@pytest.mark.parametrize(("precision", "dtype"), [(16, torch.float16), ("bf16", torch.bfloat16)])
def test_autocast_is_active_in_training_step_and_off_in_backward(precision: int | str, dtype: torch.dtype) -> None:
    model = MLP()
    plugin = RecordingAMP(init_scale=2.0**8)
    trainer = Trainer(precision=precision, plugins=[plugin], max_steps=3, accumulate_grad_batches=2, **QUIET)
    trainer.fit(model, loader())
    assert len(model.seen) == 6
    for seen in model.seen:
        assert seen == {"hidden_dtype": dtype, "out_dtype": dtype, "matmul_dtype": dtype, "autocast": True}
    assert plugin.backward_in_autocast == [False] * 6
    assert not torch.is_autocast_enabled("cpu")  # the context was left
    # Parameters and their optimizer state stay fp32.
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_backward_itself_runs_without_autocast() -> None:
    """Not just the hook call: autograd's backward pass sees autocast off (a tensor hook runs inside it)."""
    seen_in_backward: list[bool] = []

    class Probe(MLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            loss.register_hook(  # type: ignore[no-untyped-call]
                lambda g: seen_in_backward.append(torch.is_autocast_enabled("cpu")))
            return loss

    Trainer(precision=16, plugins=[NativeAMPPlugin(init_scale=256.0)], max_steps=2, **QUIET).fit(Probe(), loader())
    assert seen_in_backward == [False, False]


def test_validate_runs_under_autocast_without_a_fit() -> None:
    model = MLP()
    metrics = Trainer(precision="bf16", **QUIET).validate(model, loader(n=16))
    assert {s["val_dtype"] for s in model.seen} == {torch.bfloat16}
    assert math.isfinite(metrics["val_loss"])


# --- fp16 loss scaling: skipped steps ---------------------------------------------------------------
@pytest.fixture(params=["step_hook", "found_inf", "scale_fallback"])
def skip_detection(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The plugin tells a skipped step by an optimizer step post-hook; for optimizers where that
    cannot tell (fused ones) it reads GradScaler's found_inf state; if torch's internals ever
    change it falls back to watching the scale back off. All three must decide the same."""
    import torchplug_native_amp.plugin as plugin_module

    if request.param != "step_hook":
        monkeypatch.setattr(plugin_module, "_step_observable", lambda optimizer: False)
    if request.param == "scale_fallback":
        monkeypatch.setattr(plugin_module, "_found_inf", lambda scaler, optimizers: None)
    return str(request.param)


@pytest.mark.parametrize("make_inf", [False, True])
def test_found_inf_is_read_from_this_torchs_grad_scaler(make_inf: bool) -> None:
    """Guards the fast path: on this torch the found_inf state is where the plugin looks."""
    layer = nn.Linear(3, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(layer(torch.ones(2, 3)).sum()).backward()
    if make_inf:
        layer.bias.grad.fill_(math.inf)  # type: ignore[union-attr]
    scaler.unscale_(opt)
    assert _found_inf(scaler, [opt]) is make_inf


@pytest.mark.parametrize("inf_step", [0, 2])
def test_inf_gradient_skips_the_step_halves_the_scale_and_training_goes_on(inf_step: int, skip_detection: str) -> None:
    model = MLP(scheduler=True)
    model.inf_at = {inf_step}
    plugin = RecordingAMP(16, init_scale=1024.0)
    rec = StepRecorder()
    trainer = Trainer(plugins=[plugin, rec], max_steps=5, log_every_n_steps=1, **QUIET)
    trainer.fit(model, loader())

    assert plugin.step_results == [i != inf_step for i in range(5)]
    for i in range(5):
        unchanged = torch.equal(rec.before[i], rec.after[i])
        assert unchanged == (i == inf_step), f"step {i}"
    # the scale halves once, at the skip, and stays (growth_interval is 2000)
    assert rec.scales == [1024.0 if i < inf_step else 512.0 for i in range(5)]
    assert trainer.global_step == 5
    assert trainer.callback_metrics["skipped_steps"] == 1.0
    # the LR scheduler was stepped 4 times, not after the skipped step
    scheduler = trainer.lr_schedulers[0]
    assert scheduler.last_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_is_counted_even_when_the_module_logs_nothing() -> None:
    class Silent(MLP):
        def log(self, name: str, value: Any) -> None:
            pass

    model = Silent()
    model.inf_at = {1}
    trainer = Trainer(plugins=[NativeAMPPlugin(16, init_scale=1024.0)], max_steps=3, log_every_n_steps=1, **QUIET)
    trainer.fit(model, loader())
    assert trainer.callback_metrics.get("skipped_steps") == 1.0


def test_accumulation_keeps_one_scale_per_window_and_skips_the_whole_window(skip_detection: str) -> None:
    scales_at_backward: list[float] = []

    class Recording(RecordingAMP):
        def backward(self, loss: torch.Tensor) -> bool:
            assert self.scaler is not None
            scales_at_backward.append(self.scaler.get_scale())
            return super().backward(loss)

    model = MLP()
    model.inf_at = {3}  # the first micro-batch of the second window of 3
    plugin = Recording(16, init_scale=1024.0)
    rec = StepRecorder()
    Trainer(plugins=[plugin, rec], max_steps=3, accumulate_grad_batches=3, **QUIET).fit(model, loader(n=72))
    assert scales_at_backward == [1024.0] * 3 + [1024.0] * 3 + [512.0] * 3
    assert plugin.step_results == [True, False, True]
    assert torch.equal(rec.before[1], rec.after[1])


def test_each_optimizer_decides_and_the_scale_backs_off_once(skip_detection: str) -> None:
    """Two optimizers, inf only in the second one's gradients: as in torch, the first one
    steps and the second skips; update() runs once (scale halves once, not twice) and the step
    counts as skipped (schedulers held)."""
    model = MLP(two_optimizers=True)

    def inf_in_out_weight(grad: torch.Tensor) -> torch.Tensor:
        # runs in the backward of micro-batch 1 (training_step already counted it)
        return grad * math.inf if model.micro_batches == 2 else grad

    model.out.weight.register_hook(inf_in_out_weight)  # type: ignore[no-untyped-call]
    plugin = RecordingAMP(16, init_scale=1024.0)
    rec = StepRecorder()
    hidden_before: list[torch.Tensor] = []
    out_before: list[torch.Tensor] = []

    class Snap(torchplug.Plugin):
        def on_before_optimizer_step(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
            if optimizer is trainer.optimizers[0]:
                hidden_before.append(model.hidden.weight.detach().clone())
                out_before.append(model.out.weight.detach().clone())

    trainer = Trainer(plugins=[plugin, rec, Snap()], max_steps=3, log_every_n_steps=1, **QUIET)
    trainer.fit(model, loader())
    assert plugin.step_results == [True, False, True]
    assert rec.scales == [1024.0, 512.0, 512.0]
    # at step 1 the hidden layer's optimizer stepped, the output layer's skipped
    assert not torch.equal(hidden_before[1], hidden_before[2])
    assert torch.equal(out_before[1], out_before[2])
    assert trainer.callback_metrics["skipped_steps"] == 1.0


def test_a_window_without_any_backward_is_a_skipped_step() -> None:
    """on_nonfinite_loss='skip' drops the backward of a NaN loss; a window left without any
    backward takes no optimizer step and counts as skipped."""

    class NanFirst(MLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * math.nan if batch_idx == 0 else loss

    plugin = RecordingAMP(16, init_scale=1024.0)
    trainer = Trainer(plugins=[plugin], max_steps=3, on_nonfinite_loss="skip", log_every_n_steps=1, **QUIET)
    trainer.fit(NanFirst(), loader())
    assert plugin.step_results == [True, True]  # the core did not ask for the empty window's step
    assert plugin.scaler is not None
    assert plugin.scaler.get_scale() == 1024.0
    assert trainer.global_step == 3
    assert trainer.callback_metrics["skipped_steps"] == 1.0


def test_an_optimizer_without_gradients_does_not_break_the_scaler() -> None:
    """GradScaler.step asserts 'No inf checks were recorded' for an optimizer whose parameters
    got no gradient (an unused or frozen part of the model): such an optimizer is left alone."""

    class WithUnused(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(2, 2)

        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(list(self.hidden.parameters()) + list(self.out.parameters()), lr=self.lr),
                    torch.optim.SGD(self.unused.parameters(), lr=self.lr)]

    model = WithUnused()
    model.inf_at = {2}
    unused_before = flat_params(model.unused)
    plugin = RecordingAMP(16, init_scale=1024.0)
    Trainer(plugins=[plugin], max_steps=4, gradient_clip_val=1.0, **QUIET).fit(model, loader())
    assert plugin.step_results == [True, True, False, True]
    assert plugin.scaler is not None
    assert plugin.scaler.get_scale() == 512.0
    assert torch.equal(flat_params(model.unused), unused_before)


def test_bf16_has_no_scaler_and_never_skips() -> None:
    plugin = RecordingAMP("bf16")
    trainer = Trainer(plugins=[plugin], max_steps=3, gradient_clip_val=1.0, **QUIET)
    trainer.fit(MLP(), loader())
    assert plugin.scaler is None
    assert plugin.step_results == [True, True, True]
    assert len(plugin.clip_norms) == 3
    assert "skipped_steps" not in trainer.callback_metrics


# --- clipping sees unscaled gradients; unscale_ exactly once ---------------------------------------
def test_clipping_norm_equals_an_fp32_reference_of_the_unscaled_gradients() -> None:
    model = MLP()
    reference_model = copy.deepcopy(model)
    batch = next(iter(loader()))
    plugin = RecordingAMP(16, init_scale=2.0**12)  # scaled gradients would be 4096x larger
    grads_before_clip: list[torch.Tensor] = []

    class Grads(torchplug.Plugin):
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            grads_before_clip.extend(p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"])

    clip = 0.05
    Trainer(plugins=[plugin, Grads()], max_steps=1, gradient_clip_val=clip, **QUIET).fit(model, loader())
    assert plugin.step_results == [True], "the reference needs a step that did not overflow"

    # Reference by hand: same weights, same batch, fp16 autocast forward, plain (unscaled) backward.
    x, y = batch
    with torch.autocast("cpu", dtype=torch.float16):
        out = reference_model.out(torch.relu(reference_model.hidden(x)))
        loss = nn.functional.mse_loss(out.float(), y)
    loss.backward()  # type: ignore[no-untyped-call]
    ref_grads = [p.grad for p in reference_model.parameters() if p.grad is not None]
    ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in ref_grads]))

    (norm,) = plugin.clip_norms
    by_hand = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads_before_clip]))
    assert norm.item() == pytest.approx(by_hand.item(), rel=1e-6)  # the very gradients the hook saw
    assert norm.item() == pytest.approx(ref_norm.item(), rel=2e-3)  # and the fp32 reference
    assert ref_norm.item() > 2 * clip  # so clipping really happened
    assert plugin.grad_norm_after_clip[0].item() == pytest.approx(clip, rel=1e-3)
    for got, ref in zip(grads_before_clip, ref_grads):
        torch.testing.assert_close(got, ref, rtol=5e-3, atol=1e-5)


def test_unscale_runs_once_per_optimizer_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core's unscale_gradients, a user hook asking again and clip_gradients: GradScaler
    raises on a second unscale_, and the counting subclass sees exactly one per optimizer."""
    calls: list[list[int]] = [[]]

    class CountingScaler(torch.amp.GradScaler):
        def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
            calls[-1].append(id(optimizer))
            super().unscale_(optimizer)

        def update(self, new_scale: float | torch.Tensor | None = None) -> None:
            super().update(new_scale)
            calls.append([])

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)

    class AsksAgain(torchplug.Plugin):
        def on_before_optimizer_step(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
            trainer.plugin_for("precision").unscale_gradients(optimizer)
            trainer.plugin_for("precision").unscale_gradients(optimizer)

    model = MLP(two_optimizers=True)
    plugin = RecordingAMP(16, init_scale=256.0)
    trainer = Trainer(plugins=[plugin, AsksAgain()], max_steps=4, accumulate_grad_batches=2,
                      gradient_clip_val=1.0, **QUIET)
    trainer.fit(model, loader())
    assert isinstance(plugin.scaler, CountingScaler)
    ids = sorted(id(o) for o in trainer.optimizers)
    steps = calls[:-1]
    assert len(steps) == 4
    assert all(sorted(step) == ids for step in steps)  # each optimizer once per step
    assert len(plugin.clip_norms) == 8


# --- checkpoints ----------------------------------------------------------------------------------
def test_resume_restores_the_loss_scale(tmp_path: Path) -> None:
    model = MLP()
    model.inf_at = {1, 3}
    plugin = NativeAMPPlugin(16, init_scale=1024.0, growth_interval=1000)
    trainer = Trainer(plugins=[plugin], max_steps=4, default_root_dir=tmp_path, enable_progress_bar=False,
                      log_every_n_steps=1)
    trainer.fit(model, loader())
    assert plugin.scaler is not None
    assert plugin.scaler.get_scale() == 256.0
    saved = tmp_path / "after_skips.ckpt"
    trainer.save_checkpoint(saved)
    data = torch.load(saved, weights_only=True)
    assert data["native_amp"] == {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 1000, "_growth_tracker": 0}
    assert data["skipped_steps"] == 2

    resumed_plugin = NativeAMPPlugin(16, init_scale=1024.0, growth_interval=1000)
    rec = StepRecorder()
    resumed = Trainer(plugins=[resumed_plugin, rec], max_steps=6, default_root_dir=tmp_path,
                      enable_progress_bar=False, log_every_n_steps=1)
    with pytest.warns(PlanChangedWarning, match="plugin 'StepRecorder'"):
        resumed.fit(MLP(), loader(), ckpt_path=saved)
    assert rec.scale_at_start == 256.0  # restored before the first resumed step
    assert rec.scales == [256.0, 256.0]
    assert resumed.global_step == 6
    assert resumed.callback_metrics["skipped_steps"] == 2.0


def test_growth_tracker_survives_resume(tmp_path: Path) -> None:
    """growth_interval=3: 2 clean steps, checkpoint, 1 more clean step after resume → grows."""
    first = NativeAMPPlugin(16, init_scale=256.0, growth_interval=3)
    trainer = Trainer(plugins=[first], max_steps=2, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(MLP(), loader())
    assert first.scaler is not None
    assert first.scaler.state_dict()["_growth_tracker"] == 2
    second = NativeAMPPlugin(16, init_scale=256.0, growth_interval=3)
    Trainer(plugins=[second], max_steps=3, default_root_dir=tmp_path, enable_progress_bar=False).fit(
        MLP(), loader(), ckpt_path=trainer.checkpoint_path)
    assert second.scaler is not None
    assert second.scaler.get_scale() == 512.0


def test_fp32_checkpoint_into_an_fp16_run_keeps_the_defaults(tmp_path: Path) -> None:
    trainer = Trainer(max_steps=2, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(MLP(), loader())
    assert trainer.checkpoint_path is not None
    assert "native_amp" not in torch.load(trainer.checkpoint_path, weights_only=True)
    plugin = NativeAMPPlugin(16, init_scale=512.0)
    rec = StepRecorder()
    resumed = Trainer(plugins=[plugin, rec], max_steps=3, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.warns(UserWarning, match="no GradScaler state"), \
            pytest.warns(PlanChangedWarning, match="precision role: torchplug.defaults -> native_amp"):
        resumed.fit(MLP(), loader(), ckpt_path=trainer.checkpoint_path)
    assert rec.scale_at_start == 512.0
    assert resumed.global_step == 3


def test_fp16_checkpoint_into_a_bf16_run_and_back(tmp_path: Path) -> None:
    fp16 = Trainer(plugins=[NativeAMPPlugin(16, init_scale=128.0)], max_steps=2, default_root_dir=tmp_path,
                   enable_progress_bar=False)
    fp16.fit(MLP(), loader())
    bf16 = Trainer(precision="bf16", max_steps=3, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.warns(PlanChangedWarning, match="setting precision: 32 -> bf16"):  # fp16 came from the plugin object
        bf16.fit(MLP(), loader(), ckpt_path=fp16.checkpoint_path)  # the scaler state is simply unused
    assert bf16.checkpoint_path is not None
    assert "native_amp" not in torch.load(bf16.checkpoint_path, weights_only=True)


def test_a_corrupt_scaler_state_names_the_plugin(tmp_path: Path) -> None:
    trainer = Trainer(plugins=[NativeAMPPlugin(16)], max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(MLP(), loader())
    assert trainer.checkpoint_path is not None
    data = torch.load(trainer.checkpoint_path, weights_only=True)
    data["native_amp"] = {"scale": 1.0}
    bad = tmp_path / "bad.ckpt"
    torch.save(data, bad)
    with pytest.raises(torchplug.TorchplugError, match=r"native_amp.*not a GradScaler state_dict") as info:
        Trainer(plugins=[NativeAMPPlugin(16)], max_steps=2, default_root_dir=tmp_path,
                enable_progress_bar=False).fit(MLP(), loader(), ckpt_path=bad)
    chain = [info.value, info.value.__cause__]
    assert any(isinstance(e, CheckpointError) for e in chain)


# --- odds and ends ------------------------------------------------------------------------------
def test_pickled_plugin_keeps_options_but_not_run_state() -> None:
    plugin = NativeAMPPlugin(16, init_scale=128.0, growth_interval=7)
    Trainer(plugins=[plugin], max_steps=1, **QUIET).fit(MLP(), loader())
    assert plugin.scaler is not None
    clone = pickle.loads(pickle.dumps(plugin))
    assert (clone.precision, clone.init_scale, clone.growth_interval) == ("16", 128.0, 7)
    assert clone.scaler is None
    assert clone.device_type is None
    assert repr(clone) == "NativeAMPPlugin(precision='16')"


def test_fit_twice_starts_a_fresh_scaler() -> None:
    plugin = NativeAMPPlugin(16, init_scale=1024.0)
    model = MLP()
    model.inf_at = {0}
    trainer = Trainer(plugins=[plugin], max_steps=2, **QUIET)
    trainer.fit(model, loader())
    first = plugin.scaler
    assert first is not None
    assert first.get_scale() == 512.0
    Trainer(plugins=[plugin], max_steps=1, **QUIET).fit(MLP(), loader())
    assert plugin.scaler is not first
    assert plugin.scaler is not None
    assert plugin.scaler.get_scale() == 1024.0


def test_bf16_training_stays_close_to_fp32() -> None:
    def train(precision: int | str) -> tuple[MLP, float]:
        model = MLP(lr=0.05)
        trainer = Trainer(precision=precision, max_epochs=3, log_every_n_steps=1, **QUIET)
        trainer.fit(model, loader(n=128))
        return model, trainer.callback_metrics["loss"]

    fp32_model, fp32_loss = train(32)
    bf16_model, bf16_loss = train("bf16")
    x, y = regression_data(n=128).tensors
    start = nn.functional.mse_loss(MLP()(x), y).item()
    assert fp32_loss < 0.5 * start  # it learned something
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.15, abs=0.02)
    diff = (flat_params(fp32_model) - flat_params(bf16_model)).abs().max().item()
    assert diff < 0.05


@pytest.mark.parametrize("make_inf", [False, True])
def test_a_fused_optimizer_that_skips_inside_its_kernel_is_still_counted(make_inf: bool) -> None:
    """Adam(fused=True) takes the scaler's found_inf into its own kernel and "steps" either way,
    so no step hook can tell; the plugin reads found_inf for it instead."""

    class FusedAdam(MLP):
        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    model = FusedAdam()
    model.inf_at = {1} if make_inf else set()
    plugin = RecordingAMP(16, init_scale=1024.0)
    rec = StepRecorder()
    trainer = Trainer(plugins=[plugin, rec], max_steps=3, **QUIET)
    trainer.fit(model, loader())
    assert plugin.step_results == [True, not make_inf, True]
    assert torch.equal(rec.before[1], rec.after[1]) is make_inf
    assert trainer.callback_metrics.get("skipped_steps", 0.0) == float(make_inf)


@pytest.mark.parametrize("precision", [16, "bf16"])
def test_the_plugin_reads_the_device_no_more_often_than_a_hand_written_amp_loop(
        precision: Any) -> None:
    """On a GPU every host read per step stalls the host on the device. With clipping, the
    Trainer (its loss check deferred, as on an accelerator) reads as often as a hand-written
    autocast loop: once per step for fp16 (GradScaler.step's found_inf), never for bf16."""
    from torchplug.testing.syncs import accelerator_path, reads_per_step

    dtype = torch.float16 if precision == 16 else torch.bfloat16

    def trainer_run(steps: int) -> None:
        with accelerator_path():
            trainer = Trainer(plugins=[NativeAMPPlugin(precision)], max_steps=steps, gradient_clip_val=1.0,
                              log_every_n_steps=1000, **QUIET)
            trainer.fit(MLP(), loader(n=256))

    def hand_run(steps: int) -> None:
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=model.lr)
        scaler = torch.amp.GradScaler("cpu", enabled=precision == 16)
        for _, (x, y) in zip(range(steps), loader(n=256)):
            with torch.autocast("cpu", dtype=dtype):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    hand, _ = reads_per_step(hand_run)
    ours, reads = reads_per_step(trainer_run)
    assert hand == (1.0 if precision == 16 else 0.0)
    assert ours == hand, reads.report()
