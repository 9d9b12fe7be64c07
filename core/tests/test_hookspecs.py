"""Meta-tests that keep the hookspecs honest: they are the API reference."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

import pytest
import torch

from torchplug import defaults, hookspecs
from torchplug.hookcalls import Hooks
from torchplug.trainer import Trainer
from torchplug.transforms import ModelTransform

HOOKS = list(hookspecs.HOOK_NAMES)
TYPE_NAMES = {"torch": torch, "nn": torch.nn, "Optimizer": torch.optim.Optimizer, "Trainer": Trainer,
              "ModelTransform": ModelTransform}


def spec(name: str) -> Callable[..., Any]:
    function: Callable[..., Any] = getattr(hookspecs, name)
    return function


def is_firstresult(name: str) -> bool:
    return bool(spec(name).torchplug_spec["firstresult"])  # type: ignore[attr-defined]


def convention(name: str) -> str:
    doc = inspect.getdoc(spec(name)) or ""
    assert "Convention:" in doc, f"{name}: no 'Convention:' sentence"
    return doc[doc.index("Convention:") + len("Convention:"):].strip().split(".")[0]


def test_hook_names_are_unique_and_unprefixed() -> None:
    assert len(HOOKS) == len(set(HOOKS)) > 20
    assert not [name for name in HOOKS if name.startswith(("torchplug_", "_"))]


@pytest.mark.parametrize("name", HOOKS)
def test_docstring_documents_every_argument_and_the_return(name: str) -> None:
    doc = inspect.getdoc(spec(name))
    assert doc, f"{name} has no docstring"
    assert doc.splitlines()[0].endswith("."), f"{name}: the first line is a one-sentence summary"
    params = list(inspect.signature(spec(name)).parameters)
    documented = re.findall(r"^:param (\w+):", doc, flags=re.M)
    assert documented == params, f"{name}: :param: entries {documented} != arguments {params}"
    returns = inspect.signature(spec(name)).return_annotation
    if returns == "None":
        assert ":returns:" not in doc, f"{name} returns nothing but documents a return value"
    else:
        assert re.search(r"^:returns: \S", doc, flags=re.M), f"{name} -> {returns}: no ':returns:' description"


@pytest.mark.parametrize("name", HOOKS)
def test_docstring_states_the_calling_convention(name: str) -> None:
    sentence = convention(name)
    if is_firstresult(name):
        assert sentence.startswith("firstresult"), f"{name}: firstresult spec, convention says {sentence!r}"
    elif name == "on_before_forward":
        assert "chained" in sentence
    else:
        assert sentence.startswith("all called"), f"{name}: all-called spec, convention says {sentence!r}"


@pytest.mark.parametrize("name", HOOKS)
def test_signature_is_fully_typed_and_keyword_callable(name: str) -> None:
    signature = inspect.signature(spec(name))
    for param in signature.parameters.values():
        assert param.kind is param.POSITIONAL_OR_KEYWORD, f"{name}({param}): pluggy calls by keyword"
        assert param.annotation is not param.empty, f"{name}: argument {param.name!r} has no type"
        assert param.default is param.empty, f"{name}: a spec argument cannot have a default"
    assert signature.return_annotation is not signature.empty, f"{name}: no return type"
    hints = typing.get_type_hints(spec(name), localns=TYPE_NAMES)  # every annotation resolves
    assert set(hints) == {*signature.parameters, "return"}
    if is_firstresult(name) and hints["return"] is not Any:
        # implementations return None to defer to the next plugin
        assert type(None) in typing.get_args(hints["return"]), f"{name}: firstresult return type lacks None"


# The hooks DESIGN.md names, with their arguments and conventions.
DESIGN = {
    "configure_ddp": (["model", "device_ids"], "firstresult"),
    "block_backward_sync": (["model"], "firstresult"),
    "clip_gradients": (["grad_clip_val", "optimizer", "norm_type"], "firstresult"),
    "on_before_forward": (["model", "args"], "chained"),
    "get_model_from_plugin": (["model"], "firstresult"),
    "on_after_setup_optimizers": (["trainer"], "all"),
    "data_parallel_group": ([], "firstresult"),
    "configure_apex": (["amp", "model", "optimizers", "amp_level"], "firstresult"),
    "on_fit_start": (None, "all"),
    "on_fit_end": (None, "all"),
    "on_train_batch_end": (None, "all"),
    "on_train_epoch_end": (None, "all"),
    "on_validation_end": (None, "all"),
    "on_save_checkpoint": (["trainer", "checkpoint"], "all"),
    "on_load_checkpoint": (["trainer", "checkpoint"], "all"),
}


@pytest.mark.parametrize("name", list(DESIGN))
def test_design_contract_hooks(name: str) -> None:
    args, kind = DESIGN[name]
    assert name in HOOKS
    if args is not None:
        assert list(inspect.signature(spec(name)).parameters) == args
    assert is_firstresult(name) == (kind == "firstresult")


def test_block_backward_sync_says_the_core_enters_it() -> None:
    doc = inspect.getdoc(spec("block_backward_sync")) or ""
    assert "ENTERS" in doc
    assert "do\nnot enter it yourself" in doc or "not enter it yourself" in doc.replace("\n", " ")


def test_defaults_are_trylast_implementations_of_known_hooks() -> None:
    impls = {name: getattr(defaults, name) for name in dir(defaults)
             if hasattr(getattr(defaults, name), "torchplug_impl")}
    assert impls
    for name, function in impls.items():
        assert name in HOOKS
        assert function.torchplug_impl["trylast"], f"defaults.{name} must be trylast"
    # the loop never meets a firstresult hook without an answer, except where None is the answer
    unanswered = {name for name in HOOKS if is_firstresult(name) and name not in impls}
    assert unanswered == {"configure_apex", "data_parallel_group", "save_sharded_state"}


def test_hooks_facade_declares_every_hook() -> None:
    assert set(HOOKS) <= set(typing.get_type_hints(Hooks))
