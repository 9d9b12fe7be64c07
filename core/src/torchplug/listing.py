"""``torchplug plugins``: what is installed, from metadata only; ``--check`` imports each one.

Listing reads distribution metadata (:mod:`torchplug.discovery`) and imports no plugin module,
so a broken or slow plugin cannot break or slow it. ``--check`` does import every plugin that
is not blocked, registers it on a scratch manager, reports its hooks and role, and then builds a
``Trainer(plugins=[<the plugin>])`` as a user selecting it would, so that the plugin's own
``check_configuration`` runs: a plugin this machine cannot run (apex without NVIDIA apex or
without CUDA, say) is reported as refused, with the Trainer's reason. It exits 1 if any plugin
failed or was refused. ``--json`` gives the same as JSON, with the interpreter and environment
prefix (which environment was listed is the first question when a plugin "is not found").
``--requirements`` prints the plugin distributions as pip requirement lines (as JSON with
``--json``). In every ``--json`` mode stdout carries the JSON alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torchplug import discovery
from torchplug.discovery import EntryPointInfo

__all__ = ["PluginStatus", "add_parser", "check", "collect", "environment", "main", "requirements", "run"]


@dataclass
class PluginStatus:
    """One installed plugin entry point and whether a Trainer would load it."""

    entry_point: EntryPointInfo
    status: str  # ok | incompatible | blocked | autoload-disabled | conflict
    reason: str | None = None
    #: filled by ``--check``
    checked: bool = False
    ok: bool | None = None
    hooks: list[str] = field(default_factory=list)
    role: str | None = None
    error: str | None = None
    error_traceback: str | None = None
    #: why ``Trainer(plugins=[plugin])`` refuses it (its ``check_configuration``), or None
    refused: str | None = None

    @property
    def label(self) -> str:
        return f"{self.status} ({self.reason})" if self.reason else self.status

    def as_dict(self) -> dict[str, Any]:
        ep = self.entry_point
        data: dict[str, Any] = {
            "name": ep.name,
            "group": ep.group,
            "value": ep.value,
            "distribution": ep.dist_name,
            "version": ep.dist_version,
            "requires": ep.core_requirement,
            "metadata_path": ep.dist_path,
            "status": self.status,
            "reason": self.reason,
        }
        if self.checked:
            data["check"] = {"ok": self.ok, "hooks": self.hooks, "role": self.role,
                             "error": self.error, "traceback": self.error_traceback, "refused": self.refused}
        return data


def collect(env: Mapping[str, str] | None = None, refresh: bool = False) -> list[PluginStatus]:
    """Every installed plugin with its status, from metadata only (nothing is imported)."""
    blocked = discovery.blocked_names(env)
    autoload_off = discovery.autoload_disabled(env)
    eps = discovery.installed_plugins(refresh=refresh)
    providers: dict[tuple[str, str], list[str]] = {}
    for ep in eps:
        providers.setdefault((ep.group, ep.name), []).append(ep.dist_name)
    statuses = []
    for ep in eps:
        others = [d for d in providers[(ep.group, ep.name)] if d != ep.dist_name]
        incompatible = ep.incompatibility()
        if ep.name in blocked:
            item = PluginStatus(ep, "blocked", discovery.BLOCK_ENV)
        elif incompatible:
            item = PluginStatus(ep, "incompatible", incompatible)
        elif others:
            item = PluginStatus(ep, "conflict", "also provided by " + ", ".join(others))
        elif ep.autoload and autoload_off:
            item = PluginStatus(ep, "autoload-disabled", f"{discovery.DISABLE_AUTOLOAD_ENV}=1")
        else:
            item = PluginStatus(ep, "ok")
        statuses.append(item)
    return statuses


def check(item: PluginStatus) -> None:
    """Import one plugin, register it on a scratch manager and record its hooks and role; then
    build a Trainer with it and record the Trainer's refusal, if any, or the error.

    Never raises (``KeyboardInterrupt`` aside): a plugin that fails in any way, even by calling
    ``sys.exit`` on import, is reported as failed."""
    from torchplug.errors import MisconfigurationError, PluginError
    from torchplug.manager import PluginManager, load_entry_point, role_of

    item.checked = True
    try:
        # A plugin that prints on import must not corrupt `--check --json` on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            plugin = load_entry_point(item.entry_point)
        pm = PluginManager()
        pm.register_plugin(plugin, item.entry_point.name, "entry point", item.entry_point)
        item.hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        item.role = role_of(plugin)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a broken plugin must not break the listing
        _record_error(item, exc)
        return
    try:
        with contextlib.redirect_stdout(sys.stderr), _without_env("TORCHPLUG_PLUGINS"):
            trainer_accepts(plugin)
    except KeyboardInterrupt:
        raise
    except (MisconfigurationError, PluginError) as exc:
        item.ok = False
        item.refused = f"{type(exc).__name__}: {exc}"
        return
    except BaseException as exc:
        _record_error(item, exc)
        return
    item.ok = True


def trainer_accepts(plugin: object) -> None:
    """Build the Trainer a user selecting ``plugin`` by name gets (nothing else loaded, no
    files written): the plugin's ``check_configuration`` runs and raises what it refuses."""
    from torchplug.trainer import Trainer

    Trainer(plugins=[plugin], autoload_plugins=False, logger=False, enable_checkpointing=False,
            enable_progress_bar=False)


