"""The plugin manager: registration with validation, entry-point loading, roles, blocking.

:func:`get_plugin_manager` builds a fresh manager each call (no module-global state) and
registers plugins in this documented order (pluggy calls the most recent registration first,
so the later a plugin is registered, the earlier it runs; the built-in defaults are ``trylast``
and always run last):

1. the core's built-in defaults (:mod:`torchplug.defaults`);
2. ``torchplug.autoload`` entry points, sorted by name, unless autoload is disabled
   (``TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1`` or ``autoload=False``) or the name is blocked;
3. role defaults picked by shorthands (``precision=16`` → ``native_amp``, ``accelerator="ddp"``
   → ``ddp``) for roles no selected plugin fills;
4. names from ``TORCHPLUG_PLUGINS=a,b``, in that order;
5. the ``plugins`` argument (names, objects, modules), in the order given.

Blocking (``TORCHPLUG_BLOCK_PLUGINS=a,b`` or ``blocked=[...]``) skips an autoload entry point
without importing it; selecting a blocked plugin explicitly is an error.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import pluggy

from torchplug import defaults, discovery, hookspecs
from torchplug.errors import (
    PluginConflictError,
    PluginError,
    PluginLoadError,
    PluginNotFoundError,
    PluginValidationError,
)
from torchplug.plugin import Plugin, Role

DISABLE_AUTOLOAD_ENV = "TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "TORCHPLUG_PLUGINS"
BLOCK_ENV = "TORCHPLUG_BLOCK_PLUGINS"
DEFAULTS_NAME = "torchplug.defaults"

#: Hooks whose implementations cannot be wrappers: the core calls them itself, in sequence.
CHAINED_HOOKS = frozenset({"on_before_forward"})


@dataclass(frozen=True)
class PluginRecord:
    """A registered plugin and where it came from."""

    name: str
    plugin: object
    source: str  # "builtin", "autoload", "entry point", "object", "module"
    entry_point: discovery.EntryPointInfo | None = None

    @property
    def role(self) -> Role | None:
        return role_of(self.plugin)

    def describe(self) -> str:
        if self.entry_point is not None:
            ep = self.entry_point
            return f"'{self.name}' (distribution {ep.dist_name} {ep.dist_version})"
        return f"'{self.name}' ({_object_origin(self.plugin)})"


class PluginManager(pluggy.PluginManager):
    """A pluggy manager for project ``torchplug`` that also accepts undecorated
    :class:`Plugin` methods and rejects misspelled hooks at registration."""

    def __init__(self) -> None:
        super().__init__("torchplug")
        self.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None:
            hook_name = opts.get("specname") or name
            if hook_name not in hookspecs.HOOK_NAMES:
                raise PluginValidationError(
                    _unknown_hook_message(plugin, hook_name, getattr(plugin, name))
                )
            if hook_name in CHAINED_HOOKS and (opts.get("wrapper") or opts.get("hookwrapper")):
                raise PluginValidationError(
                    f"Plugin {_label(plugin)}: hook {hook_name!r} is chained (each implementation "
                    "receives the previous one's result) and cannot be a wrapper; drop wrapper=True."
                )
            return opts
        if not isinstance(plugin, Plugin) or name.startswith("_"):
            return None
        attr = inspect.getattr_static(plugin, name, None)
        if not inspect.isfunction(attr):
            return None
        if name in hookspecs.HOOK_NAMES:
            return cast(pluggy.HookimplOpts, {})
        if difflib.get_close_matches(name, hookspecs.HOOK_NAMES, n=1, cutoff=0.9):
            raise PluginValidationError(_unknown_hook_message(plugin, name, getattr(plugin, name)))
        return None

    def register_plugin(self, plugin: object, name: str, source: str,
                        entry_point: discovery.EntryPointInfo | None = None) -> PluginRecord:
        """Register ``plugin`` with validation errors that name the plugin, hook and signature."""
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            origin = entry_point.describe() if entry_point else _object_origin(plugin)
            raise PluginValidationError(f"Invalid hook implementation in plugin {origin}:\n{exc}") from exc
        record = PluginRecord(name, plugin, source, entry_point)
        self.records.append(record)
        return record

    def record(self, name: str) -> PluginRecord:
        for rec in self.records:
            if rec.name == name:
                return rec
        raise KeyError(name)

    def role_holders(self, role: Role) -> list[PluginRecord]:
        return [rec for rec in self.records if rec.role == role]


def get_plugin_manager(
    plugins: Sequence[object] = (),
    *,
    role_defaults: Mapping[Role, str] | None = None,
    blocked: Iterable[str] = (),
    autoload: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> PluginManager:
    """Build a fresh manager with the defaults and the selected plugins registered.

    :param plugins: entry-point names (``"ddp"``), plugin objects and modules, in order.
    :param role_defaults: the plugin name to load for a role no selected plugin fills, e.g.
        ``{"precision": "native_amp"}`` for ``precision=16``.
    :param blocked: entry-point names never to load (adds to ``TORCHPLUG_BLOCK_PLUGINS``).
    :param autoload: load ``torchplug.autoload`` entry points; ``None`` reads
        ``TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD``.
    :param env: the environment to read (``os.environ`` by default).
    :raises PluginError: unknown, blocked, incompatible or broken plugins, or two of one role.
    """
    env = os.environ if env is None else env
    blocked_set = set(blocked) | set(_split(env.get(BLOCK_ENV, "")))
    if autoload is None:
        autoload = env.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")

    pm = PluginManager()
    pm.register_plugin(defaults, DEFAULTS_NAME, "builtin")
    # Autoload entry points are filtered by name before anything is imported.
    pending: list[tuple[str, object, str, discovery.EntryPointInfo | None]] = []
    if autoload:
        for ep in discovery.installed_plugins():
            if ep.autoload and ep.name not in blocked_set:
                pending.append((ep.name, _load(ep), "autoload", ep))
    chosen = [_resolve(name, blocked_set, via=PLUGINS_ENV) for name in _split(env.get(PLUGINS_ENV, ""))]
    chosen += [_resolve(item, blocked_set, via="plugins=") for item in plugins]
    filled = {role_of(obj) for _, obj, _, _ in pending + chosen}
    for role, name in (role_defaults or {}).items():
        if role not in filled:
            pending.append(_resolve(name, blocked_set, via=f"the {role} shorthand"))
    used: set[str] = set()
    for name, obj, source, ep in pending + chosen:
        pm.register_plugin(obj, _unique(name, used), source, ep)
    _check_roles(pm)
    return pm


def role_of(plugin: object) -> Role | None:
    return cast("Role | None", getattr(plugin, "role", None))


def _resolve(item: object, blocked: set[str], via: str
             ) -> tuple[str, object, str, discovery.EntryPointInfo | None]:
    if isinstance(item, str):
        if item in blocked:
            raise PluginError(
                f"Plugin '{item}' is selected by {via} but blocked "
                f"(TORCHPLUG_BLOCK_PLUGINS or blocked_plugins=). Unblock it or do not select it."
            )
        ep = discovery.find(item)
        if ep is None:
            raise PluginNotFoundError(_not_found_message(item))
        return item, _load(ep), "entry point", ep
    if isinstance(item, types.ModuleType):
        return item.__name__, item, "module", None
    if isinstance(item, type):
        raise PluginError(
            f"plugins= got the class {item.__module__}.{item.__qualname__}; pass an instance: "
            f"plugins=[{item.__name__}()]"
        )
    name = getattr(item, "plugin_name", None) or type(item).__name__
    return name, item, "object", None


def _load(ep: discovery.EntryPointInfo) -> object:
    _check_compatible(ep)
    try:
        return ep.load()
    except Exception as exc:
        group_hint = ("TORCHPLUG_BLOCK_PLUGINS=" + ep.name) if ep.autoload else "remove it from plugins="
        raise PluginLoadError(
            f"Could not load plugin {ep.describe()}: {type(exc).__name__}: {exc}\n"
            f"Fix or reinstall {ep.dist_name}, uninstall it (pip uninstall {ep.dist_name}), "
            f"or run without it: {group_hint}."
        ) from exc


def _check_compatible(ep: discovery.EntryPointInfo) -> None:
    reason = incompatibility(ep)
    if reason:
        raise PluginError(
            f"Plugin {ep.describe()} is incompatible with this torchplug: {reason}. "
            f"Upgrade the plugin (pip install -U {ep.dist_name}) or install a matching torchplug; "
            f"TORCHPLUG_BLOCK_PLUGINS={ep.name} skips it."
        )


def incompatibility(ep: discovery.EntryPointInfo) -> str | None:
    """Why the installed torchplug does not satisfy the plugin's declared core range, or None."""
    requirement = ep.core_requirement()
    if requirement is None:
        return None
    from packaging.requirements import InvalidRequirement, Requirement

    from torchplug import __version__

    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return f"unreadable requirement {requirement!r}"
    if req.specifier and not req.specifier.contains(__version__, prereleases=True):
        return f"it requires torchplug{req.specifier}, this is torchplug {__version__}"
    return None


