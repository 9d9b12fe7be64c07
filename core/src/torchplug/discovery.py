"""Find installed plugins from distribution metadata, without importing any of them.

Two entry-point groups:

* ``torchplug.plugins``: named plugins, loaded only when selected by name
  (``Trainer(plugins=["ddp"])``, ``precision=16``, ``TORCHPLUG_PLUGINS=a,b``);
* ``torchplug.autoload``: plugins every Trainer loads (loggers, org-wide policy), unless
  ``TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1`` or blocked by name.

The scan reads each ``*.dist-info/entry_points.txt`` on ``sys.path`` once per process
(the standard library re-reads and re-parses every file on each ``entry_points()`` call,
~100 µs per installed distribution); only distributions that mention ``torchplug`` are parsed.
The first distribution of a name on ``sys.path`` wins, as with ``importlib.metadata``.
"""

from __future__ import annotations

import configparser
import functools
import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass

PLUGINS_GROUP = "torchplug.plugins"
AUTOLOAD_GROUP = "torchplug.autoload"
GROUPS = (PLUGINS_GROUP, AUTOLOAD_GROUP)

#: First-party plugin names and the extra that installs each.
FIRST_PARTY = {"ddp": "ddp", "native_amp": "native-amp", "apex": "apex"}


@dataclass(frozen=True)
class EntryPointInfo:
    """One plugin entry point of an installed distribution (read from metadata only)."""

    name: str
    group: str
    value: str
    dist_name: str
    dist_version: str
    dist_path: str

    @property
    def autoload(self) -> bool:
        return self.group == AUTOLOAD_GROUP

    def load(self) -> object:
        """Import the entry point's target; a ``module:Class`` target is instantiated."""
        target = importlib.metadata.EntryPoint(self.name, self.value, self.group).load()
        return target() if isinstance(target, type) else target

    def core_requirement(self) -> str | None:
        """The ``torchplug`` requirement the distribution declares (its plugin API range)."""
        return _core_requirement(self.dist_path)

    def describe(self) -> str:
        return f"'{self.name}' ({self.group} = {self.value!r}) from {self.dist_name} {self.dist_version}"


def installed_plugins(refresh: bool = False) -> list[EntryPointInfo]:
    """Every plugin entry point installed, sorted by group then name (the load order)."""
    if refresh:
        _scan.cache_clear()
    return list(_scan(tuple(sys.path)))


def find(name: str, group: str = PLUGINS_GROUP) -> EntryPointInfo | None:
    for info in installed_plugins():
        if info.name == name and info.group == group:
            return info
    return None


def install_hint(name: str) -> str | None:
    """The pip line that installs a first-party plugin, or None for other names."""
    extra = FIRST_PARTY.get(name)
    return f'pip install "torchplug[{extra}]"' if extra else None


@functools.cache
def _scan(path: tuple[str, ...]) -> tuple[EntryPointInfo, ...]:
    seen: set[str] = set()
    found: list[EntryPointInfo] = []
    for entry in path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # not a directory (zip files, missing paths)
            continue
        for dirname in names:
            if not dirname.endswith((".dist-info", ".egg-info")):
                continue
            stem = dirname.rsplit(".", 1)[0]
            dist_key, _, version = stem.partition("-")
            dist_key = _normalize(dist_key)
            if dist_key in seen:
                continue
            seen.add(dist_key)
            meta_dir = os.path.join(entry, dirname)
            try:
                with open(os.path.join(meta_dir, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            if "[torchplug." not in text:
                continue
            found.extend(_parse(text, meta_dir, version.partition("-")[0]))
    found.sort(key=lambda info: (info.group, info.name, info.dist_name))
    return tuple(found)


def _parse(text: str, meta_dir: str, version: str) -> list[EntryPointInfo]:
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep names' case
    try:
        parser.read_string(text)
    except configparser.Error:
        return []
    dist_name, meta_version = _name_and_version(meta_dir)
    return [
        EntryPointInfo(name, group, value.strip(), dist_name, meta_version or version, meta_dir)
        for group in GROUPS
        if parser.has_section(group)
        for name, value in parser.items(group)
    ]


def _name_and_version(meta_dir: str) -> tuple[str, str]:
    name = version = ""
    for line in _metadata_lines(meta_dir):
        if line.startswith("Name:"):
            name = line[5:].strip()
        elif line.startswith("Version:"):
            version = line[8:].strip()
        if name and version:
            break
    return name or os.path.basename(meta_dir).partition("-")[0], version


def _core_requirement(meta_dir: str) -> str | None:
    for line in _metadata_lines(meta_dir):
        if line.startswith("Requires-Dist:"):
            req = line[14:].strip()
            if _normalize(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]) == "torchplug":
                return req
        elif not line.strip():  # the headers end at the first blank line
            break
    return None


def _metadata_lines(meta_dir: str) -> list[str]:
    for filename in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(meta_dir, filename), encoding="utf-8") as f:
                return f.read().splitlines()
        except OSError:
            continue
    return []


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()