@contextlib.contextmanager
def _without_env(name: str) -> Any:
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


def _record_error(item: PluginStatus, exc: BaseException) -> None:
    item.ok = False
    item.error = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None:
        item.error += f"\ncaused by {type(cause).__name__}: {cause}"
    item.error_traceback = "".join(traceback.format_exception(cause or exc))


def requirements(statuses: list[PluginStatus]) -> list[str]:
    """``dist==version`` for each plugin distribution, de-duplicated and sorted by name."""
    pins = {(s.entry_point.dist_name, s.entry_point.dist_version) for s in statuses}
    return [f"{name}=={version}" for name, version in sorted(pins, key=lambda p: (p[0].lower(), p[1]))]


def environment() -> dict[str, Any]:
    from torchplug import __version__

    return {
        "torchplug": __version__,
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "prefix": sys.prefix,
        "autoload_disabled": discovery.autoload_disabled(),
        "blocked": sorted(discovery.blocked_names()),
    }


def format_table(statuses: list[PluginStatus]) -> str:
    headers = ("NAME", "GROUP", "DISTRIBUTION", "VERSION", "STATUS")
    rows = [(s.entry_point.name, s.entry_point.group, s.entry_point.dist_name, s.entry_point.dist_version, s.label)
            for s in statuses]
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers) - 1)]
    lines = []
    for row in [headers, *rows]:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)


def format_check(statuses: list[PluginStatus]) -> str:
    lines = []
    for s in statuses:
        ep = s.entry_point
        head = f"{ep.name} ({ep.group}, {ep.dist_name} {ep.dist_version}):"
        if not s.checked:
            lines.append(f"{head} not imported ({s.label})")
        elif s.ok:
            role = f"role {s.role}, " if s.role else ""
            lines.append(f"{head} ok, {role}hooks: {', '.join(s.hooks) or 'none'}")
        elif s.refused:
            lines.append(f"{head} REFUSED by a Trainer on this machine\n    " + s.refused.replace("\n", "\n    "))
        else:
            lines.append(f"{head} FAILED\n    " + (s.error or "").replace("\n", "\n    "))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    statuses = collect()
    if args.requirements:
        env = environment()
        if args.json:
            print(json.dumps({**env, "requirements": requirements(statuses)},
                             indent=2 if sys.stdout.isatty() else None))
            return 0
        print(f"# torchplug plugins in {env['prefix']} (torchplug {env['torchplug']})")
        for line in requirements(statuses):
            print(line)
        return 0
    failed = False
    if args.check:
        for item in statuses:
            if item.status != "blocked":  # blocking means "never import this"
                check(item)
        failed = any(s.checked and not s.ok for s in statuses)
    if args.json:
        # indented for a terminal; compact (C encoder, ~3x faster) for programs
        print(json.dumps({**environment(), "plugins": [s.as_dict() for s in statuses]},
                         indent=2 if sys.stdout.isatty() else None))
    else:
        env = environment()
        where = f"python {env['python']} (prefix {env['prefix']}), torchplug {env['torchplug']}"
        if not statuses:
            hints = ", ".join(f'pip install "torchplug[{extra}]"' for extra in discovery.FIRST_PARTY.values())
            print(f"No torchplug plugins installed for {where}.\nFirst-party plugins: {hints}")
        else:
            print(f"{len(statuses)} plugin entry point(s) for {where}\n")
            print(format_check(statuses) if args.check else format_table(statuses))
    return 1 if failed else 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register the ``plugins`` subcommand on the ``torchplug`` command's subparsers."""
    from torchplug.cli import plain_text

    parser = subparsers.add_parser(
        "plugins",
        help="list installed plugins (metadata only; --check imports them)",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="import each plugin (blocked ones excepted), report its hooks and role, and whether a "
                           "Trainer with it accepts it on this machine, or the error; exit 1 if any failed or was "
                           "refused")
    mode.add_argument("--requirements", action="store_true",
                      help="print the plugin distributions as pip requirement lines (dist==version)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of a table (with --requirements: a JSON list); stdout holds only it")
    parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m torchplug.listing``: the ``plugins`` subcommand alone (no other CLI imports)."""
    parser = argparse.ArgumentParser(prog="torchplug plugins")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["plugins", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())

