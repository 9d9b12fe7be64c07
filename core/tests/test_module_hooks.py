"""The user's module hooks: called where Lightning calls them, after the plugins' (callbacks
first, then the module), with Lightning 1.1's signatures; everything torchplug would not call is
refused before any work, naming it.

The expected order is written out here from the documented order (loop.py's docstring),
independently of the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import torchplug
from torchplug import MisconfigurationError
from torchplug.modulehooks import MODULE_HOOKS, UNSUPPORTED


class HookedNet(torchplug.TrainingModule):
    """Every supported module hook, with Lightning 1.1's signatures, appending to ``calls``."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls
        self.lin = torch.nn.Linear(8, 4)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return {"loss": torch.nn.functional.cross_entropy(self.lin(x), y), "n": len(y)}

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.lin(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup:{stage}")

    def teardown(self, stage: str) -> None:
        self.calls.append(f"teardown:{stage}")

    def on_fit_start(self) -> None:
        self.calls.append("on_fit_start")

    def on_fit_end(self) -> None:
        self.calls.append("on_fit_end")

    def on_train_start(self) -> None:
        self.calls.append("on_train_start")

    def on_train_end(self) -> None:
        self.calls.append("on_train_end")

    def on_epoch_start(self) -> None:
        self.calls.append("on_epoch_start")

    def on_epoch_end(self) -> None:
        self.calls.append("on_epoch_end")

    def on_train_epoch_start(self) -> None:
        self.calls.append("on_train_epoch_start")

    def on_train_epoch_end(self) -> None:
        self.calls.append("on_train_epoch_end")

    def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        assert dataloader_idx == 0
        assert len(batch) == 2
        self.calls.append(f"on_train_batch_start:{batch_idx}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        assert outputs["n"] == 8
        assert dataloader_idx == 0
        self.calls.append(f"on_train_batch_end:{batch_idx}")

    def on_before_backward(self, loss: torch.Tensor) -> None:
        assert loss.requires_grad
        self.calls.append("on_before_backward")

    def on_after_backward(self) -> None:
        assert self.lin.weight.grad is not None
        self.calls.append("on_after_backward")

    def on_before_optimizer_step(self, optimizer: Any, optimizer_idx: int) -> None:
        assert optimizer_idx == 0
        self.calls.append("on_before_optimizer_step")

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append("on_before_zero_grad")

    def training_epoch_end(self, outputs: list[Any]) -> None:
        assert [sorted(o) for o in outputs] == [["loss", "n"]] * 2
        assert not any(o["loss"].requires_grad for o in outputs)
        self.calls.append(f"training_epoch_end:{len(outputs)}")

    def on_validation_start(self) -> None:
        self.calls.append("on_validation_start")

    def on_validation_epoch_start(self) -> None:
        self.calls.append("on_validation_epoch_start")

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self.calls.append(f"on_validation_batch_start:{batch_idx}")

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        assert outputs.ndim == 0
        self.calls.append(f"on_validation_batch_end:{batch_idx}")

    def validation_epoch_end(self, outputs: list[Any]) -> None:
        self.calls.append(f"validation_epoch_end:{len(outputs)}")

    def on_validation_epoch_end(self) -> None:
        self.calls.append("on_validation_epoch_end")

    def on_validation_end(self) -> None:
        self.calls.append("on_validation_end")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mine"] = 1
        self.calls.append("on_save_checkpoint")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert checkpoint["mine"] == 1
        self.calls.append("on_load_checkpoint")


class Callback(torchplug.Plugin):
    """A plugin on a few of the same events: it must run before the module each time."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def on_train_epoch_start(self) -> None:
        self.calls.append("callback:on_train_epoch_start")

    def on_after_backward(self) -> None:
        self.calls.append("callback:on_after_backward")

    def validation_epoch_end(self) -> None:
        self.calls.append("callback:validation_epoch_end")


def expected(epochs: int, n_batches: int, n_val: int, resume: bool = False, first_epoch: int = 0) -> list[str]:
    calls = ["setup:fit", *(["on_load_checkpoint"] if resume else []), "on_fit_start", "on_train_start"]
    for _ in range(first_epoch, epochs):
        calls += ["on_epoch_start", "callback:on_train_epoch_start", "on_train_epoch_start"]
        for i in range(n_batches):
            calls += [f"on_train_batch_start:{i}", "on_before_backward", "callback:on_after_backward",
                      "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
                      f"on_train_batch_end:{i}"]
        calls += [f"training_epoch_end:{n_batches}", "on_train_epoch_end", "on_epoch_end",
                  "on_validation_start", "on_validation_epoch_start"]
        for j in range(n_val):
            calls += [f"on_validation_batch_start:{j}", f"on_validation_batch_end:{j}"]
        calls += ["callback:validation_epoch_end", f"validation_epoch_end:{n_val}", "on_validation_epoch_end",
                  "on_validation_end", "on_save_checkpoint"]
    return [*calls, "on_train_end", "on_fit_end", "teardown:fit"]


def test_every_module_hook_is_called_in_the_documented_order(tp: Any, make_trainer: Any) -> None:
    calls: list[str] = []
    model = HookedNet(calls)
    trainer = make_trainer(plugins=[Callback(calls)], max_epochs=2, logger=False)
    trainer.fit(model, tp.loader(n=16), tp.loader(n=24, batch_size=12, shuffle=False))
    assert calls == expected(epochs=2, n_batches=2, n_val=2)
    defined = {c.split(":")[0] for c in calls if not c.startswith("callback:")}
    # every supported hook (on_load_checkpoint: below; test and predict: test_test_and_predict.py)
    evaluation = {name for name in MODULE_HOOKS if name.startswith(("on_test_", "on_predict_", "test_"))}
    assert defined == set(MODULE_HOOKS) - {"on_load_checkpoint"} - evaluation
    # after fit the module is no plugin any more: a validate run calls only its validation hooks
    calls.clear()
    trainer.validate(model, tp.loader(n=12, batch_size=12, shuffle=False))
    assert calls == ["setup:validate", "on_validation_start", "on_validation_epoch_start",
                     "on_validation_batch_start:0", "on_validation_batch_end:0", "callback:validation_epoch_end",
                     "validation_epoch_end:1", "on_validation_epoch_end", "on_validation_end", "teardown:validate"]
    # resuming: the module's on_load_checkpoint gets what its on_save_checkpoint stored
    calls.clear()
    resumed = make_trainer(plugins=[Callback(calls)], max_epochs=3, logger=False)
    resumed.fit(HookedNet(calls), tp.loader(n=16), tp.loader(n=24, batch_size=12, shuffle=False),
                ckpt_path=trainer.checkpoint_path)
    assert calls == expected(epochs=3, n_batches=2, n_val=2, resume=True, first_epoch=2)


def test_module_hooks_with_lightning_2_signatures_and_varargs(tp: Any, make_trainer: Any) -> None:
    """Fewer parameters than Lightning 1.1 passed (2.x dropped dataloader_idx), or *args: each gets
    the positional arguments it takes."""
    seen: list[Any] = []

    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            seen.append(("end", batch_idx))

        def on_train_batch_start(self, *args: Any) -> None:
            seen.append(("start", len(args)))

    make_trainer(max_steps=2, logger=False, enable_checkpointing=False).fit(Net(), tp.loader(n=16))
    assert seen == [("start", 3), ("end", 0), ("start", 3), ("end", 1)]


def test_an_error_in_a_module_hook_comes_through_unchanged(tp: Any, make_trainer: Any) -> None:
    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def on_train_epoch_start(self) -> None:
            raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        make_trainer(max_epochs=1, logger=False, enable_checkpointing=False).fit(Net(), tp.loader(n=16))


REFUSED = {
    # one typo from a hook or step name
    "on_train_epoch_strat": "Did you mean 'on_train_epoch_start'",
    "on_validaton_epoch_end": "Did you mean 'on_validation_epoch_end'",
    "training_epoch_ends": "Did you mean 'training_epoch_end'",
    "validation_stpe": "Did you mean 'validation_step'",
    "setpu": "Did you mean 'setup'",
    "on_something_else": "torchplug has no module hook 'on_something_else'",
    # Lightning hooks torchplug does not call
    **dict.fromkeys((
        "on_pretrain_routine_start", "tbptt_split_batch", "on_hpc_save", "on_train_dataloader", "backward",
        "transfer_batch_to_device", "training_step_end", "get_progress_bar_dict", "configure_ddp"),
        "a Lightning hook that torchplug does not call"),
    # plugin hooks on the module
    "clip_gradients": "is a plugin hook",
    "on_before_forward": "is a plugin hook",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_method_torchplug_would_not_call_is_refused_before_any_work(
        name: str, tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    def method(self: Any, *args: Any) -> None:
        raise AssertionError("never called")

    Net = type("Net", (tp.Net,), {name: method})
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(MisconfigurationError, match=REFUSED[name]) as info:
        trainer.fit(Net(), tp.loader(n=16))
    assert f"Net.{name}(" in str(info.value)
    assert tp.files_under(tmp_path) == []  # before any work
    if name in UNSUPPORTED:
        assert UNSUPPORTED[name].split(":")[0] in str(info.value)


def test_lightning_1_1_on_train_epoch_end_with_outputs_is_refused_with_the_fix(tp: Any, make_trainer: Any) -> None:
    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def on_train_epoch_end(self, outputs: Any) -> None: ...

    with pytest.raises(MisconfigurationError, match=r"training_epoch_end\(self, outputs\)"):
        make_trainer(max_epochs=1).fit(Net(), tp.loader(n=16))


def test_helpers_and_nn_module_overrides_are_not_refused(tp: Any, make_trainer: Any) -> None:
    class Net(tp.Net):  # type: ignore[misc, name-defined]
        def _on_helper(self) -> None: ...

        def compute_features(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def extra_repr(self) -> str:
            return "mine"

    trainer = make_trainer(max_steps=1, logger=False, enable_checkpointing=False)
    trainer.fit(Net(), tp.loader(n=16))
    assert trainer.global_step == 1
