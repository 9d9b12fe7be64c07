"""The Trainer's argument values and their checks: every bad value is refused at ``Trainer()``,
naming the argument and the value, before any work."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchplug.errors import MisconfigurationError

PRECISIONS = {32: "32", "32": "32", 16: "16", "16": "16", "16-mixed": "16", "bf16": "bf16", "bf16-mixed": "bf16"}
AMP_BACKENDS = ("native", "apex")
AMP_LEVELS = ("O0", "O1", "O2", "O3")
ACCELERATORS = {None: None, "auto": None, "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}
NONFINITE = ("error", "skip", "ignore")
RESUME_PLAN = ("warn", "strict")  # what resuming under a different plan does: see torchplug.provenance
SINGLE_PROCESS = ("single_device", "none")  # strategies that mean "no strategy plugin"


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> Any:
    if not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise MisconfigurationError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MisconfigurationError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise MisconfigurationError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_number(name: str, value: Any, minimum: float, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise MisconfigurationError(f"{name} must be a number, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        raise MisconfigurationError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value}")
    return float(value)


def check_optional_int(name: str, value: Any, minimum: int) -> int | None:
    return None if value is None else check_int(name, value, minimum)


def iterable(value: Any) -> list[Any]:
    try:
        return list(value)
    except TypeError:
        return [None]


def check_devices(devices: Any) -> int | str | None:
    if devices is None or devices == "auto":
        return None
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise MisconfigurationError(f"devices must be a positive integer or 'auto', got {devices!r}")
    return devices


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise MisconfigurationError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_accelerator(accelerator: Any, strategy: Any) -> tuple[str | None, str | None]:
    """``(accelerator, strategy)``; Lightning 1.1 spelled the strategy as an accelerator: accelerator="ddp"."""
    if accelerator is not None and not isinstance(accelerator, str):
        raise MisconfigurationError(f"accelerator must be a string such as 'cpu', 'gpu' or 'ddp', got {accelerator!r}")
    if accelerator not in ACCELERATORS:
        if strategy is not None and strategy != accelerator:
            raise MisconfigurationError(
                f"accelerator={accelerator!r} names a strategy and strategy={strategy!r} another; pass one."
            )
        strategy, accelerator = accelerator, None
    if ACCELERATORS[accelerator] == "cuda" and not torch.cuda.is_available():
        raise MisconfigurationError(
            f"accelerator={accelerator!r} asks for CUDA, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Use accelerator='cpu', or install a CUDA build of torch."
        )
    return ACCELERATORS[accelerator], check_type("strategy", strategy, (str, type(None)))


def check_precision(precision: Any, amp_backend: Any, amp_level: Any) -> tuple[str, str, str | None]:
    """``(precision, amp_backend, amp_level)``, checked together."""
    if isinstance(precision, bool) or not isinstance(precision, (int, str)) or precision not in PRECISIONS:
        raise MisconfigurationError(f"precision must be 32, 16 or 'bf16', got {precision!r}")
    if not isinstance(amp_backend, str) or amp_backend not in AMP_BACKENDS:
        raise MisconfigurationError(f"amp_backend must be 'native' or 'apex', got {amp_backend!r}")
    if amp_level is not None and (not isinstance(amp_level, str) or amp_level not in AMP_LEVELS):
        raise MisconfigurationError(f"amp_level must be one of O0, O1, O2, O3, got {amp_level!r}")
    if amp_level is not None and amp_backend != "apex":
        raise MisconfigurationError(
            "amp_level applies to amp_backend='apex' only; add amp_backend='apex' or drop amp_level."
        )
    if amp_backend == "apex" and PRECISIONS[precision] == "bf16":
        raise MisconfigurationError("apex amp has no bf16 mode: use precision='bf16' with amp_backend='native'.")
    return PRECISIONS[precision], amp_backend, amp_level


def check_processes(devices: int | str | None, num_nodes: int, strategy: str | None, on_nonfinite_loss: str) -> None:
    """What cannot run on several processes, refused when several are asked for."""
    many = (isinstance(devices, int) and devices > 1) or num_nodes > 1
    if many and strategy in SINGLE_PROCESS:
        raise MisconfigurationError(
            f"strategy={strategy!r} trains in one process, but devices={devices} and num_nodes={num_nodes} ask "
            "for several; drop the strategy (devices>1 selects 'ddp') or use devices=1."
        )
    if many and on_nonfinite_loss == "skip":
        raise MisconfigurationError(
            f"on_nonfinite_loss='skip' cannot run on several processes (devices={devices}, num_nodes={num_nodes}): "
            "a rank that skips a backward would desynchronise the gradient all-reduce. Use 'error' or 'ignore'."
        )


def check_plugin_list(plugins: Sequence[object] | object | None) -> list[object]:
    """``plugins=``: names, plugin objects and modules, or one of them alone."""
    if plugins is None:
        return []
    items = [plugins] if isinstance(plugins, (str, bytes)) or not isinstance(plugins, Sequence) else list(plugins)
    for item in items:
        if item is None or isinstance(item, (bool, int, float, complex, bytes, dict, list, tuple, set, Path)):
            raise MisconfigurationError(
                f"plugins= takes plugin names (str), plugin objects and modules; got {item!r} "
                f"({type(item).__name__})."
            )
    return items


def check_callback_list(callbacks: Sequence[object] | object | None) -> list[object]:
    """``callbacks=``: callback objects, or one alone."""
    if callbacks is None:
        return []
    items = [callbacks] if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence) \
        else list(callbacks)
    for item in items:
        if item is None or isinstance(item, (str, bytes, type, bool, int, float, dict, list, tuple, set, Path)):
            raise MisconfigurationError(
                f"callbacks= takes callback objects (torchplug.Plugin instances, e.g. EarlyStopping(...)); got "
                f"{item!r} ({type(item).__name__}). Select an installed plugin by name with plugins=[...]."
            )
    return items
