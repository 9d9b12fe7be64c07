"""The resolved plan: which plugin answers each duty, what lost and why, where each setting came from.

:func:`build_plan` reads a :class:`~torchplug.Trainer`'s plugin manager (its records and the
selection steps it noted in ``pm.skipped``) and arguments, and returns a :class:`Plan` before any
work starts: ``trainer.plan``, ``torchplug plan``. Everything in it is plain data (JSON through
:meth:`Plan.to_dict`) and deterministic: no object ids, addresses, paths or timestamps, and
order kept only where it means something (registration order is call order). The same install
and arguments give the same :attr:`Plan.fingerprint` on every machine; the ranks of a run
compare it (:mod:`torchplug.handshake`) and checkpoints store the plan (:mod:`torchplug.provenance`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from torchplug import discovery, hookspecs
from torchplug.discovery import BLOCK_ENV, DISABLE_AUTOLOAD_ENV, PLUGINS_ENV
from torchplug.hookspecs import CHAINED_HOOKS

if TYPE_CHECKING:
    from torchplug.manager import PluginManager, PluginRecord
    from torchplug.trainer import Trainer

#: The version of the plan's JSON layout (``Plan.to_dict()["format"]``).
PLAN_FORMAT = 1
DEFAULTS = "torchplug.defaults"

#: The duty each hook serves, in the order the plan lists them.
DUTIES: Mapping[str, tuple[str, ...]] = {
    "launch": ("launch",),
    "configuration": ("check_configuration",),
    "environment": ("setup_environment", "world_size", "global_rank", "all_gather_object", "root_device",
                    "teardown_environment"),
    "precision": ("connect_precision", "configure_apex", "unscale_gradients"),
    "strategy/wrapping": ("configure_ddp", "get_model_from_plugin", "block_backward_sync", "data_parallel_group"),
    "batch transform": ("on_before_forward",),
    "forward context": ("forward_context",),
    "backward": ("backward",),
    "clip": ("clip_gradients",),
    "optimizer step": ("optimizer_step",),
    "collectives": ("barrier", "broadcast", "reduce"),
    "checkpoint state": ("collect_state", "save_sharded_state", "load_sharded_state", "on_save_checkpoint",
                         "on_load_checkpoint"),
    "events (loggers, callbacks)": ("on_after_setup_optimizers", "on_fit_start", "on_train_epoch_start",
                                    "on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end",
                                    "on_validation_end", "on_fit_end", "on_exception"),
}
_DUTY_OF = {hook: duty for duty, hooks in DUTIES.items() for hook in hooks}

#: Settings that decide the numerics or the parallel layout of a run: they are fingerprinted
#: (every rank must agree) and compared on resume. Paths, logging and loop lengths are not.
NUMERIC_SETTINGS = ("accelerator", "strategy", "precision", "amp_backend", "amp_level", "accumulate_grad_batches",
                    "gradient_clip_val", "gradient_clip_norm_type", "deterministic", "on_nonfinite_loss")
#: Trainer arguments left out of the plan: they differ between machines and change no plugin.
_UNPLANNED = ("default_root_dir",)
_VIA = {
    "builtin": "built-in default",
    "autoload": "entry-point autoload",
    PLUGINS_ENV: f"environment variable {PLUGINS_ENV}",
    "plugins=": "Trainer argument plugins=",
}
_ROLE_DEFAULT = {"precision": "no precision plugin: the built-in fp32", "strategy": "no strategy plugin: one process"}


@dataclass(frozen=True)
class PlanPlugin:
    """One registered plugin."""

    name: str
    #: the distribution that provides it (``None``: not from an installed distribution)
    distribution: str | None
    version: str | None
    #: ``"entry point <module:attr>"``, ``"passed object"``, ``"passed module"`` or ``"built-in"``
    origin: str
    #: the class (objects) or module it is
    object: str
    role: str | None
    #: the selection step that chose it, e.g. ``"Trainer argument plugins="``
    selected_by: str


@dataclass(frozen=True)
class Alternative:
    """A plugin that was considered and lost, and why."""

    name: str
    reason: str
    selected_by: str
    distribution: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class RolePlan:
    """Who fills a role (``precision``, ``strategy``): a plugin, or the built-in defaults."""

    role: str
    winner: str
    why: str
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True)
class HookPlan:
    """A hook's implementations in pluggy's call order. For a firstresult hook the first one
    answers; each later one is asked only when every one before it returned ``None``."""

    hook: str
    duty: str
    convention: str
    calls: tuple[str, ...]


@dataclass(frozen=True)
class Setting:
    """A resolved setting and where it came from: ``"Trainer argument"``, ``"environment
    variable"``, ``"entry-point autoload"`` or ``"default"``."""

    name: str
    value: Any
    source: str


