"""The plugin manager: registration and validation, calling conventions, roles, selection,
blocking, load order and errors. Real managers and inline plugins; entry points come from
fake ``*.dist-info`` trees put on ``sys.path`` (test_discovery.py installs real wheels)."""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import packaging.requirements  # noqa: F401  # imported lazily by discovery; pre-import for only_site
import pluggy
import pytest
import torch
from plugin_projects.support import make_fake_dist
from torch import nn

import torchplug
from torchplug import Plugin, Trainer, TrainingModule, TrainingStepModule, hookimpl
from torchplug.errors import (
    PluginBlockedError,
    PluginConflictError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginNotFoundError,
    PluginValidationError,
)
from torchplug.hookcalls import Hooks
from torchplug.manager import DEFAULTS_NAME, PluginManager, get_plugin_manager


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path that fake distributions are "installed" into."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(site)):
            del sys.modules[name]


@pytest.fixture
def only_site(site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Like ``site``, and the only place with distributions: the dev environment's plugins are
    out of sight (for exact "installed plugins" lists)."""
    # the standard library stays; the dev environment (site-packages, editable src/ folders) goes
    monkeypatch.setattr(sys, "path", [str(site)] + [p for p in sys.path if p.startswith(sys.base_prefix)])
    return site


def names(pm: PluginManager) -> list[str]:
    return [rec.name for rec in pm.records]


PRECISION_SRC = """
from torchplug import Plugin

class Precision(Plugin):
    role = "precision"
"""


# --------------------------------------------------------------------------------------------
# Building a manager
# --------------------------------------------------------------------------------------------


def test_fresh_manager_each_call_with_defaults_trylast() -> None:
    first, second = get_plugin_manager(autoload=False, env={}), get_plugin_manager(autoload=False, env={})
    assert first is not second
    assert names(first) == [DEFAULTS_NAME]

    class Answer:
        @hookimpl
        def world_size(self) -> int:
            return 4

    first.register(Answer())
    assert first.hook.world_size() == 4
    assert second.hook.world_size() == 1  # nothing leaked into the other manager
    for caller in first.get_hookcallers(first.get_plugin(DEFAULTS_NAME)) or []:
        assert all(impl.trylast for impl in caller.get_hookimpls() if impl.plugin_name == DEFAULTS_NAME)


def test_plugins_as_objects_and_modules(tmp_path: Path, site: Path) -> None:
    (site / "module_plugin.py").write_text(
        "from torchplug import hookimpl\n\n@hookimpl\ndef global_rank():\n    return 7\n")
    import module_plugin  # type: ignore[import-not-found]

    class Obj(Plugin):
        plugin_name = "custom-name"

        def world_size(self) -> int:
            return 3

    pm = get_plugin_manager([module_plugin, Obj()], autoload=False, env={})
    assert names(pm) == [DEFAULTS_NAME, "module_plugin", "custom-name"]
    assert [rec.source for rec in pm.records] == ["builtin", "module", "object"]
    assert (pm.hook.world_size(), pm.hook.global_rank()) == (3, 7)


def test_a_class_instead_of_an_instance_is_rejected() -> None:
    class Thing(Plugin):
        pass

    with pytest.raises(PluginValidationError, match=r"pass an instance: plugins=\[Thing\(\)\]"):
        get_plugin_manager([Thing], autoload=False, env={})


# --------------------------------------------------------------------------------------------
# Plugin subclasses (Lightning 1.1 style) and decorator options
# --------------------------------------------------------------------------------------------


class DummyDDPPlugin(Plugin):
    """Stands in for torchplug_ddp.DDPPlugin: a strategy plugin (no processes here)."""

    role = "strategy"

    def configure_ddp(self, model: nn.Module, device_ids: list[int] | None) -> nn.Module:
        raise AssertionError("MyDDP overrides configure_ddp")

    def get_model_from_plugin(self, model: nn.Module) -> nn.Module:
        return model.module.module  # type: ignore[union-attr,return-value]


class MyDDPWrapper(nn.Module):
    calls = 0

    def __init__(self, module: nn.Module, device_ids: list[int] | None) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        type(self).calls += 1
        return self.module(*args)


class MyDDP(DummyDDPPlugin):  # DESIGN.md's example, verbatim apart from the base
    def configure_ddp(self, model, device_ids):  # type: ignore[no-untyped-def]  # untyped, as users write it
        return MyDDPWrapper(TrainingStepModule(model), device_ids)


class Tiny(TrainingModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(n)]


def test_design_mydddp_example_runs_alone(tmp_path: Path) -> None:
    MyDDPWrapper.calls = 0
    trainer = Trainer(accelerator="ddp", plugins=[MyDDP()], max_steps=3, enable_progress_bar=False,
                      logger=False, enable_checkpointing=False, default_root_dir=tmp_path, autoload_plugins=False)
    # the strategy role is filled by MyDDP, so accelerator="ddp" loads no "ddp" entry point
    assert trainer.plugin_names == ["MyDDP"]
    assert trainer.pm.hook.configure_ddp.get_hookimpls()[-1].plugin_name == "MyDDP"
    model = Tiny()
    trainer.fit(model, tiny_data())
    assert MyDDPWrapper.calls == 3
    assert trainer.global_step == 3


def test_undecorated_methods_only_for_plugin_subclasses() -> None:
    class NotAPlugin:
        def world_size(self) -> int:  # no decorator, not a Plugin: not a hook implementation
            return 9

    class APlugin(Plugin):
        def world_size(self) -> int:
            return 5

        @staticmethod
        def global_rank() -> int:
            return 2

        def helper(self) -> None:  # not a hook name: ignored
            pass

    pm = PluginManager()
    pm.register(NotAPlugin())
    assert pm.hook.world_size() is None
    plugin = APlugin()
    pm.register(plugin)
    assert (pm.hook.world_size(), pm.hook.global_rank()) == (5, 2)
    assert sorted(caller.name for caller in pm.get_hookcallers(plugin) or []) == ["global_rank", "world_size"]


def test_decorator_options_apply_to_plugin_methods_and_functions() -> None:
    calls: list[str] = []

    class First(Plugin):
        @hookimpl(tryfirst=True)
        def world_size(self) -> int:
            calls.append("first")
            return 1

    class Plain(Plugin):
        def world_size(self) -> int:
            calls.append("plain")
            return 2

    class Last(Plugin):
        @hookimpl(trylast=True)
        def world_size(self) -> int | None:
            calls.append("last")
            return None

    class Wrap(Plugin):
        @hookimpl(wrapper=True)
        def world_size(self) -> Generator[None, int, int]:
            calls.append("wrap-before")
            result = yield
            calls.append("wrap-after")
            return result * 10

    pm = PluginManager()
    for plugin in (First(), Last(), Plain(), Wrap()):  # registration order does not override options
        pm.register(plugin, name=type(plugin).__name__)
    assert pm.hook.world_size() == 10
    assert calls == ["wrap-before", "first", "wrap-after"]
    calls.clear()
    assert Hooks(pm).world_size() == 10  # the façade gives pluggy's result
    assert calls == ["wrap-before", "first", "wrap-after"]
    pm.unregister(name="First")
    calls.clear()
    assert pm.hook.world_size() == 20
    assert calls == ["wrap-before", "plain", "wrap-after"]


def test_unknown_hook_rejected_naming_plugin_hook_and_signature() -> None:
    class Typo:
        @hookimpl
        def clip_gradient(self, grad_clip_val: float, optimizer: Any) -> None:
            pass

    pm = PluginManager()
    with pytest.raises(PluginValidationError) as info:
        pm.register(Typo())
    message = str(info.value)
    assert "'test_unknown_hook_rejected_naming_plugin_hook_and_signature.<locals>.Typo'" in message
    assert "unknown hook 'clip_gradient'" in message
    assert "clip_gradient(grad_clip_val: 'float', optimizer: 'Any') -> 'None'" in message
    assert "Did you mean 'clip_gradients'?" in message
    assert pm.get_plugins() == set()  # nothing half-registered


def test_unknown_specname_rejected() -> None:
    class Renamed:
        @hookimpl(specname="no_such_hook")
        def anything(self) -> None:
            pass

    with pytest.raises(PluginValidationError, match="unknown hook 'no_such_hook'"):
        PluginManager().register(Renamed())


@pytest.mark.parametrize("decorated", [True, False])
def test_wrong_argument_rejected_naming_hook_and_its_arguments(decorated: bool) -> None:
    def clip_gradients(self: Any, max_norm: float, optimizer: Any) -> None:
        return None

    body: dict[str, Any] = {"clip_gradients": hookimpl(clip_gradients) if decorated else clip_gradients}
    bad = type("BadArgs", (Plugin,), body)()
    pm = PluginManager()
    before = pm.hook.clip_gradients.get_hookimpls()
    with pytest.raises(PluginValidationError) as info:
        pm.register(bad)
    message = str(info.value)
    assert "'BadArgs'" in message
    assert "hook 'clip_gradients'" in message
    assert "'max_norm'" in message
    assert "clip_gradients(max_norm: 'float', optimizer: 'Any') -> 'None'" in message
    assert "clip_gradients(grad_clip_val, optimizer, norm_type)" in message
    assert pm.hook.clip_gradients.get_hookimpls() == before
    assert not pm.is_registered(bad)


def test_subset_and_defaulted_extra_arguments_are_accepted() -> None:
    class Subset(Plugin):
        def clip_gradients(self, optimizer: Any, extra: int = 3) -> torch.Tensor:
            return torch.tensor(float(extra))

    pm = PluginManager()
    pm.register(Subset())
    assert pm.hook.clip_gradients(grad_clip_val=1.0, optimizer=None, norm_type=2.0).item() == 3.0


@pytest.mark.parametrize("method", ["clip_gradient", "on_before_foward", "configure_dpp", "worldsize",
                                    "on_train_batch_begin", "on_test_epoch_ends", "backwards"])
def test_near_miss_method_names_on_plugin_subclasses_are_rejected(method: str) -> None:
    def body(self: Any) -> None:
        return None

    plugin = type("Near", (Plugin,), {method: body})()
    with pytest.raises(PluginValidationError) as info:
        PluginManager().register(plugin)
    assert f"unknown hook {method!r}" in str(info.value)
    assert f"rename it '_{method}'" in str(info.value)


def test_helpers_far_from_hook_names_are_fine() -> None:
    class Helpers(Plugin):
        def _on_before_foward(self) -> None:  # private: never a hook
            pass

        def build_wrapper(self) -> None:
            pass

        def scaler_state(self) -> None:
            pass

    PluginManager().register(Helpers())


def test_attribute_named_like_a_hook_must_be_a_method() -> None:
    class Prop(Plugin):
        @property
        def world_size(self) -> int:
            raise AssertionError("registration must not evaluate properties")

    with pytest.raises(PluginValidationError, match=r"defines 'world_size' as a property.*a hook"):
        PluginManager().register(Prop())


def test_chained_hook_cannot_be_a_wrapper() -> None:
    class Wraps:
        @hookimpl(wrapper=True)
        def on_before_forward(self, args: tuple[Any, ...]) -> Generator[None, Any, Any]:
            return (yield)

    with pytest.raises(PluginValidationError, match="'on_before_forward' is chained"):
        PluginManager().register(Wraps())


def test_pluggy_validation_errors_are_ours_too() -> None:
    class NotAGenerator:
        @hookimpl(wrapper=True)
        def world_size(self) -> int:
            return 1

    with pytest.raises(PluginValidationError, match=r"(?s)Invalid hook implementation.*world_size.*generator"):
        PluginManager().register(NotAGenerator())


# --------------------------------------------------------------------------------------------
# Calling conventions (through the Hooks façade the loop uses, and through pluggy)
# --------------------------------------------------------------------------------------------


def test_firstresult_first_non_none_wins_and_defaults_answer_last() -> None:
    class Defers(Plugin):
        def clip_gradients(self) -> None:
            return None

    class Answers(Plugin):
        def clip_gradients(self, grad_clip_val: float) -> torch.Tensor:
            return torch.tensor(grad_clip_val * 100)

    param = nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 4.0)
    optimizer = torch.optim.SGD([param], lr=0.1)
    kwargs = {"grad_clip_val": 1.0, "optimizer": optimizer, "norm_type": 2.0}

    pm = get_plugin_manager([Defers()], autoload=False, env={})
    norm = Hooks(pm).clip_gradients(**kwargs)  # Defers returns None: the default clips
    assert norm.item() == pytest.approx(torch.tensor(48.0).sqrt().item())
    assert param.grad.norm().item() == pytest.approx(1.0, rel=1e-4)

    pm = get_plugin_manager([Answers(), Defers()], autoload=False, env={})  # Defers runs first
    assert Hooks(pm).clip_gradients(**kwargs).item() == 100.0
    assert pm.hook.clip_gradients(**kwargs).item() == 100.0


def test_on_before_forward_is_chained() -> None:
    seen: list[tuple[str, Any]] = []

    class AddOne(Plugin):
        def on_before_forward(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
            seen.append(("add", args))
            batch, idx = args
            return (batch + 1, idx)

    class Unchanged(Plugin):
        def on_before_forward(self, model: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append(("none", args))

    class Double:
        @hookimpl(tryfirst=True)
        def on_before_forward(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
            seen.append(("double", args))
            batch, idx = args
            return (batch * 2, idx)

    model = nn.Linear(1, 1)
    pm = get_plugin_manager([AddOne(), Unchanged(), Double()], autoload=False, env={})
    args = Hooks(pm).on_before_forward(model=model, args=(torch.tensor(3.0), 0))
    # tryfirst Double, then last registered first (Unchanged, AddOne), then the default (device move)
    assert [step for step, _ in seen] == ["double", "none", "add"]
    assert seen[1][1][0].item() == 6.0  # Unchanged got Double's result
    assert seen[2][1][0].item() == 6.0  # None kept it unchanged for AddOne
    assert args[0].item() == 7.0
    assert args[1] == 0


def test_on_before_forward_must_return_a_tuple() -> None:
    class ReturnsBatch(Plugin):
        plugin_name = "returns-batch"

        def on_before_forward(self, args: tuple[Any, ...]) -> Any:
            return args[0]  # a common mistake: the batch instead of the args

    pm = get_plugin_manager([ReturnsBatch()], autoload=False, env={})
    with pytest.raises(TypeError, match=r"Plugin 'returns-batch': on_before_forward must return .* tuple"):
        Hooks(pm).on_before_forward(model=nn.Linear(1, 1), args=(torch.zeros(1), 0))


def _impl(hook: str, tag: str, result: Any, **opts: Any) -> object:
    import inspect

    from torchplug import hookspecs

    argnames = list(inspect.signature(getattr(hookspecs, hook)).parameters)

    def function(*args: Any) -> Any:
        return result

    function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in argnames])
    return type(f"P_{tag}", (), {hook: staticmethod(hookimpl(**opts)(function))})()


def _wrapper(hook: str) -> object:
    def function() -> Generator[None, Any, Any]:
        result = yield
        return ("wrapped", result)

    return type("W", (), {hook: staticmethod(hookimpl(wrapper=True)(function))})()


@pytest.mark.parametrize("case", ["none", "one_value", "one_none", "two", "two_first_none", "wrapper"])
def test_hooks_facade_gives_pluggy_results_for_every_hook(case: str) -> None:
    from torchplug import hookspecs

    for hook in hookspecs.HOOK_NAMES:
        if hook == "on_before_forward":
            continue  # chained: its own test above
        pm = PluginManager()
        plugins: list[object] = {
            "none": [],
            "one_value": [_impl(hook, "a", f"a-{hook}")],
            "one_none": [_impl(hook, "a", None)],
            "two": [_impl(hook, "a", "a"), _impl(hook, "b", "b")],
            "two_first_none": [_impl(hook, "a", "a"), _impl(hook, "b", None)],
            "wrapper": [_impl(hook, "a", "a"), _wrapper(hook)],
        }[case]
        for i, plugin in enumerate(plugins):
            pm.register(plugin, name=f"p{i}")
        kwargs = {name: object() for name in pm.hook.__dict__[hook].spec.argnames}
        assert Hooks(pm, trace=False).__dict__[hook](**kwargs) == pm.hook.__dict__[hook](**kwargs), (hook, case)
        assert Hooks(pm, trace=True).__dict__[hook](**kwargs) == pm.hook.__dict__[hook](**kwargs), (hook, case)


def test_fast_path_skips_pluggy_for_single_implementations() -> None:
    pm = get_plugin_manager(autoload=False, env={})
    hooks = Hooks(pm, trace=False)
    assert not isinstance(hooks.world_size, pluggy.HookCaller)  # one default: a direct call
    assert hooks.world_size() == 1
    assert hooks.on_fit_start(trainer=None, model=None) == []  # no implementation: pluggy's []


# --------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------


def test_two_precision_objects_conflict_naming_both() -> None:
    class PrecisionA(Plugin):
        role = "precision"

    class PrecisionB(Plugin):
        role = "precision"

    with pytest.raises(PluginConflictError) as info:
        get_plugin_manager([PrecisionA(), PrecisionB()], autoload=False, env={})
    message = str(info.value)
    assert "Two precision plugins are selected: 'PrecisionA'" in message
    assert "'PrecisionB'" in message
    assert "module test_manager" in message
    assert "Choose one" in message


def test_role_conflict_names_distributions(site: Path) -> None:
    make_fake_dist(site, "prec-one", "1.2", {"torchplug.plugins": {"prec_one": "prec_one_mod:Precision"}},
                   modules={"prec_one_mod": PRECISION_SRC})
    make_fake_dist(site, "prec-two", "3.4", {"torchplug.plugins": {"prec_two": "prec_two_mod:Precision"}},
                   modules={"prec_two_mod": PRECISION_SRC})
    with pytest.raises(PluginConflictError, match=r"'prec_one' \(entry point prec_one_mod:Precision, distribution "
                                                  r"prec-one 1\.2\) and 'prec_two' .*prec-two 3\.4"):
        get_plugin_manager(["prec_one", "prec_two"], autoload=False, env={})


def test_a_passed_object_fills_its_role_before_the_shorthand(site: Path) -> None:
    make_fake_dist(site, "shorthand-amp", "1.0", {"torchplug.plugins": {"short_amp": "short_amp_mod:Precision"}},
                   modules={"short_amp_mod": PRECISION_SRC})

    class Mine(Plugin):
        role = "precision"

    pm = get_plugin_manager([Mine()], role_defaults={"precision": "short_amp"}, autoload=False, env={})
    assert names(pm) == [DEFAULTS_NAME, "Mine"]
    assert "short_amp_mod" not in sys.modules
    pm = get_plugin_manager([], role_defaults={"precision": "short_amp"}, autoload=False, env={})
    assert names(pm) == [DEFAULTS_NAME, "short_amp"]
    assert pm.role_holders("precision")[0].entry_point is not None


# --------------------------------------------------------------------------------------------
# Selection, blocking, load order
# --------------------------------------------------------------------------------------------


def _recorder_src(tag: str) -> str:
    return f"""
from torchplug import hookimpl
CALLS = __import__("builtins").__dict__.setdefault("_tp_test_calls", [])

@hookimpl
def on_fit_start():
    CALLS.append({tag!r})
"""


@pytest.fixture
def ordered_site(site: Path) -> Iterator[Path]:
    import builtins

    make_fake_dist(site, "auto-b", "1.0", {"torchplug.autoload": {"auto_b": "auto_b_mod"}},
                   modules={"auto_b_mod": _recorder_src("auto_b")})
    make_fake_dist(site, "auto-a", "1.0", {"torchplug.autoload": {"auto_a": "auto_a_mod"}},
                   modules={"auto_a_mod": _recorder_src("auto_a")})
    for name in ("env_x", "env_y", "arg_z", "role_r"):
        make_fake_dist(site, name.replace("_", "-"), "1.0", {"torchplug.plugins": {name: f"{name}_mod"}},
                       modules={f"{name}_mod": _recorder_src(name)})
    builtins.__dict__["_tp_test_calls"] = []
    yield site
    del builtins.__dict__["_tp_test_calls"]


def test_load_order_is_deterministic_and_documented(ordered_site: Path) -> None:
    import builtins

    class Obj:
        @hookimpl
        def on_fit_start(self) -> None:
            builtins.__dict__["_tp_test_calls"].append("object")

    env = {"TORCHPLUG_PLUGINS": "env_y,env_x"}
    pm = get_plugin_manager(["arg_z", Obj()], role_defaults={"strategy": "role_r"}, env=env)
    # defaults, autoload sorted by name, role defaults, TORCHPLUG_PLUGINS in order, plugins= in order
    assert names(pm) == [DEFAULTS_NAME, "auto_a", "auto_b", "role_r", "env_y", "env_x", "arg_z", "Obj"]
    assert [rec.source for rec in pm.records] == ["builtin", "autoload", "autoload", "entry point", "entry point",
                                                  "entry point", "entry point", "object"]
    pm.hook.on_fit_start(trainer=None, model=None)
    # pluggy calls the last registered first
    assert builtins.__dict__["_tp_test_calls"] == ["object", "arg_z", "env_x", "env_y", "role_r", "auto_b", "auto_a"]
    again = get_plugin_manager(["arg_z", Obj()], role_defaults={"strategy": "role_r"}, env=env)
    assert names(again) == names(pm)


def test_a_plugin_selected_twice_loads_once(ordered_site: Path) -> None:
    pm = get_plugin_manager(["env_x", "auto_a"], env={"TORCHPLUG_PLUGINS": "env_x"})
    assert names(pm) == [DEFAULTS_NAME, "auto_a", "auto_b", "env_x"]


def test_disable_autoload_env_acts_before_any_import(site: Path) -> None:
    make_fake_dist(site, "noisy", "1.0", {"torchplug.autoload": {"noisy": "noisy_auto_mod"}},
                   modules={"noisy_auto_mod": "raise RuntimeError('must not be imported')\n"})
    pm = get_plugin_manager(env={"TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert names(pm) == [DEFAULTS_NAME]
    assert "noisy_auto_mod" not in sys.modules
    pm = get_plugin_manager(autoload=False, env={})
    assert names(pm) == [DEFAULTS_NAME]
    with pytest.raises(PluginLoadError, match="must not be imported"):
        get_plugin_manager(env={})


def test_plugins_env_selects_in_order_and_enables_autoload_plugins_by_name(ordered_site: Path) -> None:
    pm = get_plugin_manager(env={"TORCHPLUG_PLUGINS": " env_x , auto_b", "TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert names(pm) == [DEFAULTS_NAME, "env_x", "auto_b"]
    assert "auto_a_mod" not in sys.modules


def test_blocking_by_env_and_by_trainer_argument(ordered_site: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHPLUG_BLOCK_PLUGINS", "auto_b")
    trainer = Trainer(blocked_plugins=["auto_a"], plugins=["env_x"], max_steps=1, default_root_dir=tmp_path)
    assert trainer.plugin_names == ["env_x"]
    assert "auto_a_mod" not in sys.modules
    assert "auto_b_mod" not in sys.modules
    pm = get_plugin_manager(env={"TORCHPLUG_BLOCK_PLUGINS": "auto_a"})
    assert names(pm) == [DEFAULTS_NAME, "auto_b"]
    assert "auto_a_mod" not in sys.modules
    pm = get_plugin_manager(blocked=["auto_b"], env={"TORCHPLUG_BLOCK_PLUGINS": "auto_a"})
    assert names(pm) == [DEFAULTS_NAME]
    with pytest.raises(PluginBlockedError, match=r"Plugin 'env_x' is selected by plugins= but blocked"):
        Trainer(blocked_plugins=["env_x"], plugins=["env_x"])


# --------------------------------------------------------------------------------------------
# Errors that help
# --------------------------------------------------------------------------------------------


def test_unknown_name_lists_installed_plugins_and_closest(only_site: Path) -> None:
    make_fake_dist(only_site, "fancy-logger", "1.0", {"torchplug.plugins": {"fancy_logger": "fl"}})
    make_fake_dist(only_site, "fancy-scaler", "1.0", {"torchplug.autoload": {"fancy_scaler": "fs"}})
    with pytest.raises(PluginNotFoundError) as info:
        get_plugin_manager(["fancy_loger"], autoload=False, env={})
    message = str(info.value)
    assert "No plugin named 'fancy_loger' is installed (selected by plugins=" in message
    assert "Did you mean 'fancy_logger'?" in message
    assert "Installed plugins: fancy_logger, fancy_scaler." in message
    assert "pip install" not in message


@pytest.mark.parametrize(("name", "extra"), [("ddp", "ddp"), ("native_amp", "native-amp"), ("apex", "apex"),
                                             ("native-amp", "native-amp")])
def test_first_party_names_get_the_pip_line(only_site: Path, name: str, extra: str) -> None:
    with pytest.raises(PluginNotFoundError) as info:
        get_plugin_manager([name], autoload=False, env={})
    assert f'Install it with: pip install "torchplug[{extra}]"' in str(info.value)
    assert "Installed plugins: none." in str(info.value)


def test_shorthand_for_missing_plugin_fails_before_any_work(only_site: Path) -> None:
    with pytest.raises(PluginNotFoundError, match=r'precision shorthand.*pip install "torchplug\[apex\]"'):
        Trainer(precision=16, amp_backend="apex", autoload_plugins=False)


def test_import_failure_names_entry_point_distribution_version_and_keeps_traceback(site: Path) -> None:
    make_fake_dist(site, "crashy", "0.7.1", {"torchplug.autoload": {"crashy": "crashy_mod:Plugin"}},
                   modules={"crashy_mod": "def _boom():\n    raise ValueError('Don\\'t hide me!')\n\n_boom()\n"})
    with pytest.raises(PluginLoadError) as info:
        get_plugin_manager(env={})
    message = str(info.value)
    assert "'crashy' (torchplug.autoload = 'crashy_mod:Plugin') from distribution crashy 0.7.1" in message
    assert "ValueError: Don't hide me!" in message
    assert "TORCHPLUG_BLOCK_PLUGINS=crashy" in message
    assert isinstance(info.value, ImportError)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    frames = [frame.name for frame in __import__("traceback").extract_tb(cause.__traceback__)]
    assert frames[-1] == "_boom"
    assert get_plugin_manager(env={"TORCHPLUG_BLOCK_PLUGINS": "crashy"}).records  # blocking is the way out


def test_incompatible_plugin_refused_with_reason_before_import(site: Path) -> None:
    make_fake_dist(site, "ancient", "0.0.3", {"torchplug.plugins": {"ancient": "ancient_mod"}},
                   modules={"ancient_mod": "raise RuntimeError('must not be imported')\n"},
                   requires=["torchplug<0.1"])
    with pytest.raises(PluginIncompatibleError) as info:
        get_plugin_manager(["ancient"], autoload=False, env={})
    message = str(info.value)
    assert "requires torchplug<0.1, installed is torchplug " + torchplug.__version__ in message
    assert "ancient 0.0.3" in message
    assert "pip install -U ancient" in message
    assert "ancient_mod" not in sys.modules


def test_register_plugin_records_its_source() -> None:
    pm = PluginManager()
    rec = pm.register_plugin(nullcontext(), "ctx", "object")
    assert (rec.name, rec.source, rec.entry_point, rec.role) == ("ctx", "object", None, None)
    pm.unregister(name="ctx")
    assert pm.records == []


def test_instance_attribute_hiding_a_hook_method_is_rejected() -> None:
    class Shadow(Plugin):
        def __init__(self) -> None:
            self.world_size = 2  # hides the method below

        def world_size(self) -> int:  # type: ignore[no-redef]
            return 2

    with pytest.raises(PluginValidationError, match="instance attribute 'world_size' that hides its hook method"):
        PluginManager().register(Shadow())


def test_role_default_already_selected_by_name_keeps_its_place(site: Path) -> None:
    make_fake_dist(site, "roleless", "1.0", {"torchplug.plugins": {"roleless": "roleless_mod"}},
                   modules={"roleless_mod": "ROLE = None\n"})
    make_fake_dist(site, "other", "1.0", {"torchplug.plugins": {"other_pl": "other_pl_mod"}},
                   modules={"other_pl_mod": ""})
    pm = get_plugin_manager(["other_pl", "roleless"], role_defaults={"strategy": "roleless"}, autoload=False, env={})
    assert names(pm) == [DEFAULTS_NAME, "other_pl", "roleless"]
