"""Plugin code written for Lightning 1.1 (issue 14, item 8): each case works as it did there or
is refused at registration naming the plugin and the fix. The 2-rank all-reduce count of a
``block_backward_sync`` that yields ``model.no_sync()`` is in plugins/ddp_plugin/tests
(``Lightning11DDP``: one all-reduce per window of 4, as with a plain ``no_sync()``)."""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
from torch import nn

from torchplug import (
    LightningSpellingWarning,
    Plugin,
    PluginConflictError,
    PluginValidationError,
    Trainer,
    discovery,
)


class Lightning11Forward(Plugin):
    plugin_name = "l11_forward"

    def on_before_forward(self, model: nn.Module, *args: Any) -> Any:  # Lightning 1.1's signature
        return args


class KwargsHook(Plugin):
    def on_train_batch_end(self, **kwargs: Any) -> None:
        pass


def test_hooks_with_varargs_are_refused_at_registration_with_torchplugs_signature(make_trainer: Any) -> None:
    with pytest.raises(PluginValidationError) as info:
        make_trainer(plugins=[Lightning11Forward()])
    message = str(info.value)
    for fragment in ("'Lightning11Forward'", "on_before_forward(model: ", "with *args:", "passed by name",
                     "on_before_forward(model, args)", "(batch, batch_idx)"):
        assert fragment in message, fragment
    with pytest.raises(PluginValidationError, match=r"KwargsHook.*\*\*kwargs.*on_train_batch_end\(trainer, outputs"):
        make_trainer(callbacks=[KwargsHook()])


class Recording(AbstractContextManager[None]):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __enter__(self) -> None:
        self.log.append("enter")

    def __exit__(self, *exc: object) -> None:
        self.log.append("exit")


class YieldsAContext(Plugin):
    """Lightning 1.1's DDPPlugin.block_backward_sync: a generator context that yields the real one."""

    def __init__(self) -> None:
        self.log: list[str] = []

    @contextmanager
    def _block(self) -> Iterator[Any]:
        yield Recording(self.log)

    def block_backward_sync(self) -> AbstractContextManager[Any]:
        return self._block()

    def on_before_backward(self) -> None:
        self.log.append("backward")


def test_a_block_backward_sync_that_yields_a_context_manager_has_it_entered(tp: Any, make_trainer: Any) -> None:
    plugin = YieldsAContext()
    trainer = make_trainer(max_steps=2, accumulate_grad_batches=3, plugins=[plugin], logger=False,
                           enable_checkpointing=False)
    trainer.fit(tp.fresh_net(), tp.loader())
    # Windows of 3: the first two micro-batches run (forward and backward) inside the yielded context.
    assert plugin.log == ["enter", "backward", "exit", "enter", "backward", "exit", "backward"] * 2


class NeedsNativeAmp(Plugin):
    plugin_name = "needs_amp"

    def __init__(self, wanted: list[Any]) -> None:
        self.wanted = wanted
        self.seen: list[str] = []

    def required_plugins(self, amp_backend: str, trainer: Trainer) -> list[Any]:
        self.seen.append(amp_backend)
        return self.wanted


def test_required_plugins_are_honoured_or_refused_naming_both(make_trainer: Any) -> None:
    from torchplug_native_amp import NativeAMPPlugin

    plugin = NeedsNativeAmp(["native_amp", NativeAMPPlugin])
    make_trainer(precision="bf16", plugins=[plugin])  # both requirements met by the selected plugin
    assert plugin.seen == ["native"]
    for wanted, shown in ((["native_amp"], "'native_amp'"), ([NativeAMPPlugin], "'NativeAMPPlugin'"),
                          ([NativeAMPPlugin()], "'NativeAMPPlugin'")):
        with pytest.raises(PluginConflictError) as info:
            make_trainer(plugins=[NeedsNativeAmp(wanted)])
        message = str(info.value)
        for fragment in ("'NeedsNativeAmp'", f"requires {shown}", "Trainer(plugins=[...,", "adds no plugin"):
            assert fragment in message, (fragment, message)


