"""Find installed plugins from distribution metadata, without importing any of them.

Two entry-point groups:

* ``torchplug.plugins``: named plugins, loaded only when selected by name
  (``Trainer(plugins=["ddp"])``, ``precision=16``, ``TORCHPLUG_PLUGINS=a,b``);
* ``torchplug.autoload``: plugins every Trainer loads (loggers, org-wide policy), unless
  ``TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1`` or blocked by name.

A plugin declares the core it was written for with its ``Requires-Dist: torchplug ...``
metadata line, so compatibility is decided here too, before anything is imported.

The scan lists each directory on ``sys.path`` once and reads only ``entry_points.txt`` of
each ``*.dist-info``/``*.egg-info`` (as bytes, skipped unless it mentions ``[torchplug.``);
``METADATA`` is read for matching distributions only. The standard library instead builds a
``Distribution`` and parses every file on each ``entry_points()`` call, ~100 µs per installed
distribution. The result is cached per process and ``sys.path``. As with
``importlib.metadata``, the first distribution of a name on ``sys.path`` wins.

This module imports neither torch nor pluggy: ``torchplug plugins`` needs nothing else.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

PLUGINS_GROUP = "torchplug.plugins"
AUTOLOAD_GROUP = "torchplug.autoload"
GROUPS = (PLUGINS_GROUP, AUTOLOAD_GROUP)

DISABLE_AUTOLOAD_ENV = "TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "TORCHPLUG_PLUGINS"
BLOCK_ENV = "TORCHPLUG_BLOCK_PLUGINS"

#: First-party plugin names and the extra of ``torchplug`` that installs each.
FIRST_PARTY = {"ddp": "ddp", "native_amp": "native-amp", "apex": "apex", "tensorboard": "tensorboard", "fsdp": "fsdp",
               "ddp_zero": "ddp", "compile": "compile"}

_MARK = b"[torchplug."
_EP_FILE = os.sep + "entry_points.txt"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class EntryPointInfo:
    """One plugin entry point of an installed distribution (read from metadata only)."""

    name: str
    group: str
    value: str
    dist_name: str
    dist_version: str
    dist_path: str
    #: the distribution's ``Requires-Dist`` on torchplug (its plugin API range), if any
    core_requirement: str | None = None

    @property
    def autoload(self) -> bool:
        return self.group == AUTOLOAD_GROUP

    @property
    def module(self) -> str:
        """The module the entry point imports."""
        return self.value.partition(":")[0].strip()

    def load(self) -> object:
        """Import the entry point's target; a ``module:Class`` target is instantiated with no
        arguments (plugins read what they need from the Trainer in their hooks)."""
        target = importlib.metadata.EntryPoint(self.name, self.value, self.group).load()
        return target() if isinstance(target, type) else target

    def incompatibility(self) -> str | None:
        """Why the installed torchplug is outside the plugin's declared range, or None."""
        return incompatibility(self.core_requirement)

    def describe(self) -> str:
        return f"'{self.name}' ({self.group} = {self.value!r}) from distribution {self.dist_name} {self.dist_version}"


def installed_plugins(refresh: bool = False) -> list[EntryPointInfo]:
    """Every plugin entry point installed, sorted by group, name, then distribution.

    :param refresh: scan again (after installing or removing distributions in this process).
    """
    if refresh:
        _scan.cache_clear()
    return list(_scan(tuple(sys.path)))


def find(name: str) -> EntryPointInfo | None:
    """The entry point a plugin name selects: ``torchplug.plugins`` first, then
    ``torchplug.autoload`` (so ``TORCHPLUG_PLUGINS=x`` enables an autoload plugin ``x`` when
    autoload is off).

    :raises PluginConflictError: two distributions provide the name in the same group.
    """
    for group in GROUPS:
        matches = [ep for ep in installed_plugins() if ep.name == name and ep.group == group]
        if len(matches) > 1:
            from torchplug.errors import PluginConflictError

            listed = " and ".join(f"{ep.dist_name} {ep.dist_version} ({ep.value})" for ep in matches)
            raise PluginConflictError(
                f"Plugin name '{name}' ({group}) is provided by {listed}. Uninstall one of them "
                f"(pip uninstall <distribution>)."
            )
        if matches:
            return matches[0]
    return None


def install_hint(name: str) -> str | None:
    """The pip line that installs a first-party plugin, or None for other names."""
    extra = FIRST_PARTY.get(name)
    return f'pip install "torchplug[{extra}]"' if extra else None


def incompatibility(requirement: str | None) -> str | None:
    """Why ``requirement`` (a ``torchplug`` requirement string) excludes this torchplug."""
    if requirement is None:
        return None
    from torchplug import __version__

    match = _REQUIREMENT.fullmatch(requirement.partition(";")[0].strip())
    specifier = match.group("spec").strip().strip("()").replace(" ", "") if match else None
    allowed = _plain_contains(specifier, __version__) if specifier is not None else None
    if allowed is None:  # anything beyond plain release numbers: packaging decides (~0.2 s to import)
        from packaging.requirements import InvalidRequirement, Requirement

        try:
            req = Requirement(requirement)
        except InvalidRequirement:
            return f"unreadable requirement {requirement!r}"
        specifier = str(req.specifier)
        allowed = req.specifier.contains(__version__, prereleases=True)
    if not allowed:
        return f"requires torchplug{specifier}, installed is torchplug {__version__}"
    return None


