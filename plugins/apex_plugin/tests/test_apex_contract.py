"""Contract tests: OUR protocol (torchplug's ApexPlugin and the core's hook order) checked against
a FAKE of NVIDIA apex 25.05's ``apex.amp`` (tests/fake_apex; how it differs from real apex:
REAL_APEX_NOTES.md).

They prove that the plugin calls apex the way apex 25.05 documents (initialize once, before DDP;
backward inside ``scale_loss``; clip ``master_params``; skip on overflow; state_dict after
initialize), not that real apex behaves like the fake: that is what test_apex_real_gpu.py checks
on a CUDA machine with real apex. They run on the CPU through ``CPUApexPlugin`` (apex_test_support),
an ApexPlugin subclass without the CUDA requirement.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from apex_test_support import (
    FAKE_APEX,
    HERE,
    CPUApexPlugin,
    Net,
    Probe,
    batches,
    cpu_apex_trainer,
    grad,
    hand_apex_loop,
    loader,
    total_norm64,
    weight0,
)

import torchplug
from torchplug import CheckpointError, MisconfigurationError, PlanChangedWarning, PluginHookError
from torchplug.testing.recorder import HookRecorder
from torchplug.testing.syncs import accelerator_path, reads_per_step
from torchplug_apex import CHECKPOINT_KEY, ApexPlugin

pytestmark = [
    pytest.mark.timeout(120),
    # the plugin's own once-per-process notice that apex amp is deprecated upstream
    pytest.mark.filterwarnings("ignore::torchplug_apex.ApexAmpDeprecationWarning"),
]

LEVELS = ("O0", "O1", "O2", "O3")


def calls(amp: ModuleType, name: str | None = None) -> list[Any]:
    """The fake's record of public-API calls: names, or the kwargs of calls to ``name``."""
    if name is None:
        return [n for n, _ in amp._fake_calls]
    return [kw for n, kw in amp._fake_calls if n == name]


def fit(model: Net, data: list[Any] | None = None, **kwargs: Any) -> torchplug.Trainer:
    trainer = cpu_apex_trainer(**kwargs)
    trainer.fit(model, train_dataloaders=data if data is not None else batches())
    return trainer


