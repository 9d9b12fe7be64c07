"""The Trainer's argument values and their checks: every bad value is refused at ``Trainer()``,
naming the argument and the value, before any work."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
