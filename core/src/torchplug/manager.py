"""The plugin manager: registration with validation, entry-point loading, roles, blocking.

:func:`get_plugin_manager` builds a fresh manager each call (no module-global state) and
registers plugins in this documented order:

1. the core's built-in defaults (:mod:`torchplug.defaults`, every hook ``trylast``);
2. ``torchplug.autoload`` entry points, sorted by name (then distribution), unless autoload is
   disabled (``TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1`` or ``autoload=False``) or the name is
   blocked: both are decided from metadata, before any entry point is imported;
3. role defaults picked by shorthands (``precision=16`` → ``native_amp``, ``accelerator="ddp"``
   → ``ddp``) for roles that no plugin of steps 2, 4 and 5 fills;
4. names from ``TORCHPLUG_PLUGINS=a,b``, in that order;
5. the ``plugins`` argument (names, objects, modules), in the order given.

pluggy calls implementations of one hook in reverse registration order (``tryfirst`` and
``trylast`` aside), so the plugin registered last runs first: a user's ``plugins=[...]``
object overrides an autoloaded plugin, and the built-in defaults answer only when no plugin
did. An entry point selected twice (say by ``TORCHPLUG_PLUGINS`` and ``plugins=``) is loaded
and registered once, at its first position.

Blocking (``TORCHPLUG_BLOCK_PLUGINS=a,b`` or ``blocked=[...]``, i.e. ``Trainer(blocked_plugins=)``)
skips an autoload entry point without importing it; selecting a blocked name explicitly is an
error, as is selecting a plugin whose ``Requires-Dist`` on torchplug excludes this version.

Every step notes what it left out and why in ``pm.skipped`` (autoload disabled, blocked, a role
already filled by a selected plugin, a duplicate selection), and every record says which step
chose it (``PluginRecord.via``): :mod:`torchplug.plan` reports both.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import pluggy

from torchplug import defaults, discovery, hookspecs
from torchplug._validation import check_arguments, label, near_miss, object_origin, signature, unknown_hook_message
from torchplug.discovery import BLOCK_ENV, DISABLE_AUTOLOAD_ENV, PLUGINS_ENV, EntryPointInfo
from torchplug.errors import (
    PluginConflictError,
    PluginValidationError,
)
from torchplug.hookspecs import CHAINED_HOOKS
from torchplug.plugin import Plugin, Role
from torchplug.selection import (
    ROLES,
    Decision,
    Selected,
    Source,
    blocked_by,
    dedupe,
    load_entry_point,
    role_of,
    select,
    source_of,
    unique,
)

__all__ = [
    "BLOCK_ENV",
    "CHAINED_HOOKS",
    "DEFAULTS_NAME",
    "DISABLE_AUTOLOAD_ENV",
    "PLUGINS_ENV",
    "Decision",
    "PluginManager",
    "PluginRecord",
    "get_plugin_manager",
    "load_entry_point",
    "role_of",
]

DEFAULTS_NAME = "torchplug.defaults"

@dataclass(frozen=True)
class PluginRecord:
    """A registered plugin and where it came from."""

    name: str
    plugin: object
    source: Source
    entry_point: EntryPointInfo | None = None
    #: the selection step that chose it: ``"plugins="``, ``TORCHPLUG_PLUGINS``, ``"autoload"``,
    #: ``"precision shorthand"``, ``"strategy shorthand"`` or ``"builtin"``
    via: str = ""

    @property
    def role(self) -> Role | None:
        return role_of(self.plugin)

    def describe(self) -> str:
        if self.entry_point is not None:
            ep = self.entry_point
            return f"'{self.name}' (entry point {ep.value}, distribution {ep.dist_name} {ep.dist_version})"
        return f"'{self.name}' ({object_origin(self.plugin)})"


class PluginManager(pluggy.PluginManager):
    """A pluggy manager for project ``torchplug`` with the hookspecs added.

    Beyond pluggy it registers methods of :class:`Plugin` subclasses named like a hook without
    a decorator, rejects unknown hooks and misspelled method names at registration (naming
    the plugin, the hook and the signature), leaves no trace of a plugin that failed
    validation, and keeps a :class:`PluginRecord` of where each plugin came from.
    """

    def __init__(self) -> None:
        super().__init__("torchplug")
        self.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        #: what the selection steps of :func:`get_plugin_manager` left out, in the order decided
        self.skipped: list[Decision] = []
        #: how autoload was decided: ``"Trainer argument"``, ``"environment variable"`` or ``"default"``
        self.autoload_source = "default"
        self._pending_record: tuple[Source, EntryPointInfo | None, str] | None = None

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None:
            hook_name = opts.get("specname") or name
            if hook_name not in hookspecs.HOOK_NAMES:
                raise PluginValidationError(unknown_hook_message(plugin, name, hook_name))
            check_arguments(plugin, name, hook_name)
            if hook_name in CHAINED_HOOKS and (opts.get("wrapper") or opts.get("hookwrapper")):
                raise PluginValidationError(
                    f"Plugin {label(plugin)} ({object_origin(plugin)}): hook {hook_name!r} is chained "
                    f"(each implementation receives the previous one's result) and cannot be a wrapper: "
                    f"{signature(plugin, name)}. Drop wrapper=True/hookwrapper=True."
                )
            return opts
        if not isinstance(plugin, Plugin) or name.startswith("_"):
            return None
        # A Plugin subclass: a method named like a hook implements it, decorator or not.
        static = inspect.getattr_static(type(plugin), name, None)
        if static is None or getattr(Plugin, name, None) is static:
            return None
        is_method = inspect.isfunction(static) or isinstance(static, (staticmethod, classmethod))
        if name in hookspecs.HOOK_NAMES:
            if is_method and name in getattr(plugin, "__dict__", {}):
                raise PluginValidationError(
                    f"Plugin {label(plugin)} ({object_origin(plugin)}) sets an instance attribute "
                    f"{name!r} that hides its hook method {name!r}: rename the attribute (e.g. '_{name}')."
                )
            if not is_method:
                raise PluginValidationError(
                    f"Plugin {label(plugin)} ({object_origin(plugin)}) defines {name!r} as a "
                    f"{type(static).__name__}, but {name!r} is a hook: implement it as a method, "
                    f"or rename the attribute (e.g. '_{name}')."
                )
            check_arguments(plugin, name, name)
            return cast(pluggy.HookimplOpts, {})
        if is_method and near_miss(name):
            raise PluginValidationError(unknown_hook_message(plugin, name, name))
        return None

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin``; errors name the plugin, hook and signature, and a plugin that
        fails validation leaves the manager unchanged."""
        source, entry_point, via = self._pending_record or (source_of(plugin), None, "register")
        self._pending_record = None
        try:
            registered = super().register(plugin, name)
        except (pluggy.PluginValidationError, PluginValidationError) as exc:
            # Older pluggy releases register before they validate: leave no half-registered plugin.
            if self.is_registered(plugin):
                self.unregister(plugin)
            if isinstance(exc, PluginValidationError):
                raise
            origin = entry_point.describe() if entry_point else object_origin(plugin)
            raise PluginValidationError(
                f"Invalid hook implementation in plugin {origin}:\n{exc}\n"
                f"The hooks and their arguments are documented in torchplug.hookspecs."
            ) from exc
        if registered is not None:
            self.records.append(PluginRecord(registered, plugin, source, entry_point, via))
        return registered

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any | None:
        removed = super().unregister(plugin, name)
        self.records[:] = [rec for rec in self.records if rec.plugin is not removed]
        return removed

    def register_plugin(self, plugin: object, name: str, source: Source,
                        entry_point: EntryPointInfo | None = None, via: str = "register") -> PluginRecord:
        """:meth:`register` with the record of where the plugin came from."""
        self._pending_record = (source, entry_point, via)
        try:
            self.register(plugin, name=name)
        finally:
            self._pending_record = None
        return self.record(name)

    def register_before_plugins(self, plugin: object, name: str) -> None:
        """Register ``plugin`` (the user's module hooks, :mod:`torchplug.modulehooks`) as if it had
        come right after the built-in defaults: pluggy calls it after every other plugin, as
        Lightning calls a module's hooks after its callbacks'. The others are re-registered in
        their order (their validation runs again; it passed before)."""
        later = [rec for rec in self.records if rec.source != "builtin"]
        for rec in later:
            super().unregister(rec.plugin)
        self.records[:] = [rec for rec in self.records if rec.source == "builtin"]
        try:
            self.register_plugin(plugin, name, "training module")
        finally:
            for rec in later:
                self.register_plugin(rec.plugin, rec.name, rec.source, rec.entry_point)

    def record(self, name: str) -> PluginRecord:
        for rec in self.records:
            if rec.name == name:
                return rec
        raise KeyError(name)

    def role_holders(self, role: Role) -> list[PluginRecord]:
        return [rec for rec in self.records if rec.role == role]

    def check_roles(self) -> None:
        """Raise :class:`PluginConflictError` if two plugins hold one role."""
        for role in ROLES:
            holders = self.role_holders(role)
            if len(holders) > 1:
                listed = " and ".join(rec.describe() for rec in holders)
                shorthand = "precision=/amp_backend=" if role == "precision" else "accelerator=/strategy=/devices="
                raise PluginConflictError(
                    f"Two {role} plugins are selected: {listed}. At most one {role} plugin can be "
                    f"active. Choose one: keep only one of them in plugins= (a plugin object you pass "
                    f"replaces the default that {shorthand} picks), remove one from TORCHPLUG_PLUGINS, "
                    f"or block an entry point with TORCHPLUG_BLOCK_PLUGINS=<name>."
                )


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
    blocked = list(blocked)
    blocked_set = set(blocked) | discovery.blocked_names(env)
    pm = PluginManager()
    if autoload is None:
        autoload = not discovery.autoload_disabled(env)
        pm.autoload_source = "environment variable" if DISABLE_AUTOLOAD_ENV in env else "default"
    else:
        pm.autoload_source = "Trainer argument"

    pm.register_plugin(defaults, DEFAULTS_NAME, "builtin", via="builtin")
    selected: list[Selected] = []
    # Filtered by name from metadata: a disabled or blocked plugin is never imported.
    for ep in discovery.installed_plugins():
        if not ep.autoload:
            continue
        if not autoload:
            how = (f"{DISABLE_AUTOLOAD_ENV}=1" if pm.autoload_source == "environment variable"
                   else "autoload_plugins=False")
            pm.skipped.append(Decision(ep.name, "autoload", f"autoload disabled ({how})", ep))
        elif ep.name in blocked_set:
            pm.skipped.append(Decision(ep.name, "autoload", f"blocked ({blocked_by(ep.name, blocked, env)})", ep))
        else:
            selected.append(Selected(ep.name, None, "autoload", ep, via="autoload"))
    explicit = [select(name, blocked_set, via=PLUGINS_ENV) for name in discovery.split_names(env.get(PLUGINS_ENV, ""))]
    explicit += [select(item, blocked_set, via="plugins=") for item in plugins]
    selected = dedupe(selected + explicit, pm.skipped)
    for sel in selected:
        sel.load()
    filled = {role_of(sel.plugin): sel for sel in selected if role_of(sel.plugin) is not None}
    chosen = {(sel.entry_point.group, sel.entry_point.name) for sel in selected if sel.entry_point}
    role_picks = []
    for role, name in (role_defaults or {}).items():
        via = f"{role} shorthand"
        if role in filled:
            holder = filled[role]
            pm.skipped.append(Decision(name, via, f"role {role} filled by '{holder.name}' (selected by {holder.via})",
                                       role=role))
            continue
        pick = select(name, blocked_set, via=f"the {role} shorthand")
        pick.via = via
        if pick.entry_point is not None and (pick.entry_point.group, pick.entry_point.name) in chosen:
            pm.skipped.append(Decision(name, via, "already selected by name", pick.entry_point, role))
            continue  # already selected by name (a plugin without a role attribute)
        pick.load()
        role_picks.append(pick)
    n_autoload = sum(sel.source == "autoload" for sel in selected)
    ordered = dedupe(selected[:n_autoload] + role_picks + selected[n_autoload:], pm.skipped)
    used: set[str] = {DEFAULTS_NAME}
    for sel in ordered:
        pm.register_plugin(sel.plugin, unique(sel.name, used), sel.source, sel.entry_point, sel.via)
        if sel.source in ("object", "module") and not isinstance(sel.plugin, Plugin) \
                and not pm.get_hookcallers(sel.plugin):
            # Almost always a mistake (plugins=[model], another framework's callback): it would
            # silently change nothing. A Plugin subclass may legitimately only claim a role.
            raise PluginValidationError(
                f"plugins= got {label(sel.plugin)} ({object_origin(sel.plugin)}), which implements no "
                "torchplug hook. Pass an instance of a torchplug.Plugin subclass, a module with "
                "@torchplug.hookimpl functions, or an installed plugin's name (see `torchplug plugins`)."
            )
    pm.check_roles()
    return pm