def test_contract_initialize_runs_once_after_the_optimizers_and_before_configure_ddp(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: amp.initialize once, with the user's module and the
    optimizers configure_optimizers made, from connect_precision → configure_apex, before
    configure_ddp sees the model."""
    recorder, probe = HookRecorder(), Probe()
    model = Net()
    trainer = fit(model, max_steps=3, plugins=[recorder, probe])

    inits = calls(fake_amp, "initialize")
    assert len(inits) == 1
    assert inits[0]["models"] is model
    assert inits[0]["optimizers"] == trainer.optimizers  # the list, as the core passed it
    assert inits[0]["opt_level"] == "O2"  # Lightning 1.1's default
    names = recorder.names()
    setup = [n for n in names if n in ("on_after_setup_optimizers", "connect_precision", "configure_apex",
                                      "configure_ddp", "on_fit_start")]
    assert setup == ["on_after_setup_optimizers", "connect_precision", "configure_apex", "configure_ddp",
                     "on_fit_start"]
    # when the core reached configure_ddp, apex had initialised (and the model it got is the user's)
    assert probe.at_configure_ddp == {"initialize_calls": 1, "model_class": "Net", "opt_level": "O2"}
    assert hasattr(trainer.optimizers[0], "_amp_stash")
    assert calls(fake_amp).count("scale_loss") == 3


@pytest.mark.timeout(180)
def test_contract_two_gloo_ranks_initialize_once_and_accumulate_in_sync(
        fake_amp: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OUR protocol vs a fake of apex 25.05, with the real DDP plugin and two spawned gloo ranks:
    every rank calls amp.initialize exactly once, before configure_ddp, which then wraps the
    model apex returned in DistributedDataParallel. With gradient accumulation, the micro-batches
    whose all-reduce the core blocks use scale_loss(delay_unscale=True), so the window's last
    backward all-reduces the whole window and both ranks end with identical weights (with apex's
    default stash, each rank would add its own unsynchronised micro-batches back)."""
    pytest.importorskip("torchplug_ddp")
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_APEX), str(HERE), os.environ.get("PYTHONPATH", "")]))
    recorder = HookRecorder(tmp_path / "hooks")
    trainer = cpu_apex_trainer(max_steps=2, accelerator="cpu", devices=2, accumulate_grad_batches=2,
                           plugins=[recorder, Probe(str(tmp_path / "probe"))])
    trainer.fit(Net(), train_dataloaders=loader(32, batch_size=4))
    assert trainer.global_step == 2

    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "probe").glob("probe-*.json"))]
    assert sorted(r["rank"] for r in records) == [0, 1]
    for r in records:
        assert r["at_configure_ddp"] == {"initialize_calls": 1, "model_class": "Net", "opt_level": "O2"}
        assert r["initialize_calls_total"] == 1
        assert r["delay_unscale"] == [True, False, True, False]
        assert r["stepped_model"] == "DistributedDataParallel"
        assert Path(r["apex_file"]).is_relative_to(FAKE_APEX)
    rank0, rank1 = records
    assert rank0["params"] == rank1["params"]  # bit-identical across ranks
    assert rank0["params"] != [p.detach().flatten().tolist() for p in Net().parameters()]  # and trained
    workers = {pid: calls_ for pid, calls_ in recorder.by_process().items() if any(c.rank is not None for c in calls_)}
    assert len(workers) == 2
    for worker_calls in workers.values():
        names = [c.name for c in worker_calls]
        assert names.count("configure_apex") == 1
        assert names.index("connect_precision") < names.index("configure_apex") < names.index("configure_ddp")


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_contract_delayed_unscale_window_gives_the_plain_gradients(fake_amp: ModuleType, level: str) -> None:
    """OUR protocol vs a fake of apex 25.05, world size 2 as the DDP plugin reports it: a window
    whose first micro-batch does not synchronise (sync_gradients=False: the core runs it inside
    block_backward_sync) runs it with delay_unscale=True, and the window's gradients, the fp32
    BatchNorm params included, equal the unscaled sum of the micro-batches' gradients. In the
    first window of a fit this needs apex's lazy master-weight set-up to run before the delayed
    backward (else apex sets the fp32 params' accumulated gradients to None when it runs in the
    last one)."""
    data = batches(2)
    reference = Net(batchnorm=True)
    loss = torch.stack([F.cross_entropy(reference(x), y) / 2 for x, y in data]).sum()
    ref_grads = torch.autograd.grad(loss, list(reference.parameters()))

    trainer = cpu_apex_trainer(amp_level=level)
    trainer.world_size = 2  # what the core sets from the DDP plugin's world_size hook
    plugin = trainer.plugin_for("precision")
    assert isinstance(plugin, ApexPlugin)
    net = Net(batchnorm=True)
    model, [opt] = plugin.connect_precision(trainer, net, [net.configure_optimizers()])
    for i, (x, y) in enumerate(data):  # the core: sync_gradients only for the window's last micro-batch
        plugin.backward(F.cross_entropy(model(x), y) / 2, [opt], sync_gradients=i == len(data) - 1)
    assert [kw["delay_unscale"] for kw in calls(fake_amp, "scale_loss")] == [True, False]
    masters = list(fake_amp.master_params(opt))
    assert len(masters) == len(ref_grads) == 6
    for master, ref in zip(masters, ref_grads):
        assert master.grad is not None
        assert torch.allclose(master.grad, ref, rtol=1e-5, atol=1e-7)