_REQUIREMENT = re.compile(r"[A-Za-z0-9._-]+\s*(?:\[[^\]]*\])?\s*(?P<spec>.*)")
_CLAUSE = re.compile(r"(?P<op>~=|==|!=|<=|>=|<|>)(?P<version>\d+(?:\.\d+)*)")


def _release(version: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(?:\.\d+)*", version):
        return None
    release = tuple(int(part) for part in version.split("."))
    while len(release) > 1 and release[-1] == 0:  # PEP 440: 1.0 == 1.0.0
        release = release[:-1]
    return release


def _plain_contains(specifier: str, version: str) -> bool | None:
    """PEP 440 ``specifier.contains(version)`` when every version is a plain release number
    (``>=0.1,<0.2``, ``~=1.4``); None for anything else (pre/post/dev, wildcards, ``===``)."""
    have = _release(version)
    if have is None:
        return None
    for clause in filter(None, specifier.split(",")):
        match = _CLAUSE.fullmatch(clause)
        if match is None:
            return None
        op, text = match.group("op"), match.group("version")
        want = _release(text)
        if want is None:
            return None
        ok = {
            "==": have == want, "!=": have != want, "<": have < want, "<=": have <= want,
            ">": have > want, ">=": have >= want,
        }.get(op)
        if op == "~=":
            parts = text.split(".")
            if len(parts) < 2:
                return None
            prefix = tuple(int(part) for part in parts[:-1])  # unnormalised: ~=0.0.1 means ==0.0.*
            ok = have >= want and (have + (0,) * len(prefix))[: len(prefix)] == prefix
        if not ok:
            return False
    return True


def autoload_disabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD`` turns autoload off."""
    env = os.environ if env is None else env
    return env.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in _TRUE


def blocked_names(env: Mapping[str, str] | None = None) -> set[str]:
    """The plugin names ``TORCHPLUG_BLOCK_PLUGINS`` blocks."""
    env = os.environ if env is None else env
    return set(split_names(env.get(BLOCK_ENV, "")))


def split_names(value: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [part.strip() for part in value.split(",") if part.strip()]


@functools.cache
def _scan(path: tuple[str, ...]) -> tuple[EntryPointInfo, ...]:
    # The hot loop runs once per installed distribution: plain string joins and os.open/os.read
    # (no buffered file object) keep it near the cost of the system calls themselves.
    seen: set[str] = set()
    found: list[EntryPointInfo] = []
    for entry in path:
        directory = entry or "."
        try:
            names = os.listdir(directory)
        except OSError:  # not a directory: zip files, missing paths
            continue
        prefix = directory + os.sep
        for dirname in names:
            if dirname.endswith(".dist-info"):
                stem = dirname[:-10]
            elif dirname.endswith(".egg-info"):
                stem = dirname[:-9]
            else:
                continue
            dist_key = _normalize(stem.partition("-")[0])
            if dist_key in seen:
                continue
            seen.add(dist_key)
            meta_dir = prefix + dirname
            try:
                fd = os.open(meta_dir + _EP_FILE, os.O_RDONLY)
            except OSError:  # no entry points, or an .egg-info file
                continue
            try:
                data = os.read(fd, 65536)
                if len(data) == 65536:  # rare: a distribution with very many entry points
                    data += b"".join(iter(functools.partial(os.read, fd, 65536), b""))
            except OSError:
                continue
            finally:
                os.close(fd)
            if _MARK in data:
                found.extend(_entry_points(data.decode("utf-8", "replace"), meta_dir, stem))
    found.sort(key=lambda info: (info.group, info.name, info.dist_name))
    return tuple(found)


def _entry_points(text: str, meta_dir: str, stem: str) -> list[EntryPointInfo]:
    # entry_points.txt is an ini file: "[group]" headers, "name = value" lines, # and ; comments.
    groups: dict[str, list[tuple[str, str]]] = {}
    section: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line[0] == "[" and line[-1] == "]":
            group = line[1:-1].strip()
            section = groups.setdefault(group, []) if group in GROUPS else None
        elif section is not None:
            name, sep, value = line.partition("=")
            if sep and name.strip() and value.strip():
                section.append((name.strip(), value.strip()))
    if not groups:
        return []
    dist_name, version, requirement = _read_metadata(meta_dir)
    if not dist_name:
        dist_name, _, version = stem.partition("-")
    return [
        EntryPointInfo(name, group, value, dist_name, version, meta_dir, requirement)
        for group, items in groups.items()
        for name, value in items
    ]


def _read_metadata(meta_dir: str) -> tuple[str, str, str | None]:
    """Name, version and the ``torchplug`` requirement from the METADATA headers."""
    name = version = ""
    requirement: str | None = None
    for filename in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(meta_dir, filename), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip():  # the headers end at the first blank line
                        break
                    key, _, value = line.partition(":")
                    value = value.strip()
                    if key == "Name":
                        name = value
                    elif key == "Version":
                        version = value
                    elif key == "Requires-Dist" and _requirement_is_core(value):
                        requirement = value
            break
        except OSError:
            continue
    return name, version, requirement


def _requirement_is_core(requirement: str) -> bool:
    spec, _, marker = requirement.partition(";")
    if "extra" in marker:  # an optional dependency (e.g. a test extra) does not bind the core
        return False
    return _normalize(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0]) == "torchplug"


def _normalize(name: str) -> str:
    """PEP 503 normalisation (runs of ``-_.`` → ``_``, lower case) of a distribution name."""
    key = name.lower().replace("-", "_").replace(".", "_")
    return re.sub("_+", "_", key) if "__" in key else key