@dataclass(frozen=True)
class Plan:
    """What a Trainer will run, decided before any work (see the module docstring)."""

    torchplug: str
    torch: str
    plugins: tuple[PlanPlugin, ...]
    roles: tuple[RolePlan, ...]
    #: every plugin a selection step left out, in the order decided
    skipped: tuple[Alternative, ...]
    hooks: tuple[HookPlan, ...]
    settings: tuple[Setting, ...]

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (what ``torchplug plan --json`` prints and checkpoints store);
        a new dict on every call."""
        data: dict[str, Any] = json.loads(self._json)
        return {"format": PLAN_FORMAT, "fingerprint": self.fingerprint, **data}

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of :func:`fingerprint_view` as canonical JSON."""
        return fingerprint_of(json.loads(self._json))

    @functools.cached_property
    def _json(self) -> str:
        # The plan is frozen: serialise it once (asdict alone costs ~1 ms).
        return json.dumps(asdict(self))

    def owner(self, hook: str) -> str | None:
        """The implementation pluggy asks first for ``hook`` (``None``: nobody implements it)."""
        calls = self.hook(hook).calls
        return calls[0] if calls else None

    def hook(self, name: str) -> HookPlan:
        return next(h for h in self.hooks if h.hook == name)

    def role(self, name: str) -> RolePlan:
        return next(r for r in self.roles if r.role == name)

    def plugin(self, name: str) -> PlanPlugin:
        return next(p for p in self.plugins if p.name == name)

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def table(self) -> str:
        """The plan as text for a terminal (``torchplug plan``)."""
        lines = [f"torchplug {self.torchplug}, torch {self.torch}; plan fingerprint {self.fingerprint[:16]}", "",
                 "plugins (registration order; the last registered is asked first):"]
        for p in self.plugins:
            dist = f"{p.distribution} {p.version}" if p.distribution else "no distribution"
            role = f", role {p.role}" if p.role else ""
            lines.append(f"  {p.name:<22} {dist} ({p.origin}{role}); selected by {p.selected_by}")
        lines += ["", "roles:"]
        for r in self.roles:
            lines.append(f"  {r.role:<10} {r.winner}: {r.why}")
            lines += [f"             lost: {a.name}: {a.reason}" for a in r.alternatives]
        other = [a for a in self.skipped if not any(a in r.alternatives for r in self.roles)]
        if other:
            lines += ["", "not loaded:"]
            lines += [f"  {a.name} ({a.selected_by}): {a.reason}" for a in other]
        lines += ["", "duties (hook: implementations in call order; firstresult: the first answers unless it "
                      "returns None):"]
        for duty in DUTIES:
            lines.append(f"  {duty}")
            for h in self.hooks:
                if h.duty == duty:
                    calls = ", ".join(h.calls) if h.calls else "no implementation"
                    lines.append(f"    {h.hook:<26} [{h.convention}] {calls}")
        lines += ["", "settings:"]
        lines += [f"  {s.name:<26} {s.value!r} ({s.source})" for s in self.settings]
        return "\n".join(lines)


