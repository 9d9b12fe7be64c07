"""Choosing the plugins of a Trainer: what each selection step picked (entry point, object,
module), what it left out and why (:class:`Decision`), and importing entry points after their
declared torchplug range is checked. :func:`torchplug.manager.get_plugin_manager` drives it.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from torchplug import discovery
from torchplug.discovery import BLOCK_ENV, EntryPointInfo
from torchplug.errors import (
    PluginBlockedError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginNotFoundError,
    PluginValidationError,
)
from torchplug.plugin import Role

ROLES: tuple[Role, ...] = ("precision", "strategy")


def role_of(plugin: object) -> Role | None:
    """The plugin's ``role`` attribute (``"precision"``, ``"strategy"`` or None)."""
    role = getattr(plugin, "role", None)
    return cast(Role, role) if role in ROLES else None


Source = Literal["builtin", "autoload", "entry point", "object", "module", "training module"]


@dataclass(frozen=True)
class Decision:
    """A plugin that a selection step considered and did not register, and why (the plan
    reports these as the alternatives that lost)."""

    name: str
    #: the selection step, as in :attr:`PluginRecord.via`
    via: str
    reason: str
    entry_point: EntryPointInfo | None = None
    #: the role it would have filled, where known without importing it
    role: Role | None = None


def load_entry_point(ep: EntryPointInfo) -> object:
    """Import an entry point after checking its declared torchplug range.

    :raises PluginIncompatibleError: its ``Requires-Dist`` on torchplug excludes this version.
    :raises PluginLoadError: importing it failed; ``__cause__`` is the original exception.
    """
    reason = ep.incompatibility()
    if reason:
        raise PluginIncompatibleError(
            f"Plugin {ep.describe()} is incompatible with this torchplug: it {reason}. "
            f"Upgrade the plugin (pip install -U {ep.dist_name}) or install a torchplug it supports; "
            f"TORCHPLUG_BLOCK_PLUGINS={ep.name} skips it."
        )
    try:
        return ep.load()
    except Exception as exc:
        how = (f"set TORCHPLUG_BLOCK_PLUGINS={ep.name} (or Trainer(blocked_plugins=['{ep.name}']))"
               if ep.autoload else f"do not select '{ep.name}'")
        raise PluginLoadError(
            f"Could not load plugin {ep.describe()}: {type(exc).__name__}: {exc}\n"
            f"Fix or reinstall {ep.dist_name} (pip install --force-reinstall {ep.dist_name}), "
            f"uninstall it (pip uninstall {ep.dist_name}), or run without it: {how}."
        ) from exc


@dataclass
class Selected:
    name: str
    plugin: object | None
    source: Source
    entry_point: EntryPointInfo | None = None
    via: str = ""

    def load(self) -> None:
        if self.plugin is None and self.entry_point is not None:
            self.plugin = load_entry_point(self.entry_point)


def select(item: object, blocked: set[str], via: str) -> Selected:
    if isinstance(item, str):
        if item in blocked:
            raise PluginBlockedError(
                f"Plugin '{item}' is selected by {via} but blocked (TORCHPLUG_BLOCK_PLUGINS or "
                f"blocked_plugins=). Unblock it or do not select it."
            )
        ep = discovery.find(item)
        if ep is None:
            raise PluginNotFoundError(not_found_message(item, via))
        return Selected(item, None, "entry point", ep, via=via)
    if isinstance(item, types.ModuleType):
        return Selected(item.__name__, item, "module", via=via)
    if isinstance(item, type):
        raise PluginValidationError(
            f"plugins= got the class {item.__module__}.{item.__qualname__}; pass an instance: "
            f"plugins=[{item.__name__}()]"
        )
    name = getattr(item, "plugin_name", None) or type(item).__name__
    return Selected(str(name), item, "object", via=via)


def dedupe(selected: list[Selected], skipped: list[Decision]) -> list[Selected]:
    """Keep the first selection of each entry point and of each object; note the others in ``skipped``."""
    seen_eps: set[tuple[str, str]] = set()
    seen_objects: set[int] = set()
    kept: list[Selected] = []
    for sel in selected:
        if sel.entry_point is not None:
            key = (sel.entry_point.group, sel.entry_point.name)
            if key in seen_eps:
                skipped.append(Decision(sel.name, sel.via, "duplicate selection: registered once, at its first "
                                        "position", sel.entry_point, role_of(sel.plugin)))
                continue
            seen_eps.add(key)
        if sel.plugin is not None:
            if id(sel.plugin) in seen_objects:
                skipped.append(Decision(sel.name, sel.via, "duplicate selection: registered once, at its first "
                                        "position", sel.entry_point, role_of(sel.plugin)))
                continue
            seen_objects.add(id(sel.plugin))
        kept.append(sel)
    return kept


def blocked_by(name: str, blocked: list[str], env: Mapping[str, str]) -> str:
    by = [BLOCK_ENV] if name in discovery.blocked_names(env) else []
    if name in blocked:
        by.append("blocked_plugins=")
    return " and ".join(by)


def source_of(plugin: object) -> Source:
    return "module" if isinstance(plugin, types.ModuleType) else "object"


def not_found_message(name: str, via: str) -> str:
    installed = sorted({ep.name for ep in discovery.installed_plugins()})
    lines = [f"No plugin named '{name}' is installed (selected by {via}; entry-point groups "
             f"{discovery.PLUGINS_GROUP} and {discovery.AUTOLOAD_GROUP})."]
    close = difflib.get_close_matches(name, installed + list(discovery.FIRST_PARTY), n=1)
    if close and close[0] != name:
        lines.append(f"Did you mean '{close[0]}'?")
    lines.append("Installed plugins: " + (", ".join(installed) if installed else "none") + ".")
    hint = discovery.install_hint(name) or (discovery.install_hint(close[0]) if close else None)
    if hint:
        lines.append(f"Install it with: {hint}")
    lines.append("List them with: torchplug plugins")
    return " ".join(lines)


def unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}#{n}"
    used.add(candidate)
    return candidate
