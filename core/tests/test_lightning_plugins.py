"""Plugin code written for Lightning 1.1 (issue 14, item 8): each case works as it did there or
is refused at registration naming the plugin and the fix. The 2-rank all-reduce count of a
``block_backward_sync`` that yields ``model.no_sync()`` is in plugins/ddp_plugin/tests
(``Lightning11DDP``: one all-reduce per window of 4, as with a plain ``no_sync()``)."""

from __future__ import annotations

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


def test_available_plugins_lists_the_installed_plugin_names_without_importing_them() -> None:
    names = Trainer.available_plugins()
    assert names == sorted({ep.name for ep in discovery.installed_plugins()})
    assert {"ddp", "native_amp", "apex", "tensorboard"} <= set(names)
