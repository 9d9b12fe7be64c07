"""The setup phase as ordered, owned steps: model init context around ``configure_model()``,
model transforms in their declared order, optimizers built on the final parameters, then the
strategy's ``setup_optimizers``; a cycle or an ambiguous order is refused naming the plugins."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import torchplug
from torchplug import ModelTransform, PluginConflictError, PluginValidationError
from torchplug.errors import MisconfigurationError
from torchplug.prepare import unwrap
from torchplug.testing.models import TinyMLP, tiny_loader


class Declares(torchplug.Plugin):
    """Declares the given transforms and records the order they ran in."""

    def __init__(self, name: str, *transforms: tuple[str, tuple[str, ...], tuple[str, ...]]) -> None:
        self.plugin_name = name
        self.transforms = transforms
        self.ran: list[str] = []

    def model_transforms(self) -> list[ModelTransform]:
        return [ModelTransform(t, lambda module, t=t: self.ran.append(t), before=b, after=a)  # type: ignore[misc]
                for t, b, a in self.transforms]


def fit(make_trainer: Any, *plugins: object, model: nn.Module | None = None, **kwargs: Any) -> torchplug.Trainer:
    trainer = make_trainer(plugins=list(plugins), max_steps=2, logger=False, enable_checkpointing=False, **kwargs)
    trainer.fit(model if model is not None else TinyMLP(), tiny_loader(n=16, batch_size=4))
    return trainer


def test_transforms_run_in_the_default_phase_order_and_are_recorded(make_trainer: Any) -> None:
    shard = Declares("sharder", ("shard", (), ()))
    compile_ = Declares("compiler", ("compile", (), ()))
    ckpt = Declares("checkpointer", ("activation_checkpoint", (), ()))
    trainer = fit(make_trainer, shard, compile_, ckpt)
    assert trainer.model_transforms == [("activation_checkpoint", "checkpointer"), ("compile", "compiler"),
                                        ("shard", "sharder")]
    assert (ckpt.ran, compile_.ran, shard.ran) == (["activation_checkpoint"], ["compile"], ["shard"])


def test_declared_constraints_order_unknown_names_and_override_the_default(make_trainer: Any) -> None:
    a = Declares("a", ("quantize", ("shard",), ()), ("shard", ("compile",), ()))  # shard before compile
    b = Declares("b", ("compile", (), ()))
    trainer = fit(make_trainer, a, b)
    assert trainer.model_transforms == [("quantize", "a"), ("shard", "a"), ("compile", "b")]


def test_two_transforms_nothing_orders_are_refused_naming_both_plugins(make_trainer: Any) -> None:
    with pytest.raises(PluginConflictError, match=r"'prune' \(plugin 'p1'\) and 'quantize' \(plugin 'p2'\) have no "
                                                  r"declared order"):
        fit(make_trainer, Declares("p1", ("prune", (), ())), Declares("p2", ("quantize", (), ())))


def test_a_cycle_is_refused_naming_the_transforms_before_any_runs(make_trainer: Any) -> None:
    p1 = Declares("p1", ("prune", ("quantize",), ()))
    p2 = Declares("p2", ("quantize", ("prune",), ()))
    with pytest.raises(PluginConflictError, match=r"'prune' \(plugin 'p1'\), 'quantize' \(plugin 'p2'\) declare a "
                                                  "cycle"):
        fit(make_trainer, p1, p2)
    assert p1.ran == p2.ran == []


def test_one_name_declared_twice_is_refused(make_trainer: Any) -> None:
    with pytest.raises(PluginConflictError, match=r"transform 'shard': 'p\d' and 'p\d'"):
        fit(make_trainer, Declares("p1", ("shard", (), ())), Declares("p2", ("shard", (), ())))


class ReturnsACopy(torchplug.Plugin):
    def model_transforms(self) -> ModelTransform:
        return ModelTransform("compile", lambda module: torch.compile(module))


def test_a_transform_that_returns_another_module_is_refused(make_trainer: Any) -> None:
    with pytest.raises(PluginValidationError, match="'compile' returned a OptimizedModule instead of changing the "
                                                    "module in place"):
        fit(make_trainer, ReturnsACopy())


class ReplacesALayer(torchplug.Plugin):
    """Replaces the first layer (as sharding replaces parameters): the optimizer must see the new one."""

    plugin_name = "replacer"

    def model_transforms(self, model: nn.Module) -> ModelTransform:
        def apply(module: nn.Module) -> None:
            self.new = nn.Linear(8, 16)
            module.net[0] = self.new  # type: ignore[index]
        return ModelTransform("shard", apply)

    def on_after_setup_optimizers(self, trainer: torchplug.Trainer) -> None:
        self.optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


def test_optimizers_are_built_on_the_transformed_parameters(make_trainer: Any) -> None:
    plugin = ReplacesALayer()
    fit(make_trainer, plugin)
    assert {id(plugin.new.weight), id(plugin.new.bias)} <= plugin.optimized


class MetaInit(torchplug.Plugin):
    """Deferred init: layers made on the meta device in configure_model, materialised by a transform."""

    plugin_name = "meta_init"

    def model_init_context(self) -> Any:
        return torch.device("meta")

    def model_transforms(self) -> ModelTransform:
        def materialise(module: nn.Module) -> None:
            module.to_empty(device="cpu")
            torch.manual_seed(0)
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    sub.reset_parameters()
        return ModelTransform("materialise", materialise, before=("shard",))


class LazyMLP(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        del self.net
        self.seen_device: torch.device | None = None

    def configure_model(self) -> None:
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.seen_device = self.net[0].weight.device


def test_configure_model_runs_inside_the_init_context_and_the_transform_materialises(make_trainer: Any) -> None:
    model = LazyMLP()
    trainer = fit(make_trainer, MetaInit(), model=model)
    assert model.seen_device == torch.device("meta")
    assert not any(p.is_meta for p in model.parameters())
    assert trainer.model_transforms == [("materialise", "meta_init")]
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    assert not torch.equal(model.net[0].weight, reference[0].weight)  # trained from that init


def test_meta_tensors_no_transform_materialises_are_refused(make_trainer: Any) -> None:
    class OnlyMeta(torchplug.Plugin):
        def model_init_context(self) -> Any:
            return torch.device("meta")

    with pytest.raises(MisconfigurationError, match="still has meta-device parameters"):
        fit(make_trainer, OnlyMeta(), model=LazyMLP())


def test_a_configure_model_that_needs_arguments_is_refused(make_trainer: Any) -> None:
    class NeedsArgs(TinyMLP):
        def configure_model(self, width: int) -> None:
            pass

    with pytest.raises(MisconfigurationError, match=r"configure_model\(\) takes width"):
        fit(make_trainer, model=NeedsArgs())


class ReplacesOptimizers(torchplug.Plugin):
    """A strategy-owned optimizer step: a new optimizer object, the LR scheduler follows it."""

    def setup_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
        self.replaced = [torch.optim.SGD(opt.param_groups, lr=opt.defaults["lr"]) for opt in optimizers]
        return self.replaced


class Scheduled(TinyMLP):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), "interval": "step"}]


def test_setup_optimizers_replaces_the_optimizers_and_rebinds_schedulers(make_trainer: Any) -> None:
    plugin = ReplacesOptimizers()
    trainer = fit(make_trainer, plugin, model=Scheduled())
    assert trainer.optimizers == plugin.replaced
    assert trainer.lr_schedulers[0].optimizer is plugin.replaced[0]
    assert plugin.replaced[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


def test_unwrap_goes_through_stacked_wrappers_to_the_users_module() -> None:
    module = TinyMLP()
    compiled = torch.compile(module, backend="eager")
    wrapper = torchplug.TrainingStepModule(compiled)
    assert unwrap(wrapper, wrapper, module) is module
    assert unwrap(compiled, wrapper, module) is module
    assert not any("_orig_mod" in k for k in unwrap(wrapper, wrapper, module).state_dict())
