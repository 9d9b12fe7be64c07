"""Test support: real plugin distributions, built as wheels and installed into a fresh venv,
and fake ``*.dist-info`` trees for fast in-process discovery tests.

The venv: ``python -m venv --without-pip`` plus a ``.pth`` line that puts a *filtered* view of
the dev environment's site-packages (symlinks to everything but torchplug and its plugins)
after the venv's own. torch is shared without copying it (``--system-site-packages`` would
expose the base interpreter's packages, which lack torch), and the venv holds exactly the
core wheel and the test plugins, whatever else the dev environment has installed. pip runs
with ``--no-deps --no-index``: it never resolves (let alone downloads) torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORE = HERE.parents[1]
PROJECTS = ("tp_autolog", "tp_named", "tp_broken", "tp_old", "tp_rival")
#: the test plugins' top-level modules
MODULES = PROJECTS
_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")


@dataclass
class PluginEnv:
    """A fresh venv with the core wheel and the test plugin wheels installed."""

    root: Path
    python: Path
    site_packages: Path
    wheels: list[Path]
    build_seconds: float

    @property
    def torchplug_cmd(self) -> list[str]:
        return [str(self.python.parent / "torchplug")]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment: no TORCHPLUG_* or PYTHONPATH from the caller."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TORCHPLUG_", "TP_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["OMP_NUM_THREADS"] = "1"
        env.update(extra or {})
        return env

    def run(self, args: list[str], extra_env: Mapping[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=self.env(extra_env), capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def scenario(self, name: str, extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Run ``scenarios.py <name>`` with the venv's python; return its JSON result."""
        proc = self.run([str(self.python), str(self.root / "driver" / "scenarios.py"), name], extra_env)
        if proc.returncode != 0:
            raise AssertionError(f"scenario {name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result


_ENV: PluginEnv | None = None


def plugin_env(root: Path) -> PluginEnv:
    """Build the environment once per test session (the first caller's ``root`` is used)."""
    global _ENV
    if _ENV is None:
        _ENV = build_plugin_env(root)
    return _ENV


def build_plugin_env(root: Path) -> PluginEnv:
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    # Build from copies: the source tree stays free of build/ and *.egg-info, and concurrent
    # builds elsewhere cannot collide with this one.
    sources = root / "src"
    core_copy = sources / "core"
    shutil.copytree(CORE / "src", core_copy / "src", ignore=_IGNORE)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CORE / name, core_copy / name)
    for project in PROJECTS:
        shutil.copytree(HERE / project, sources / project, ignore=_IGNORE)
    wheelhouse = root / "wheels"
    wheelhouse.mkdir()
    projects = [core_copy, *(sources / p for p in PROJECTS)]
    subprocess.run([sys.executable, "-c", _BUILD, str(wheelhouse), *map(str, projects)],
                   check=True, capture_output=True, text=True)
    wheels = sorted(wheelhouse.glob("*.whl"))
    assert len(wheels) == 1 + len(PROJECTS), wheels

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    shared = _shared_site(root / "shared-site")
    (Path(purelib) / "_torchplug_tests_shared.pth").write_text(str(shared) + "\n")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", "-q", *(str(w) for w in wheels))

    driver = root / "driver"
    driver.mkdir()
    shutil.copy2(HERE / "scenarios.py", driver / "scenarios.py")
    return PluginEnv(root, python, Path(purelib), wheels, time.perf_counter() - start)


# PEP 517 build_wheel of each project's declared backend (all setuptools.build_meta), in one
# process: pip wheel would start two backend subprocesses per project (~1.5 s each here).
_BUILD = """
import os, sys, tomllib
import setuptools.build_meta as backend
out = sys.argv[1]
for project in sys.argv[2:]:
    with open(os.path.join(project, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["build-system"]["build-backend"] == "setuptools.build_meta", project
    os.chdir(project)
    backend.build_wheel(out)
"""


def _pip(*args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def _shared_site(farm: Path) -> Path:
    """Symlinks to the dev environment's site-packages, minus torchplug and its plugins (and
    the .pth files that would put their source trees on sys.path)."""
    farm.mkdir()
    site = Path(sysconfig.get_path("purelib"))
    entries = list(site.iterdir())
    # Under nox, torch comes from a folder a .pth file adds (noxfile.py), not from purelib.
    torch_spec = importlib.util.find_spec("torch")
    torch_site = Path(torch_spec.origin).parent.parent if torch_spec and torch_spec.origin else site
    if torch_site != site:
        names = {entry.name for entry in entries}
        entries += [entry for entry in torch_site.iterdir() if entry.name not in names]
    for entry in entries:
        lowered = entry.name.lower()
        if "torchplug" in lowered or lowered.endswith(".pth") or lowered.startswith(("__editable__", "_tp_")):
            continue
        (farm / entry.name).symlink_to(entry)
    return farm


# ------------------------------------------------------------------------------------------
# Fake installed distributions (metadata + modules on a sys.path directory)
# ------------------------------------------------------------------------------------------


def make_fake_dist(
    site: Path,
    name: str,
    version: str = "1.0",
    entry_points: Mapping[str, Mapping[str, str]] | None = None,
    modules: Mapping[str, str] | None = None,
    requires: list[str] | None = None,
) -> Path:
    """Write ``<name>-<version>.dist-info`` (METADATA, entry_points.txt, RECORD) and module
    files under ``site``, as pip would; return the dist-info folder."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {req}" for req in requires or []]
    (dist_info / "METADATA").write_text("\n".join(metadata) + "\n\nA fake distribution for tests.\n")
    if entry_points:
        text = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n"
                       for group, items in entry_points.items())
        (dist_info / "entry_points.txt").write_text(text)
    for module, source in (modules or {}).items():
        path = site / (module.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(site).parents:
            if parent != Path(".") and not (site / parent / "__init__.py").exists():
                (site / parent / "__init__.py").write_text("")
        path.write_text(source)
    (dist_info / "RECORD").write_text("")
    return dist_info


IMPORT_MARKER = '''
import os
if os.environ.get("TP_TEST_IMPORT_LOG"):
    with open(os.environ["TP_TEST_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(__name__ + "\\n")
'''