def fingerprint_view(plan: Mapping[str, Any]) -> dict[str, Any]:
    """What every rank and machine must agree on, from a :meth:`Plan.to_dict`: the core and
    torch versions, the plugins (names, distributions, versions, roles, what they are), the
    role winners, each hook's implementations and :data:`NUMERIC_SETTINGS`. Not how a plugin
    was selected (by name or as a passed object: the same class runs), nor paths or the rank.
    A view given back is returned as it is."""
    if isinstance(plan.get("roles"), Mapping):
        return dict(plan)
    return {
        "torchplug": plan.get("torchplug"),
        "torch": plan.get("torch"),
        "plugins": [{k: p.get(k) for k in ("name", "distribution", "version", "object", "role")}
                    for p in plan.get("plugins", [])],
        "roles": {r["role"]: r["winner"] for r in plan.get("roles", [])},
        "hooks": {h["hook"]: h["calls"] for h in plan.get("hooks", [])},
        "settings": {s["name"]: s["value"] for s in plan.get("settings", []) if s["name"] in NUMERIC_SETTINGS},
    }


def fingerprint_of(plan: Mapping[str, Any]) -> str:
    canonical = json.dumps(fingerprint_view(plan), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Building the plan
# ----------------------------------------------------------------------------------------------


def build_plan(trainer: Trainer) -> Plan:
    """The plan of ``trainer`` (its plugin manager and arguments); reads metadata only, imports nothing."""
    import torch

    from torchplug import __version__

    pm = trainer.pm
    shorthands = _shorthands(trainer)
    plugins = tuple(_plan_plugin(rec, shorthands) for rec in pm.records)
    skipped = tuple(
        Alternative(d.name, d.reason, _selected_by(d.via, shorthands),
                    d.entry_point.dist_name if d.entry_point else None,
                    d.entry_point.dist_version if d.entry_point else None)
        for d in pm.skipped
    )
    roles = tuple(_role_plan(role, pm, plugins, skipped, shorthands) for role in ("precision", "strategy"))
    return Plan(torchplug=__version__, torch=torch.__version__.split("+")[0], plugins=plugins, roles=roles,
                skipped=skipped, hooks=_hook_plans(pm), settings=_settings(trainer))


def _plan_plugin(rec: PluginRecord, shorthands: Mapping[str, str]) -> PlanPlugin:
    from torchplug import __version__

    obj = rec.plugin
    what = obj.__name__ if isinstance(obj, types.ModuleType) else f"{_module(type(obj))}.{type(obj).__qualname__}"
    if rec.source == "builtin":
        return PlanPlugin(rec.name, "torchplug", __version__, "built-in", what, None, _selected_by("builtin", {}))
    ep = rec.entry_point
    dist: str | None
    version: str | None
    if ep is not None:
        dist, version, origin = ep.dist_name, ep.dist_version, f"entry point {ep.value}"
    else:
        dist, version = _distribution_of(obj)
        origin = "passed module" if rec.source == "module" else "passed object"
    return PlanPlugin(rec.name, dist, version, origin, what, rec.role, _selected_by(rec.via, shorthands))


def _module(cls: type) -> str:
    # Spawned workers import the launching script as __mp_main__: the same class, the same plan.
    return "__main__" if cls.__module__ == "__mp_main__" else cls.__module__


def _distribution_of(obj: object) -> tuple[str | None, str | None]:
    """The installed plugin distribution whose package holds ``obj``'s class or module, from
    the metadata scan (``importlib.metadata.packages_distributions`` costs ~0.2 s per process)."""
    module = obj.__name__ if isinstance(obj, types.ModuleType) else type(obj).__module__
    top = module.partition(".")[0]
    if top == "torchplug":
        from torchplug import __version__

        return "torchplug", __version__
    for ep in discovery.installed_plugins():
        if ep.module.partition(".")[0] == top:
            return ep.dist_name, ep.dist_version
    return None, None


def _shorthands(trainer: Trainer) -> dict[str, str]:
    """The Trainer argument behind each role shorthand, as the user wrote it."""
    args = trainer._init_args
    found: dict[str, str] = {}
    if trainer.precision != "32":
        parts = [f"precision={args['precision']!r}"]
        if args.get("amp_backend") != "native":
            parts.append(f"amp_backend={args['amp_backend']!r}")
        found["precision"] = ", ".join(parts)
    for name in ("strategy", "accelerator"):
        value = args.get(name)
        if value is not None and value == trainer.strategy:
            found["strategy"] = f"{name}={value!r}"
            break
    else:
        many = [f"{k}={args[k]!r}" for k in ("devices", "num_nodes") if isinstance(args.get(k), int) and args[k] > 1]
        if many:
            found["strategy"] = ", ".join(many)
    return found


def _selected_by(via: str, shorthands: Mapping[str, str]) -> str:
    if via.endswith(" shorthand"):
        role = via[: -len(" shorthand")]
        return f"Trainer argument {shorthands.get(role, role)} ({role} shorthand)"
    return _VIA.get(via, via)


def _role_plan(role: str, pm: PluginManager, plugins: Sequence[PlanPlugin], skipped: Sequence[Alternative],
               shorthands: Mapping[str, str]) -> RolePlan:
    lost = [a for d, a in zip(pm.skipped, skipped) if d.role == role or d.via == f"{role} shorthand"]
    holder = next((p for p in plugins if p.role == role), None)
    if holder is None:
        return RolePlan(role, DEFAULTS, _ROLE_DEFAULT[role], tuple(lost))
    why = f"{holder.origin}, selected by {holder.selected_by}"
    return RolePlan(role, holder.name, why, tuple(lost))


def _hook_plans(pm: PluginManager) -> tuple[HookPlan, ...]:
    plans = []
    for name in hookspecs.HOOK_NAMES:
        caller = getattr(pm.hook, name)
        firstresult = bool(caller.spec and caller.spec.opts.get("firstresult"))
        convention = "chained" if name in CHAINED_HOOKS else "firstresult" if firstresult else "all called"
        calls = tuple(impl.plugin_name for impl in reversed(caller.get_hookimpls()))  # pluggy's call order
        plans.append(HookPlan(name, _DUTY_OF.get(name, "other"), convention, calls))
    return tuple(plans)


def _settings(trainer: Trainer) -> tuple[Setting, ...]:
    from torchplug.trainer import Trainer as TrainerClass

    args = trainer._init_args
    defaults = {name: p.default for name, p in inspect.signature(TrainerClass.__init__).parameters.items()
                if p.default is not p.empty}
    resolved = {"accelerator": trainer.accelerator, "strategy": trainer.strategy, "precision": trainer.precision,
                "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}
    settings = []
    for name, default in defaults.items():
        if name in _UNPLANNED:
            continue
        given = args.get(name, default)
        source = "default" if _same(given, default) else "Trainer argument"
        if name == "strategy" and trainer.strategy is not None and args.get("strategy") is None:
            source = f"Trainer argument accelerator={args['accelerator']!r}"
        settings.append(Setting(name, _jsonable(resolved.get(name, given)), source))
    for var in (PLUGINS_ENV, BLOCK_ENV, DISABLE_AUTOLOAD_ENV):  # what get_plugin_manager read
        settings.append(Setting(var, os.environ.get(var), "environment variable" if var in os.environ else "default"))
    given = args.get("autoload_plugins")
    autoload = not discovery.autoload_disabled() if given is None else bool(given)
    settings.append(Setting("autoload (resolved)", autoload, trainer.pm.autoload_source))
    return tuple(settings)


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _jsonable(value: Any) -> Any:
    """A setting value as plain, deterministic JSON data (plugin objects by their class name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):  # accumulate_grad_batches={epoch: n}: the schedule is numerics
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__}"
    return f"{type(value).__qualname__} object"


__all__ = ["DUTIES", "NUMERIC_SETTINGS", "PLAN_FORMAT", "Alternative", "HookPlan", "Plan", "PlanPlugin", "RolePlan",
           "Setting", "build_plan", "fingerprint_of", "fingerprint_view"]
