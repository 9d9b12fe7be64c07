"""Checks of hook implementations at registration, and the messages that name what is wrong.

A misspelled hook never silently does nothing: a name that is not a hook, an argument the hook
does not pass, and (on :class:`torchplug.Plugin` subclasses) a public method one typo from a hook
name are refused with the plugin, its origin, the signature and the fix.
"""

from __future__ import annotations

import difflib
import inspect
import types

from torchplug import discovery, hookspecs
from torchplug.errors import PluginValidationError
from torchplug.plugin import Plugin

#: Method names a plugin may have that are one edit from a hook but are no typo: the state
#: protocol of torch objects and Lightning callbacks (``state_dict`` ~ hook ``get_state_dicts``).
NOT_TYPOS = frozenset({"state_dict", "load_state_dict"})


def near_miss(name: str) -> bool:
    """A public method name that is almost a hook name (a typo), or an ``on_*`` event name
    that torchplug does not have (Lightning habits such as ``on_train_batch_start``)."""
    if name in NOT_TYPOS:
        return False
    if name.startswith("on_"):
        return True
    limit = 1 if len(name) <= 8 else 2
    return any(distance(name, hook) <= limit for hook in hookspecs.HOOK_NAMES)


def distance(a: str, b: str) -> int:
    """Optimal string alignment distance (edits, with adjacent transpositions)."""
    if abs(len(a) - len(b)) > 2:
        return 3
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def check_arguments(plugin: object, attr: str, hook_name: str) -> None:
    """Reject an implementation that asks for an argument the hook does not pass (pluggy's
    own check, with the hook's arguments in the message)."""
    try:
        params = list(inspect.signature(getattr(plugin, attr)).parameters.values())
    except (TypeError, ValueError):
        return
    spec_args = inspect.signature(getattr(hookspecs, hook_name)).parameters
    star = [("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name for p in params
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if star:
        # pluggy passes hook arguments by name, never into *args/**kwargs: Lightning 1.1's
        # on_before_forward(self, model, *args) would get no batch and break the step later.
        raise PluginValidationError(
            f"Plugin {label(plugin)} ({object_origin(plugin)}) implements hook {hook_name!r} as "
            f"{signature(plugin, attr)}, with {', '.join(star)}: hook arguments are passed by name, "
            f"so it would receive nothing there. Name the arguments you use: {hook_name}({', '.join(spec_args)})"
            + (" (args is the tuple (batch, batch_idx); return new args, or None)" if hook_name == "on_before_forward"
               else "") + "."
        )
    unknown = [p.name for p in params
               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
               and p.name not in spec_args]
    if unknown:
        raise PluginValidationError(
            f"Plugin {label(plugin)} ({object_origin(plugin)}) implements hook {hook_name!r} with "
            f"argument(s) {', '.join(repr(a) for a in unknown)} that the hook does not pass: "
            f"{signature(plugin, attr)}. The hook's arguments are {hook_name}({', '.join(spec_args)}); "
            f"an implementation may take any subset of them, by name."
        )


def unknown_hook_message(plugin: object, attr: str, hook_name: str) -> str:
    close = difflib.get_close_matches(hook_name, hookspecs.HOOK_NAMES, n=1, cutoff=0.6)
    advice = f" Did you mean {close[0]!r}?" if close else ""
    if isinstance(plugin, Plugin) and not hasattr(getattr(plugin, attr, None), "torchplug_impl"):
        advice += f" If {attr!r} is a helper, not a hook, rename it '_{attr}'."
    return (
        f"Plugin {label(plugin)} ({object_origin(plugin)}) implements unknown hook "
        f"{hook_name!r}: {signature(plugin, attr)}.{advice} The hooks are listed in torchplug.hookspecs."
    )


def signature(plugin: object, attr: str) -> str:
    try:
        return f"{attr}{inspect.signature(getattr(plugin, attr))}"
    except (TypeError, ValueError, AttributeError):
        return attr


def label(plugin: object) -> str:
    if isinstance(plugin, types.ModuleType):
        return f"module {plugin.__name__!r}"
    return f"{type(plugin).__qualname__!r}"


def object_origin(plugin: object) -> str:
    module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
    file = getattr(inspect.getmodule(plugin), "__file__", None) or ""
    for ep in discovery.installed_plugins():
        if ep.module.partition(".")[0] == module.partition(".")[0]:
            return f"module {module}, distribution {ep.dist_name} {ep.dist_version}"
    return f"module {module}" + (f" in {file}" if file else "")
