"""Plan provenance: what changed between two plans, and the check on resume.

Every checkpoint stores the plan that wrote it (``checkpoint["plan"]``, ``checkpoint["world_size"]``,
see ``FitLoop.checkpoint_dict``). Resuming under a different plan warns with a readable diff
(:class:`PlanChangedWarning`); ``Trainer(resume_plan="strict")`` turns a change that alters the
numerics (precision, strategy, the precision or strategy plugin or its version) into
:class:`PlanChangedError` before any work. A checkpoint without a plan (written before plans
existed) is noted, never refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchplug.errors import PlanChangedError, PlanChangedWarning
from torchplug.plan import DEFAULTS, NUMERIC_SETTINGS, fingerprint_view
from torchplug.utils import warn_at_caller

if TYPE_CHECKING:
    from torchplug.plan import Plan

#: settings whose change alters what a resumed run computes (``resume_plan="strict"`` refuses)
STRICT_SETTINGS = ("strategy", "precision", "amp_backend", "amp_level")


@dataclass(frozen=True)
class Change:
    """One difference between two plans."""

    what: str
    old: Any
    new: Any
    #: whether it changes the numerics of the run (precision, strategy and their plugins)
    numerics: bool

    def __str__(self) -> str:
        mark = " [numerics]" if self.numerics else ""
        return f"{self.what}: {_show(self.old)} -> {_show(self.new)}{mark}"


def plan_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """What differs between two plans (``Plan.to_dict()`` data, or their :func:`fingerprint_view`),
    over what the fingerprint covers: versions, plugins, role winners, numeric settings. Hook
    call orders are left out: they follow from the plugins."""
    a, b = fingerprint_view(old), fingerprint_view(new)
    changes: list[Change] = []
    for key in ("torchplug", "torch"):
        if a[key] != b[key]:
            changes.append(Change(f"{key} version", a[key], b[key], False))
    role_plugins = set(a["roles"].values()) | set(b["roles"].values())
    before = {p["name"]: p for p in a["plugins"]}
    after = {p["name"]: p for p in b["plugins"]}
    for name in sorted(before.keys() | after.keys()):
        p, q = before.get(name), after.get(name)
        numerics = name in role_plugins and name != DEFAULTS  # a core upgrade alone is not refused
        if p is None or q is None:
            changes.append(Change(f"plugin '{name}'", _plugin_text(p), _plugin_text(q), numerics))
            continue
        for field in ("distribution", "version", "object", "role"):
            if p[field] != q[field]:
                dist = f" (distribution {q['distribution']})" if field == "version" and q["distribution"] else ""
                changes.append(Change(f"plugin '{name}'{dist} {field}", p[field], q[field], numerics))
    for role in sorted(a["roles"].keys() | b["roles"].keys()):
        if a["roles"].get(role) != b["roles"].get(role):
            changes.append(Change(f"{role} role", a["roles"].get(role), b["roles"].get(role), True))
    for name in NUMERIC_SETTINGS:
        if a["settings"].get(name) != b["settings"].get(name):
            changes.append(Change(f"setting {name}", a["settings"].get(name), b["settings"].get(name),
                                  name in STRICT_SETTINGS))
    return changes


def describe_changes(changes: Sequence[Change]) -> str:
    return "\n".join(f"  {change}" for change in changes)


def check_resume_plan(plan: Plan, checkpoint: Mapping[str, Any], path: str | os.PathLike[str], strict: bool) -> None:
    """Compare the plan stored in ``checkpoint`` with ``plan``: warn with the diff, or (``strict``)
    raise :class:`PlanChangedError` when a change alters the numerics."""
    stored = checkpoint.get("plan")
    if not isinstance(stored, Mapping):
        warn_at_caller(PlanChangedWarning(
            f"{os.fspath(path)} holds no plan (written by torchplug {checkpoint.get('torchplug_version', '?')}, "
            "before checkpoints recorded one): the plugins that wrote it cannot be compared with this run's."))
        return
    changes = plan_changes(stored, plan.to_dict())
    if not changes:
        return
    numerics = [c for c in changes if c.numerics]
    head = (f"Resuming from {os.fspath(path)}, written under another plan (plan fingerprint "
            f"{str(stored.get('fingerprint', '?'))[:16]}, now {plan.fingerprint[:16]}). What changed:\n"
            f"{describe_changes(changes)}")
    if strict and numerics:
        raise PlanChangedError(
            f"{head}\nresume_plan='strict' refuses a resume whose numerics change ({len(numerics)} change(s) marked "
            "[numerics]). Resume with the plugins, versions and precision/strategy arguments that wrote the "
            "checkpoint, or pass resume_plan='warn' to resume anyway.")
    hint = "\nResume with Trainer(resume_plan='strict') to refuse changes marked [numerics]." if numerics else ""
    warn_at_caller(PlanChangedWarning(head + hint))


def check_resume_world_size(checkpoint: Mapping[str, Any], world_size: int) -> None:
    """A resume on another number of processes: the data order and the effective batch change."""
    stored = checkpoint.get("world_size")
    if isinstance(stored, int) and stored != world_size:
        warn_at_caller(PlanChangedWarning(
            f"Resuming a checkpoint written by {stored} process(es) on {world_size}: the effective batch size and "
            "the data order per rank change."))


def _plugin_text(p: Mapping[str, Any] | None) -> str | None:
    if p is None:
        return None
    dist = f"{p['distribution']} {p['version']}" if p.get("distribution") else "no distribution"
    return f"{dist} ({p['object']})"


def _show(value: Any) -> str:
    return "(none)" if value is None else repr(value) if not isinstance(value, str) else value


__all__ = ["Change", "PlanChangedError", "PlanChangedWarning", "check_resume_plan", "check_resume_world_size",
           "describe_changes", "plan_changes"]
