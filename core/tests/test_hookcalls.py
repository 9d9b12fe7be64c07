"""The typed ``Hooks`` façade: its type-checking stubs cannot drift from the hookspecs.

The stubs live under ``if TYPE_CHECKING:`` (they do not exist at run time), so they are read
from the source of ``torchplug/hookcalls.py`` with :mod:`ast`.
"""

from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import pluggy
import pytest
import torch

from torchplug import defaults, hookcalls, hookspecs, manager
from torchplug.errors import PluginValidationError
from torchplug.hookcalls import Hooks
from torchplug.manager import get_plugin_manager


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def _stubs() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(Path(inspect.getfile(hookcalls)).read_text(encoding="utf-8"))
    (hooks,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Hooks"]
    blocks = [node for node in hooks.body
              if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"]
    assert len(blocks) == 1, "Hooks declares its typed stubs in one `if TYPE_CHECKING:` block"
    return {node.name: node for node in blocks[0].body if isinstance(node, ast.FunctionDef)}


SPECS = _functions(Path(inspect.getfile(hookspecs)))
STUBS = _stubs()


def _without_none(annotation: ast.expr) -> ast.expr:
    """``X | None`` → ``X`` (a firstresult hook whose default always answers)."""
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr) \
            and isinstance(annotation.right, ast.Constant) and annotation.right.value is None:
        return annotation.left
    return annotation


def _expected_return(name: str) -> str:
    spec = SPECS[name]
    assert spec.returns is not None
    if name in hookspecs.CHAINED_HOOKS:
        return ast.unparse(_without_none(spec.returns))
    if not getattr(hookspecs, name).torchplug_spec["firstresult"]:
        return "list[Any]"
    if hasattr(defaults, name):  # the default always answers: callers get an X
        return ast.unparse(_without_none(spec.returns))
    return ast.unparse(spec.returns)


def test_every_hook_has_one_stub_and_nothing_else() -> None:
    assert list(STUBS) == list(hookspecs.HOOK_NAMES)


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_stub_matches_its_hookspec(name: str) -> None:
    stub, spec = STUBS[name], SPECS[name]
    assert [a.arg for a in stub.args.args] == ["self"]
    assert not stub.args.posonlyargs
    assert stub.args.vararg is None
    assert stub.args.kwarg is None
    assert not any(stub.args.kw_defaults), "every hook argument is required"
    # the names pluggy passes, in the hookspec's order
    spec_names = list(inspect.signature(getattr(hookspecs, name)).parameters)
    assert [a.arg for a in stub.args.kwonlyargs] == spec_names, f"{name}: keyword names differ from the hookspec"
    assert [a.arg for a in spec.args.args] == spec_names
    for stub_arg, spec_arg in zip(stub.args.kwonlyargs, spec.args.args):
        assert stub_arg.annotation is not None
        assert spec_arg.annotation is not None
        assert ast.unparse(stub_arg.annotation) == ast.unparse(spec_arg.annotation), (name, stub_arg.arg)
    assert stub.returns is not None
    assert ast.unparse(stub.returns) == _expected_return(name), f"{name}: return type"


def test_the_stubs_are_not_there_at_run_time() -> None:
    # zero run-time cost: every hook is an instance attribute, the class has no method for it
    for name in hookspecs.HOOK_NAMES:
        assert name not in vars(Hooks)
    hooks = Hooks(get_plugin_manager(autoload=False, env={}), trace=False)
    assert set(hookspecs.HOOK_NAMES) <= set(vars(hooks))


def test_chained_hooks_come_from_the_hookspecs() -> None:
    assert manager.CHAINED_HOOKS is hookspecs.CHAINED_HOOKS
    assert vars(hookcalls)["CHAINED_HOOKS"] is hookspecs.CHAINED_HOOKS


def test_a_historic_hookspec_is_refused_at_build_time() -> None:
    @hookspecs.hookspec(historic=True)
    def on_fit_start(trainer: object, model: object) -> None:
        """historic"""

    specs = types.ModuleType("specs")
    for name in hookspecs.HOOK_NAMES:
        setattr(specs, name, on_fit_start if name == "on_fit_start" else getattr(hookspecs, name))
    pm = pluggy.PluginManager("torchplug")
    pm.add_hookspecs(specs)
    with pytest.raises(PluginValidationError, match=r"'on_fit_start' is historic=True"):
        Hooks(pm, trace=False)


def test_a_missing_keyword_argument_raises_key_error() -> None:
    hooks = Hooks(get_plugin_manager(autoload=False, env={}), trace=False)
    with pytest.raises(KeyError, match="optimizer"):
        hooks.clip_gradients(grad_clip_val=1.0, norm_type=2.0)  # type: ignore[call-arg]


def test_a_chained_hook_passes_each_implementation_what_it_names_in_pluggy_order() -> None:
    """on_before_forward's implementations take (model, args), (args) or any order of the two;
    each gets the previous one's args, and None keeps them."""
    seen: list[tuple[str, object, tuple[object, ...]]] = []
    model = torch.nn.Linear(1, 1)

    class Both:
        @hookspecs.hookimpl(tryfirst=True)
        def on_before_forward(self, model: object, args: tuple[object, ...]) -> tuple[object, ...]:
            seen.append(("both", model, args))
            return (*args, "both")

    class ArgsOnly:
        @hookspecs.hookimpl
        def on_before_forward(self, args: tuple[object, ...]) -> None:
            seen.append(("args", None, args))

    class Reversed:
        @hookspecs.hookimpl(trylast=True)
        def on_before_forward(self, args: tuple[object, ...], model: object) -> tuple[object, ...]:
            seen.append(("reversed", model, args))
            return (*args, "reversed")

    pm = get_plugin_manager([Both(), ArgsOnly(), Reversed()], autoload=False, env={})
    result = Hooks(pm, trace=False).on_before_forward(model=model, args=("batch", 0))
    assert seen == [("both", model, ("batch", 0)), ("args", None, ("batch", 0, "both")),
                    ("reversed", model, ("batch", 0, "both"))]
    assert result == ("batch", 0, "both", "reversed")  # the core's default last: in place already


def test_single_implementations_get_their_arguments_by_name_and_pluggy_results() -> None:
    class Plugin:
        @hookspecs.hookimpl
        def clip_gradients(self, norm_type: float, optimizer: object, grad_clip_val: float) -> object:
            return ("clip", norm_type, optimizer, grad_clip_val)

        @hookspecs.hookimpl
        def on_before_zero_grad(self, optimizer: object, trainer: object) -> object:
            return ("zero", optimizer, trainer)

        @hookspecs.hookimpl
        def on_train_start(self) -> None:
            return None

    hooks = Hooks(get_plugin_manager([Plugin()], autoload=False, env={}), trace=False)
    assert hooks.clip_gradients(grad_clip_val=1.0, optimizer="opt", norm_type=2.0) == ("clip", 2.0, "opt", 1.0)
    assert hooks.on_before_zero_grad(trainer="t", optimizer="opt") == [("zero", "opt", "t")]
    assert hooks.on_train_start(trainer="t") == []
