"""Hyperparameters: ``self.save_hyperparameters()`` in a module's ``__init__``, ``self.hparams``,
``checkpoint["hyper_parameters"]`` and ``TrainingModule.load_from_checkpoint`` (Lightning's).

``save_hyperparameters()`` reads the arguments of the ``__init__`` that called it from its frame,
as Lightning does (``*args`` are not named, so they are left out; ``**kwargs`` are merged); given
names it keeps only those, given one dict (or ``argparse.Namespace``) it keeps that. Checkpoints
are read with ``weights_only=True``, so a value must be a number, string, bool, ``None`` or a
list/tuple/dict of them: anything else is refused when saved, naming the argument and the fix
(``ignore=[...]``), rather than written into a checkpoint nobody could load safely.
"""

from __future__ import annotations

import inspect
import os
from types import FrameType, SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from torchplug.errors import MisconfigurationError
from torchplug.hookspecs import hookimpl

if TYPE_CHECKING:
    from torch import nn

KEY = "hyper_parameters"
_ATTR = "_torchplug_hparams"
M = TypeVar("M", bound="nn.Module")


class AttributeDict(dict[str, Any]):
    """A dict whose keys are attributes too (``hparams.lr`` and ``hparams["lr"]``), Lightning's."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(f"no hyperparameter {name!r}; saved: {sorted(self)}") from exc

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def hparams_of(module: nn.Module) -> AttributeDict:
    found: AttributeDict | None = module.__dict__.get(_ATTR)
    if found is None:
        found = module.__dict__[_ATTR] = AttributeDict()
    return found


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def init_arguments(frame: FrameType) -> dict[str, Any]:
    """The named arguments (and ``**kwargs``) of the ``__init__`` running in ``frame``."""
    code = frame.f_code
    names = list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])
    values = {name: frame.f_locals[name] for name in names[1:] if name in frame.f_locals}  # [0]: self
    flags = code.co_flags
    varkw_at = code.co_argcount + code.co_kwonlyargcount + bool(flags & inspect.CO_VARARGS)
    if flags & inspect.CO_VARKEYWORDS:
        values.update(frame.f_locals.get(code.co_varnames[varkw_at], {}))
    return values


def save(module: nn.Module, args: tuple[Any, ...], ignore: Any, frame: FrameType | None) -> None:
    """``TrainingModule.save_hyperparameters``'s body (``frame``: its caller's)."""
    ignored = {ignore} if isinstance(ignore, str) else set(ignore or ())
    if len(args) == 1 and not isinstance(args[0], str):
        given = args[0]
        values = dict(vars(given) if not isinstance(given, dict) else given)
    else:
        if frame is None or frame.f_code.co_name != "__init__":
            raise MisconfigurationError(
                f"{type(module).__name__}.save_hyperparameters() reads the arguments of __init__: call it in "
                "__init__, or pass the values as one dict: save_hyperparameters({'lr': lr})."
            )
        found = init_arguments(frame)
        unknown = [name for name in args if name not in found]
        if unknown:
            raise MisconfigurationError(
                f"{type(module).__name__}.save_hyperparameters{tuple(args)}: __init__ has no argument "
                f"{', '.join(map(repr, unknown))}; its arguments are {sorted(found)}."
            )
        values = {name: found[name] for name in (args or found)}
    values = {k: v for k, v in values.items() if k not in ignored and not k.startswith("__")}
    for name, value in values.items():
        if not _plain(value):
            raise MisconfigurationError(
                f"{type(module).__name__}.save_hyperparameters(): {name}={type(value).__name__} cannot be stored in "
                "a checkpoint that loads with weights_only=True (numbers, strings, bools, None, and lists/dicts of "
                f"them only). Pass ignore=[{name!r}] and rebuild it from plain values."
            )
    hparams_of(module).update(values)


def checkpoint_plugin(module: nn.Module) -> object | None:
    """The plugin that stores the module's hyperparameters in fit's checkpoints (None: none saved)."""
    if not module.__dict__.get(_ATTR):
        return None

    def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = dict(hparams_of(module))

    return SimpleNamespace(on_save_checkpoint=hookimpl(on_save_checkpoint))


def load_from_checkpoint(cls: type[M], path: str | os.PathLike[str], strict: bool, overrides: dict[str, Any]) -> M:
    """``TrainingModule.load_from_checkpoint``'s body."""
    from torchplug import checkpoint as ckpt

    data = ckpt.load(path)
    stored = dict(data.get(KEY, {}))
    arguments = {**stored, **overrides}
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    missing = [name for name, p in list(params.items())[1:] if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in arguments]
    if missing:
        where = "stores no hyperparameters" if not stored else f"stores only {sorted(stored)}"
        raise MisconfigurationError(
            f"{cls.__name__}.__init__ needs {', '.join(missing)}, but checkpoint {path} {where}. Call "
            f"self.save_hyperparameters() in {cls.__name__}.__init__ before training, or pass them: "
            f"{cls.__name__}.load_from_checkpoint(path, {missing[0]}=...)."
        )
    unknown = [k for k in arguments if k not in params] if not takes_any else []
    if unknown:
        raise MisconfigurationError(
            f"{cls.__name__}.__init__ takes no {', '.join(unknown)}, which "
            f"{'the checkpoint ' + str(path) + ' stores' if set(unknown) & set(stored) else 'were passed'}; "
            "drop them from the overrides, or give __init__ those parameters."
        )
    model = cls(**arguments)
    if strict:
        ckpt.check_matches(data, model, path)
    model.load_state_dict(data["state_dict"], strict=strict)
    return model


__all__ = ["KEY", "AttributeDict", "checkpoint_plugin", "hparams_of", "init_arguments", "load_from_checkpoint",
           "save"]