def test_contract_one_process_keeps_apex_plain_accumulation(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: in one process every micro-batch exits scale_loss
    unscaled (apex's documented accumulation; delay_unscale is only for DDP windows)."""
    fit(Net(), batches(4), max_epochs=1, accumulate_grad_batches=2)
    assert [kw["delay_unscale"] for kw in calls(fake_amp, "scale_loss")] == [False] * 4


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
def test_contract_a_model_already_wrapped_for_data_parallel_is_refused(
        fake_amp: ModuleType, wrapper: str, tmp_path: Path) -> None:
    """OUR protocol vs a fake of apex 25.05: apex refuses a DDP/DataParallel model; the plugin
    refuses it first with the fix (wrapping comes after amp.initialize), and when a user's
    configure_apex wraps it anyway, apex's own RuntimeError comes back explained."""
    made_group = False
    if wrapper == "DistributedDataParallel" and not dist.is_initialized():
        store = dist.FileStore(str(tmp_path / "store"), 1)  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        made_group = True
    try:
        def wrap(module: torch.nn.Module) -> torch.nn.Module:
            if wrapper == "DataParallel":
                return torch.nn.DataParallel(module)
            return torch.nn.parallel.DistributedDataParallel(module)

        trainer = cpu_apex_trainer()
        plugin = trainer.plugin_for("precision")
        assert isinstance(plugin, ApexPlugin)
        model = Net()
        with pytest.raises(MisconfigurationError, match=f"already wrapped in {wrapper}.*before configure_ddp"):
            plugin.connect_precision(trainer, wrap(model), [model.configure_optimizers()])
        assert calls(fake_amp, "initialize") == []  # refused before apex was asked

        class WrapsFirst(CPUApexPlugin):
            def configure_apex(self, amp: Any, model: Any, optimizers: Any, amp_level: str) -> Any:
                return amp.initialize(wrap(model), optimizers, opt_level=amp_level)

        with pytest.raises(PluginHookError) as info:
            fit(Net(), max_steps=1, plugins=[WrapsFirst()])
        error = info.value.__cause__
        assert isinstance(error, MisconfigurationError)
        assert f"Incoming model is an instance of torch.nn.parallel.{wrapper}" in str(error)
        assert "before configure_ddp" in str(error)
        assert isinstance(error.__cause__, RuntimeError)  # apex's own error, kept
    finally:
        if made_group:
            dist.destroy_process_group()


@pytest.mark.parametrize("level", LEVELS)
def test_contract_amp_level_is_passed_through_to_initialize(fake_amp: ModuleType, level: str) -> None:
    """OUR protocol vs a fake of apex 25.05: Trainer(precision=16, amp_backend="apex",
    amp_level=...) reaches amp.initialize(opt_level=...) unchanged, and apex's level takes effect
    (O2 trains fp32 masters that replace the model's params in the optimizer)."""
    model = Net()
    model_params = list(model.parameters())
    trainer = fit(model, max_steps=2, amp_level=level)
    assert trainer.plugin_names == ["apex"]
    plugin = trainer.plugin_for("precision")
    assert isinstance(plugin, ApexPlugin)
    assert plugin.amp_level == level
    assert [kw["opt_level"] for kw in calls(fake_amp, "initialize")] == [level]
    props = fake_amp._amp_state.opt_properties
    assert props.opt_level == level
    optimizer_params = trainer.optimizers[0].param_groups[0]["params"]
    if level == "O2":  # masters: new fp32 tensors, the model's (half) params no longer in the optimizer
        assert all(p is not q for p, q in zip(optimizer_params, model_params))
    else:
        assert all(p is q for p, q in zip(optimizer_params, model_params))


def test_contract_plugin_object_level_and_defaults(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: an ApexPlugin object picks the level; None follows
    the Trainer's amp_level, else O2; two different levels are refused."""
    fit(Net(), max_steps=1, plugins=[CPUApexPlugin("O3")])
    fit(Net(), max_steps=1, plugins=[CPUApexPlugin()], amp_level="O1")
    fit(Net(), max_steps=1, plugins=[CPUApexPlugin()])
    assert [kw["opt_level"] for kw in calls(fake_amp, "initialize")] == ["O3", "O1", "O2"]
    with pytest.raises(MisconfigurationError, match=r"ApexPlugin\(amp_level='O3'\) and Trainer\(amp_level='O1'\)"):
        cpu_apex_trainer(plugins=[CPUApexPlugin("O3")], amp_level="O1")
    with pytest.raises(MisconfigurationError, match="the letter O"):
        ApexPlugin("00")
    with pytest.raises(MisconfigurationError, match="no bf16 mode"):
        torchplug.Trainer(precision="bf16", plugins=[ApexPlugin()], autoload_plugins=False)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_contract_backward_runs_inside_scale_loss_like_the_documented_loop(
        fake_amp: ModuleType, level: str, accumulate: int) -> None:
    """OUR protocol vs a fake of apex 25.05: every micro-batch's loss (divided by the window, as
    apex documents for accumulation) goes through amp.scale_loss with the run's optimizers, and
    the optimizers step once per window: the Trainer ends bit-for-bit where the hand-written apex
    loop of apex's docs ends."""
    data = batches(6)
    model = Net(batchnorm=True)
    trainer = fit(model, data, max_epochs=1, amp_level=level, accumulate_grad_batches=accumulate)
    scale_loss_calls = calls(fake_amp, "scale_loss")
    assert len(scale_loss_calls) == 6
    assert all(kw["optimizers"] == trainer.optimizers for kw in scale_loss_calls)
    assert trainer.global_step == 6 // accumulate

    reference, _ = hand_apex_loop(fake_amp, Net(batchnorm=True), level, data, accumulate=accumulate)
    for got, want in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(got, want)
    # the loss handed to scale_loss was the micro-batch loss / window
    first = scale_loss_calls[0]["loss"]
    x, y = data[0]
    assert torch.allclose(first * accumulate, F.cross_entropy(Net(batchnorm=True)(x), y), rtol=1e-6)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_contract_host_reads_match_a_hand_written_apex_loop(fake_amp: ModuleType, level: str) -> None:
    """On a GPU each host read (.item(), float(t), ...) stalls the host on the device. With the
    accelerator path forced (the loss check queued), the Trainer reads per step exactly what
    apex's documented loop reads: the fake mirrors apex without amp_C, whose overflow check
    reads each gradient (with amp_C it is one read)."""
    with accelerator_path():
        hand, _ = reads_per_step(lambda steps: hand_apex_loop(fake_amp, Net(), level, batches(steps)))
        ours, reads = reads_per_step(
            lambda steps: fit(Net(), batches(steps), max_epochs=1, amp_level=level, log_every_n_steps=1000))
    assert hand == len(list(Net().parameters()))
    assert ours == hand, reads.report()


def _configured(level: str, model: Net) -> tuple[ApexPlugin, torch.nn.Module, Any]:
    trainer = cpu_apex_trainer(amp_level=level)
    plugin = trainer.plugin_for("precision")
    assert isinstance(plugin, ApexPlugin)
    out_model, [opt] = plugin.connect_precision(trainer, model, [model.configure_optimizers()])
    return plugin, out_model, opt


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_contract_clipping_uses_master_params_and_eps_1e5(fake_amp: ModuleType, norm_type: float) -> None:
    """OUR protocol vs a fake of apex 25.05: clip_gradients takes the norm over
    amp.master_params(optimizer) (at O2 the fp32 masters; the model's fp16 .grad stay scaled by
    the loss scale), clips with min(1, max_norm / (norm + 1e-5)) and returns the norm: numbers
    against a float64 hand computation."""
    torch.manual_seed(0)
    x, y = batches(1)[0]
    reference = Net(batchnorm=True)
    ref_grads = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))

    plugin, model, opt = _configured("O2", Net(batchnorm=True))
    assert plugin.backward(F.cross_entropy(model(x), y), [opt], sync_gradients=True) is True
    masters = list(fake_amp.master_params(opt))
    assert [p.grad for p in masters] != [None] * len(masters)
    for master, ref in zip(masters, ref_grads):  # unscaled exactly (the scale is a power of 2)
        assert torch.equal(grad(master), ref)
    scale = fake_amp._amp_state.loss_scalers[0].loss_scale()
    assert scale == 2.0**16
    linear_weight = weight0(model)
    assert torch.equal(grad(linear_weight), ref_grads[0] * scale)  # model grads stay scaled

    expected_total = total_norm64(list(ref_grads), norm_type)
    max_norm = expected_total / 4
    total = plugin.clip_gradients(max_norm, opt, norm_type)
    assert math.isclose(float(total), expected_total, rel_tol=1e-6)
    coef = max_norm / (expected_total + 1e-5)
    for p, ref in zip(masters, ref_grads):
        assert torch.allclose(grad(p).double(), ref.double() * coef, rtol=1e-6, atol=1e-12)
    assert torch.equal(grad(linear_weight), ref_grads[0] * scale)  # not clipped: not what the optimizer applies
    assert calls(fake_amp).count("master_params") >= 1

    # below the threshold the coefficient is clamped at 1: gradients bit-for-bit unchanged
    before = [p.grad.clone() for p in masters]
    total_after = plugin.clip_gradients(1e9, opt, norm_type)
    assert math.isclose(float(total_after), max_norm * expected_total / (expected_total + 1e-5), rel_tol=1e-5)
    assert all(torch.equal(p.grad, b) for p, b in zip(masters, before))


def test_contract_clip_epsilon_is_1e5_not_torchs_1e6(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: with a tiny gradient norm the epsilon decides the
    coefficient; ours is 1e-5 (Lightning's apex plugin), torch's clip_grad_norm_ uses 1e-6."""
    plugin, model, opt = _configured("O2", Net())
    x, y = batches(1)[0]
    plugin.backward(F.cross_entropy(model(x), y) * 1e-9, [opt], sync_gradients=True)
    masters = list(fake_amp.master_params(opt))
    total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in masters))
    assert 1e-9 < total < 1e-7
    max_norm = total / 2
    torch_copy = [p.grad.clone() for p in masters]
    plugin.clip_gradients(max_norm, opt, 2.0)
    ours = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in masters))
    assert math.isclose(ours, max_norm * total / (total + 1e-5), rel_tol=1e-4)
    params = [torch.zeros_like(g).requires_grad_() for g in torch_copy]
    for p, g in zip(params, torch_copy):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    theirs = math.sqrt(sum(float((grad(p).double() ** 2).sum()) for p in params))
    assert theirs > 5 * ours  # 1e-6 vs 1e-5 against a norm of ~1e-8: a different result


def test_contract_clipping_in_the_loop_matches_the_hand_loop(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: Trainer(gradient_clip_val=...) clips the master
    params once per optimizer step, and ends where the hand loop that clips amp.master_params
    with eps 1e-5 ends."""
    data = batches(4)
    model = Net()
    trainer = fit(model, data, max_epochs=1, amp_level="O2", gradient_clip_val=0.05)
    master_calls = [kw["optimizer"] for kw in calls(fake_amp, "master_params")]
    assert master_calls == [trainer.optimizers[0]] * 4
    reference, _ = hand_apex_loop(fake_amp, Net(), "O2", data, clip=0.05)
    for got, want in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    unclipped = Net()
    fit(unclipped, data, max_epochs=1, amp_level="O2")
    assert not torch.allclose(weight0(model), weight0(unclipped), atol=1e-4)  # clipping mattered


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_contract_overflow_skips_the_step_and_the_scheduler(fake_amp: ModuleType, level: str) -> None:
    """OUR protocol vs a fake of apex 25.05: an inf gradient makes apex schedule a skip
    (_amp_stash.already_patched), which optimizer_step reports as False: parameters unchanged,
    the loss scale halved, the skip counted, the LR scheduler not stepped; training goes on."""
    probe = Probe()
    trainer = fit(Net(inject_at=(1,), sched="step"), max_steps=4, amp_level=level, plugins=[probe])
    before, at, after = probe.after_batch[0], probe.after_batch[1], probe.after_batch[2]
    assert all(torch.equal(a, b) for a, b in zip(before["params"], at["params"]))
    assert any(not torch.equal(a, b) for a, b in zip(at["params"], after["params"]))
    assert (before["scale"], at["scale"], after["scale"]) == (65536.0, 32768.0, 32768.0)
    assert trainer.callback_metrics["skipped_steps"] == 1.0
    assert [kw["loss_id"] for kw in calls(fake_amp, "skip_step")] == [0]
    scheduler = trainer.lr_schedulers[0]
    assert scheduler.last_epoch == 3  # 4 optimizer steps, one skipped
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert not getattr(trainer.optimizers[0], "_amp_stash").already_patched  # noqa: B009


def test_contract_overflow_in_one_micro_batch_skips_the_whole_window(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: with accumulation, an overflow in the window's first
    micro-batch still skips the window's single step (apex keeps its skip patch until step)."""
    probe = Probe()
    trainer = fit(Net(inject_at=(2,)), batches(6), max_epochs=1, accumulate_grad_batches=2, plugins=[probe])
    assert trainer.global_step == 3
    assert trainer.callback_metrics["skipped_steps"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(probe.after_batch[1]["params"], probe.after_batch[3]["params"]))


def test_contract_zero_grad_set_to_none_works_at_O2(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: apex's O2 ``optimizer.zero_grad`` takes no
    arguments; the core calls ``zero_grad(set_to_none=True)`` after every step, which the plugin
    makes work (masters' grads are dropped by apex; model grads are reset before backward)."""
    bare_model = Net()
    bare_opt = bare_model.configure_optimizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fake_amp.initialize(bare_model, bare_opt, opt_level="O2", verbosity=0)
    with pytest.raises(TypeError):  # apex alone: the core's call would fail
        bare_opt.zero_grad(set_to_none=True)

    plugin, model, opt = _configured("O2", Net())
    x, y = batches(1)[0]
    plugin.backward(F.cross_entropy(model(x), y), [opt], sync_gradients=True)
    opt.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=False)
    opt.zero_grad()
    assert all(p.grad is None for p in fake_amp.master_params(opt))
    trainer = fit(Net(), max_steps=4, amp_level="O2")  # the loop's zero_grad(set_to_none=True) after each step
    assert trainer.global_step == 4


def test_contract_checkpoint_round_trip_and_resume_initialise_then_load(fake_amp: ModuleType, tmp_path: Path) -> None:
    """OUR protocol vs a fake of apex 25.05: amp.state_dict() is saved under "apex_amp" (loadable
    with weights_only=True); on resume the core initialises apex first and then loads it, so the
    halved loss scale survives, and a 2+2-step resumed run ends where a 4-step run ends."""
    data = batches(6)
    straight = Net(inject_at=(1,))
    fit(straight, data, max_steps=4)
    straight_state = dict(fake_amp.state_dict())

    first = cpu_apex_trainer(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    first.fit(Net(inject_at=(1,)), train_dataloaders=data)
    assert first.checkpoint_path is not None
    saved = torch.load(first.checkpoint_path, weights_only=True)
    assert saved[CHECKPOINT_KEY] == {"loss_scaler0": {"loss_scale": 32768.0, "unskipped": 0}}
    assert saved["skipped_steps"] == 1

    fake_amp._fake_calls.clear()
    probe = Probe()
    resumed_model = Net(inject_at=(1,))
    second = cpu_apex_trainer(max_steps=4, plugins=[probe])
    with pytest.warns(PlanChangedWarning, match="plugin 'apex_probe'"):  # the first run had no probe
        second.fit(resumed_model, train_dataloaders=data, ckpt_path=first.checkpoint_path)
    order = [n for n in calls(fake_amp) if n in ("initialize", "load_state_dict", "scale_loss")]
    assert order[:3] == ["initialize", "load_state_dict", "scale_loss"]
    assert calls(fake_amp, "load_state_dict")[0]["state_dict"] == saved[CHECKPOINT_KEY]
    assert probe.scale_at_fit_start == 32768.0
    assert second.callback_metrics["skipped_steps"] == 1.0
    for got, want in zip(resumed_model.parameters(), straight.parameters()):
        assert torch.equal(got, want)
    assert dict(fake_amp.state_dict()) == straight_state


def test_contract_checkpoint_without_or_with_bad_apex_state(fake_amp: ModuleType, tmp_path: Path) -> None:
    """OUR protocol vs a fake of apex 25.05: a checkpoint without "apex_amp" (an fp32 run's)
    warns and keeps apex's initial scale; a malformed entry is a CheckpointError naming the plugin."""
    plain = torchplug.Trainer(max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                              autoload_plugins=False)
    plain.fit(Net(), train_dataloaders=batches())
    assert plain.checkpoint_path is not None
    with pytest.warns(UserWarning, match="no apex amp state"), \
            pytest.warns(PlanChangedWarning, match=r"precision role: torchplug.defaults -> apex \[numerics\]"):
        cpu_apex_trainer(max_steps=2).fit(Net(), train_dataloaders=batches(), ckpt_path=plain.checkpoint_path)

    bad = torch.load(plain.checkpoint_path, weights_only=True)
    bad[CHECKPOINT_KEY] = {"not_a_scaler": {"loss_scale": 1.0}}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(PluginHookError) as info, pytest.warns(PlanChangedWarning, match="plugin 'apex'"):
        cpu_apex_trainer(max_steps=2).fit(Net(), train_dataloaders=batches(), ckpt_path=tmp_path / "bad.ckpt")
    assert isinstance(info.value.__cause__, CheckpointError)
    assert "'apex_amp' entry is not an amp.state_dict()" in str(info.value.__cause__)


def test_contract_user_subclass_configure_apex_is_used(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: a subclass overriding configure_apex (Lightning 1.1
    docs) decides how amp.initialize is called; the plugin uses what it returns."""

    class MyApex(CPUApexPlugin):
        def configure_apex(self, amp: Any, model: Any, optimizers: Any, amp_level: str) -> Any:
            model, optimizers = amp.initialize(model, optimizers, opt_level=amp_level, loss_scale=128.0,
                                               keep_batchnorm_fp32=False, verbosity=0)
            return model, optimizers

    trainer = fit(Net(batchnorm=True), max_steps=2, plugins=[MyApex("O2")])
    [init] = calls(fake_amp, "initialize")
    assert (init["opt_level"], init["loss_scale"], init["keep_batchnorm_fp32"]) == ("O2", 128.0, False)
    scaler = fake_amp._amp_state.loss_scalers[0]
    assert (scaler.loss_scale(), scaler.dynamic) == (128.0, False)
    assert trainer.plugin_names == ["apex"]


def test_contract_schedulers_follow_optimizers_that_configure_apex_replaces(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: when configure_apex returns new optimizer objects,
    the core re-binds the LR schedulers to them; with apex's patched step the schedulers raise no
    "optimizer.step() has been overridden" warning (filterwarnings=error would fail this test)."""
    replaced: list[torch.optim.Optimizer] = []

    class NewOptimizers(CPUApexPlugin):
        def configure_apex(self, amp: Any, model: Any, optimizers: Any, amp_level: str) -> Any:
            fresh = [torch.optim.SGD(model.parameters(), lr=opt.param_groups[0]["lr"]) for opt in optimizers]
            replaced.extend(fresh)
            return amp.initialize(model, fresh, opt_level=amp_level)

    trainer = fit(Net(sched="step"), max_steps=3, plugins=[NewOptimizers("O1")])
    scheduler = trainer.lr_schedulers[0]
    assert trainer.optimizers == replaced
    assert scheduler.optimizer is replaced[0]
    assert replaced[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)

    trainer = fit(Net(sched="step"), max_steps=3, amp_level="O2")  # same objects, patched step
    assert trainer.lr_schedulers[0].optimizer is trainer.optimizers[0]
    assert trainer.lr_schedulers[0].last_epoch == 3


def test_contract_configure_apex_must_return_model_and_optimizers(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: a configure_apex that returns something else than
    (model, optimizers) is refused, naming the hook."""

    class Bad(CPUApexPlugin):
        def configure_apex(self, amp: Any, model: Any, optimizers: Any, amp_level: str) -> Any:
            amp.initialize(model, optimizers, opt_level=amp_level)
            return model

    with pytest.raises(PluginHookError, match=r"configure_apex must return \(model, optimizers\)"):
        fit(Net(), max_steps=1, plugins=[Bad()])


def test_contract_second_fit_of_an_O2_model_names_the_cause(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: apex casts an O2 model in place, so fitting the same
    model again makes amp.initialize refuse it; the error says why and what to do."""
    model = Net()
    trainer = cpu_apex_trainer(max_steps=1)
    trainer.fit(model, train_dataloaders=batches())
    with pytest.raises(PluginHookError) as info:
        trainer.fit(model, train_dataloaders=batches())
    assert "already fp16" in str(info.value.__cause__)
    assert "Build a fresh fp32 model" in str(info.value.__cause__)


def test_contract_an_earlier_O1_patching_is_undone_before_initialising_again(fake_amp: ModuleType) -> None:
    """OUR protocol vs a fake of apex 25.05: O1 patches torch functions and apex never undoes it;
    a second O1 initialize in the same process (a second fit, a resume) would stack a second
    layer of wrappers, which breaks real apex's cast cache. The plugin calls the earlier handle's
    ``_deactivate()`` (real apex's AmpHandle API; the fake's handle patches nothing and has none,
    so the test gives it one) before amp.initialize runs again."""
    fit(Net(), max_steps=1, amp_level="O1")
    seen: list[int] = []
    handle = fake_amp._amp_state.handle
    handle._deactivate = lambda: seen.append(len(calls(fake_amp, "initialize")))
    fit(Net(), max_steps=1, amp_level="O1")
    assert seen == [1]  # once, before the second initialize
    assert fake_amp._amp_state.handle is not handle


def test_apex_deprecation_is_silenced_and_ours_warned_once(fake_amp: ModuleType, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """apex's DeprecatedFeatureWarning (emitted by every amp.initialize) does not reach the user;
    the plugin says once per process that apex amp is deprecated upstream."""
    import torchplug_apex.plugin as plugin_module

    monkeypatch.setattr(plugin_module, "_warned_deprecated", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Net(), max_steps=1)
        fit(Net(), max_steps=1)
    ours = [w for w in caught if issubclass(w.category, plugin_module.ApexAmpDeprecationWarning)]
    assert len(ours) == 1
    assert "removed in apex 25.07" in str(ours[0].message)
    assert not [w for w in caught if "apex.amp is deprecated" in str(w.message)]
    assert len(calls(fake_amp, "initialize")) == 2


def test_pickled_plugin_keeps_its_options_not_the_apex_module(fake_amp: ModuleType) -> None:
    trainer = cpu_apex_trainer(plugins=[CPUApexPlugin("O1")])
    plugin = trainer.plugin_for("precision")
    assert isinstance(plugin, ApexPlugin)
    assert plugin.amp is fake_amp
    copy_ = pickle.loads(pickle.dumps(plugin))
    assert (type(copy_), copy_.amp_level, copy_.amp, copy_.initialized) == (CPUApexPlugin, "O1", None, False)
    assert copy_._needs_cuda is False