def test_native_amp_and_apex_constructors_accept_lightnings_trainer_argument_with_a_warning(
        make_trainer: Any) -> None:
    from torchplug_apex import ApexPlugin
    from torchplug_native_amp import NativeAMPPlugin

    trainer = make_trainer()
    for make, distribution in ((lambda: NativeAMPPlugin(trainer=trainer), "torchplug-native-amp"),
                               (lambda: NativeAMPPlugin(trainer), "torchplug-native-amp"),  # positional, as in 1.1
                               (lambda: ApexPlugin(trainer=trainer), "torchplug-apex")):
        with pytest.warns(LightningSpellingWarning, match=rf"\({distribution}\) takes no trainer.*\(\) \(its"):
            plugin = make()
        assert getattr(plugin, "requested_precision", None) is None
        assert getattr(plugin, "requested_level", None) is None
    fit_with = make_trainer(precision="bf16", plugins=[NativeAMPPlugin(trainer=None)])
    assert fit_with.plugin_names == ["native_amp"]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_available_plugins_lists_the_installed_plugin_names_without_importing_them() -> None:
    names = Trainer.available_plugins()
    assert names == sorted({ep.name for ep in discovery.installed_plugins()})
    first_party = {"ddp": "torchplug-ddp", "native_amp": "torchplug-native-amp", "apex": "torchplug-apex",
                   "tensorboard": "torchplug-tensorboard"}
    installed = {name for name, dist in first_party.items() if _installed(dist)}
    assert installed, "no first-party plugin installed: nothing to list"
    assert installed <= set(names)  # each session installs some of them (tests-core: ddp, native_amp, apex)


# -- on_train_batch_start returning -1 (Lightning 1.x: skip the rest of the epoch) ----------------
class EpochEvents(Plugin):
    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.log: list[str] = []

    def on_train_batch_start(self, trainer: Any, batch_idx: int) -> int | None:
        self.log.append(f"batch {trainer.current_epoch}:{batch_idx}")
        return -1 if trainer.current_epoch == 0 and batch_idx == self.stop_at else None

    def on_train_epoch_end(self, epoch: int) -> None:
        self.log.append(f"epoch end {epoch}")

    def on_validation_end(self) -> None:
        self.log.append("validation")


def hand_loop_skipping(tp: Any, model: nn.Module, epochs: int, accumulate: int, skip_at: int) -> None:
    """Epoch 0 stops at batch ``skip_at`` (not trained); the open window's gradients are dropped."""
    import torch

    opt = tp.make_optimizers(model, model.lr, None)
    model.train()
    for epoch in range(epochs):
        train = tp.loader()
        n = len(train)
        for i, (x, y) in enumerate(train):
            if epoch == 0 and i == skip_at:
                break
            start = i - i % accumulate
            window = min(accumulate, n - start)
            (torch.nn.functional.cross_entropy(model(x), y) / window).backward()
            if i + 1 == start + window:
                opt.step()
                opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            for x, _ in tp.loader(n=24, shuffle=False, seed=1):
                model(x)
        model.train()


@pytest.mark.parametrize("where", ["module", "plugin"])
def test_on_train_batch_start_returning_minus_one_skips_the_rest_of_the_epoch(tp: Any, make_trainer: Any,
                                                                             where: str) -> None:
    import torch

    class SkipsInEpoch0(tp.Net):  # type: ignore[misc, name-defined]
        def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int) -> int | None:
            return -1 if self.current_epoch == 0 and batch_idx == 3 else None

    events = EpochEvents(stop_at=3 if where == "plugin" else None)
    model = tp.fresh_net()
    if where == "module":
        skipping = SkipsInEpoch0()
        skipping.load_state_dict(model.state_dict())
        model = skipping
    torch.manual_seed(1234)  # after the models are built: both sides draw the same dropout masks and shuffles
    trainer = make_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[events], logger=False,
                           enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the loader ended early" warning: the skip was asked for
        trainer.fit(model, tp.loader(), tp.loader(n=24, shuffle=False, seed=1))
    # Epoch 0: batches 0-1 (one step), batch 2 backward then dropped with its window, 3-6 skipped;
    # epoch 1 in full: windows 2, 2, 2, 1.
    assert trainer.global_step == 1 + 4
    assert trainer.current_epoch == 2
    assert events.log == ["batch 0:0", "batch 0:1", "batch 0:2", "batch 0:3", "epoch end 0", "validation",
                          *[f"batch 1:{i}" for i in range(7)], "epoch end 1", "validation"]
    torch.manual_seed(1234)
    reference = tp.fresh_net()
    hand_loop_skipping(tp, reference, epochs=2, accumulate=2, skip_at=3)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