def _check_roles(pm: PluginManager) -> None:
    for role in ("precision", "strategy"):
        holders = pm.role_holders(role)  # type: ignore[arg-type]
        if len(holders) > 1:
            listed = " and ".join(rec.describe() for rec in holders)
            raise PluginConflictError(
                f"Two {role} plugins are selected: {listed}. At most one {role} plugin can be "
                f"active: keep one in plugins=, drop the shorthand that selects the other "
                f"({'precision=/amp_backend=' if role == 'precision' else 'accelerator=/strategy=/devices='}), "
                f"or block an entry point with TORCHPLUG_BLOCK_PLUGINS=<name>."
            )


def _not_found_message(name: str) -> str:
    installed = sorted({ep.name for ep in discovery.installed_plugins()})
    lines = [f"No plugin named '{name}' is installed (entry-point group {discovery.PLUGINS_GROUP})."]
    close = difflib.get_close_matches(name, installed, n=1)
    if close:
        lines.append(f"Did you mean '{close[0]}'?")
    lines.append("Installed plugins: " + (", ".join(installed) if installed else "none") + ".")
    hint = discovery.install_hint(name)
    if hint:
        lines.append(f"Install it with: {hint}")
    return " ".join(lines)


def _unknown_hook_message(plugin: object, hook_name: str, function: Any) -> str:
    close = difflib.get_close_matches(hook_name, hookspecs.HOOK_NAMES, n=1, cutoff=0.6)
    try:
        signature = f"{hook_name}{inspect.signature(function)}"
    except (TypeError, ValueError):
        signature = hook_name
    return (
        f"Plugin {_label(plugin)} ({_object_origin(plugin)}) implements unknown hook "
        f"{hook_name!r}: {signature}."
        + (f" Did you mean {close[0]!r}?" if close else "")
        + " See torchplug.hookspecs for the hooks."
    )


def _label(plugin: object) -> str:
    if isinstance(plugin, types.ModuleType):
        return f"module {plugin.__name__!r}"
    return f"{type(plugin).__qualname__!r}"


def _object_origin(plugin: object) -> str:
    module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
    top = module.partition(".")[0]
    dists = importlib.metadata.packages_distributions().get(top) or []
    where = f"distribution {dists[0]}" if dists else "not from an installed distribution"
    return f"module {module}, {where}"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}#{n}"
    used.add(candidate)
    return candidate


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
