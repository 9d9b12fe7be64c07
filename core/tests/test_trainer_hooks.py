"""The exact order of every hook call in one process, and what skipped steps do.

``Recorder`` implements every hook of ``torchplug.hookspecs`` with no arguments (pluggy passes
an implementation only the arguments it names) and returns None, so it changes nothing and
the built-in defaults still answer every firstresult hook.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import torchplug
from torchplug.hookspecs import HOOK_NAMES


def _recording(name: str) -> Any:
    if name == "on_before_forward":
        def impl(self: Any, args: Any) -> None:
            self.calls.append(f"{name}:{args[1]}")
    elif name == "on_train_batch_end":
        def impl(self: Any, batch_idx: int) -> None:  # type: ignore[misc]
            self.calls.append(f"{name}:{batch_idx}")
    elif name in ("on_train_epoch_start", "on_train_epoch_end"):
        def impl(self: Any, epoch: int) -> None:  # type: ignore[misc]
            self.calls.append(f"{name}:{epoch}")
    else:
        def impl(self: Any) -> None:  # type: ignore[misc]
            self.calls.append(name)
    impl.__name__ = impl.__qualname__ = name
    return impl


class Recorder(torchplug.Plugin):
    def __init__(self) -> None:
        self.calls: list[str] = []


for _name in HOOK_NAMES:
    setattr(Recorder, _name, _recording(_name))


def expected_fit(epochs: int, n_batches: int, accumulate: int, clip: bool, n_val: int, val_metrics: int,
                 checkpoint: bool, resume: bool = False, first_epoch: int = 0, logs: bool = True) -> list[str]:
    """The documented order (loop.py's docstring), written out independently of the loop.
    ``logs``: training_step logs a metric (Net's train_loss), so every epoch end writes a row;
    log_every_n_steps is never reached here."""
    calls = ["launch", "setup_environment", "world_size", "global_rank", "setup", "root_device",
             "model_init_context", "model_transforms", "setup_optimizers", "on_after_setup_optimizers",
             "connect_precision", "configure_ddp"]
    if resume:
        calls += ["load_state_dicts", "on_load_checkpoint"]
    calls += ["on_fit_start", "on_train_start"]
    for epoch in range(first_epoch, epochs):
        calls += ["on_epoch_start", f"on_train_epoch_start:{epoch}"]
        for i in range(n_batches):
            window_end = (i + 1) % accumulate == 0 or i + 1 == n_batches
            calls += ["on_train_batch_start", f"on_before_forward:{i}"]
            if not window_end:
                calls.append("block_backward_sync")
            calls += ["forward_context", "on_before_backward", "backward", "on_after_backward"]
            if window_end:
                calls += ["unscale_gradients", "on_before_optimizer_step"]
                if clip:
                    calls.append("clip_gradients")
                calls += ["optimizer_step", "on_before_zero_grad"]
            calls.append(f"on_train_batch_end:{i}")
        calls += ["training_epoch_end", f"on_train_epoch_end:{epoch}", "on_epoch_end"]
        if logs:
            calls.append("on_log_metrics")
        if n_val:
            calls += ["on_validation_start", "on_validation_epoch_start"]
            for j in range(n_val):
                calls += ["on_validation_batch_start", f"on_before_forward:{j}", "forward_context",
                          "on_validation_batch_end"]
            calls += ["validation_epoch_end", "on_validation_epoch_end"]
            calls += ["reduce"] * val_metrics
            calls += ["on_validation_end", "on_log_metrics"]
        if checkpoint:
            calls += ["save_sharded_state", "collect_state", "get_state_dicts", "on_save_checkpoint"]
    calls += ["on_train_end", "on_fit_end", "teardown", "teardown_environment"]
    return calls


def test_hook_order_with_accumulation_clipping_validation_and_checkpoints(tp: Any, make_trainer: Any) -> None:
    recorder = Recorder()
    trainer = make_trainer(plugins=[recorder], max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=1.0)
    assert recorder.calls == ["required_plugins", "check_configuration"]  # from Trainer.__init__
    recorder.calls.clear()
    # 40 samples / 8 = 5 batches: windows of 2, 2, 1; 24 / 12 = 2 validation batches
    trainer.fit(tp.fresh_net(), tp.loader(n=40), tp.loader(n=24, batch_size=12, shuffle=False))
    assert recorder.calls == expected_fit(epochs=2, n_batches=5, accumulate=2, clip=True, n_val=2,
                                          val_metrics=2, checkpoint=True)
    assert trainer.global_step == 6
    # What never fires in one process without a DDP wrapper, apex, a resume or an error (the plan
    # handshake, all_gather_object, runs with several processes only):
    fired = {call.split(":")[0] for call in recorder.calls} | {"required_plugins", "check_configuration"}
    assert set(HOOK_NAMES) - fired == {"configure_apex", "get_model_from_plugin", "data_parallel_group", "barrier",
                                       "broadcast", "all_gather_object", "load_state_dicts", "on_load_checkpoint",
                                       "load_sharded_state", "on_exception"} | TEST_AND_PREDICT_HOOKS


#: The hooks of Trainer.test and Trainer.predict (evalrun.py), which a fit never calls.
TEST_AND_PREDICT_HOOKS = {name for name in HOOK_NAMES if name.startswith(("on_test_", "on_predict_"))} | {
    "test_epoch_end"}


def expected_eval(stage: str, n_batches: list[int], metrics: int = 0) -> list[str]:
    """Trainer.test/Trainer.predict's documented order (evalrun.py's docstring), written out:
    test runs through launch and the environment hooks, predict in this process."""
    calls = ["launch", "setup_environment", "world_size", "global_rank"] if stage == "test" else []
    calls += ["setup", "root_device", f"on_{stage}_start", f"on_{stage}_epoch_start"]
    for n in n_batches:
        for i in range(n):
            calls += [f"on_{stage}_batch_start", f"on_before_forward:{i}", "forward_context", f"on_{stage}_batch_end"]
    if stage == "test":
        calls += ["test_epoch_end", "on_test_epoch_end", *["reduce"] * metrics, "on_test_end", "teardown",
                  "teardown_environment"]
    else:
        calls += ["on_predict_epoch_end", "on_predict_end", "teardown"]
    return calls


def test_hook_order_of_test_and_predict(tp: Any, make_trainer: Any) -> None:
    class Tested(tp.Net):  # type: ignore[name-defined,misc]
        def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
            self.log("test_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0])

    recorder = Recorder()
    trainer = make_trainer(plugins=[recorder], logger=False)
    recorder.calls.clear()
    results = trainer.test(Tested(), [tp.loader(n=16, shuffle=False), tp.loader(n=8, shuffle=False)], verbose=False)
    assert [sorted(r) for r in results] == [["test_loss/dataloader_idx_0"], ["test_loss/dataloader_idx_1"]]
    assert recorder.calls == expected_eval("test", [2, 1], metrics=2)
    recorder.calls.clear()
    trainer.predict(Tested(), tp.loader(n=24, shuffle=False))
    assert recorder.calls == expected_eval("predict", [3])
    fired = {call.split(":")[0] for call in recorder.calls} | set(expected_eval("test", [1]))
    assert fired >= TEST_AND_PREDICT_HOOKS


def test_hook_order_without_clipping_validation_or_checkpoints(tp: Any, make_trainer: Any) -> None:
    recorder = Recorder()
    trainer = make_trainer(plugins=[recorder], max_epochs=1, accumulate_grad_batches=3, logger=False,
                           enable_checkpointing=False)
    recorder.calls.clear()
    trainer.fit(tp.fresh_net(), tp.loader(n=56))
    assert recorder.calls == expected_fit(epochs=1, n_batches=7, accumulate=3, clip=False, n_val=0,
                                          val_metrics=0, checkpoint=False)


def test_hook_order_on_resume_and_failure(tp: Any, make_trainer: Any) -> None:
    first = make_trainer(max_epochs=1, logger=False)
    first.fit(tp.fresh_net(), tp.loader(n=16))
    recorder = Recorder()
    trainer = make_trainer(plugins=[recorder], max_epochs=2, logger=False)
    recorder.calls.clear()
    with pytest.warns(torchplug.PlanChangedWarning, match="plugin 'Recorder'"):  # the first run had no Recorder
        trainer.fit(tp.fresh_net(), tp.loader(n=16), ckpt_path=first.checkpoint_path)
    assert recorder.calls == expected_fit(epochs=2, n_batches=2, accumulate=1, clip=False, n_val=0, val_metrics=0,
                                          checkpoint=True, resume=True, first_epoch=1)

    class Boom(torchplug.TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(tp.IN, tp.OUT)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise RuntimeError("boom in training_step")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    recorder.calls.clear()
    with pytest.raises(RuntimeError, match="boom in training_step"):
        trainer.fit(Boom(), tp.loader(n=16))
    setup = expected_fit(0, 0, 1, False, 0, 0, False)[:-4]  # launch ... on_train_start
    assert recorder.calls == [*setup, "on_epoch_start", "on_train_epoch_start:0", "on_train_batch_start",
                              "on_before_forward:0", "forward_context", "on_exception", "teardown",
                              "teardown_environment"]


def test_lr_scheduler_is_not_stepped_after_a_skipped_step(tp: Any, make_trainer: Any) -> None:
    """A precision plugin reports a skipped step by returning False from optimizer_step."""

    class SkipSteps(torchplug.Plugin):
        def __init__(self, skip: set[int]) -> None:
            self.skip, self.calls = skip, 0

        def optimizer_step(self, optimizers: list[torch.optim.Optimizer]) -> bool | None:
            self.calls += 1
            return False if self.calls in self.skip else None  # None: the default steps

    class WithStepLR(tp.Net):  # type: ignore[misc, name-defined]
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    model = WithStepLR()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(plugins=[SkipSteps({1, 4})], max_steps=6, logger=False, enable_checkpointing=False)
    trainer.fit(model, tp.loader())
    assert trainer.global_step == 6
    assert trainer.callback_metrics["skipped_steps"] == 2.0
    sched = trainer.lr_schedulers[0]
    assert sched.last_epoch == 4  # stepped after the 4 real steps only
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5**4
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nonfinite_loss_skip_option(tp: Any, make_trainer: Any) -> None:
    class NaNAt(tp.Net):  # type: ignore[misc, name-defined]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx in (2, 5) else loss

    torch.manual_seed(0)
    model = NaNAt(dropout=0.0)
    trainer = make_trainer(max_epochs=1, on_nonfinite_loss="skip", logger=False, enable_checkpointing=False)
    trainer.fit(model, tp.loader())
    assert trainer.global_step == 7  # every batch is a window; two took no step
    assert trainer.callback_metrics["skipped_steps"] == 2.0
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # With accumulation the window's other micro-batches still step.
    model = NaNAt(dropout=0.0)
    trainer = make_trainer(max_epochs=1, accumulate_grad_batches=2, on_nonfinite_loss="skip", logger=False,
                           enable_checkpointing=False)
    trainer.fit(model, tp.loader())
    assert trainer.global_step == 4
    assert "skipped_steps" not in trainer.callback_metrics
    assert all(torch.isfinite(p).all() for p in model.parameters())
