"""Packaging: ``pip install "torchplug[apex]"`` installs torchplug-apex and never a distribution
named ``apex`` (on PyPI that name is an unrelated 2013 Pyramid toolkit).

The fast test reads every pyproject.toml of the repository. The ``slow`` test builds the real
core and apex wheels, resolves and installs ``torchplug[apex]`` from that folder into a fresh
venv (torch shared from this interpreter, ``--no-index``: nothing is downloaded), and runs the
installed plugin there, where no apex exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[3]
PLUGIN = REPO / "plugins" / "apex_plugin"
CORE = REPO / "core"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")


def _requirements(pyproject: Path) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    texts = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        texts += extra
    return [Requirement(t) for t in texts]


def test_no_pyproject_depends_on_a_distribution_named_apex() -> None:
    pyprojects = [CORE / "pyproject.toml", *sorted((REPO / "plugins").glob("*/pyproject.toml"))]
    assert PLUGIN / "pyproject.toml" in pyprojects
    for pyproject in pyprojects:
        names = {canonicalize_name(r.name) for r in _requirements(pyproject)}
        assert "apex" not in names, pyproject
    core = tomllib.loads((CORE / "pyproject.toml").read_text())["project"]
    assert core["optional-dependencies"]["apex"] == ["torchplug-apex>=0.1,<0.2"]
    plugin = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    assert plugin["dependencies"] == ["torchplug>=0.1,<0.2", "torch>=2.3"]
    assert plugin["entry-points"]["torchplug.plugins"] == {"apex": "torchplug_apex:ApexPlugin"}


# PEP 517 build_wheel with each project's own backend (setuptools), in one process.
_BUILD = """
import os, sys
import setuptools.build_meta as backend
out = sys.argv[1]
for project in sys.argv[2:]:
    os.chdir(project)
    backend.build_wheel(out)
"""

_IN_VENV = """
import importlib.metadata as md, json, warnings
import torchplug, torchplug_apex
from torchplug import discovery
names = sorted(d.metadata["Name"].lower() for d in md.distributions())
ep = discovery.find("apex")
try:
    torchplug.Trainer(precision=16, amp_backend="apex", autoload_plugins=False)
    error = None
except torchplug_apex.ApexUnavailableError as exc:
    error = [exc.reason, str(exc)]
print(json.dumps({"names": names, "entry_point": ep.value if ep else None,
                  "dist": ep.dist_name if ep else None, "plugin_file": torchplug_apex.__file__, "error": error}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchplug_apex_extra_installs_no_apex_distribution(tmp_path: Path) -> None:
    from torchplug.testing.venv import create

    sources = tmp_path / "src"
    for name, project in (("core", CORE), ("apex_plugin", PLUGIN)):
        shutil.copytree(project / "src", sources / name / "src", ignore=_IGNORE)
        for file in ("pyproject.toml", "README.md"):
            shutil.copy2(project / file, sources / name / file)
    wheels = tmp_path / "dist"
    wheels.mkdir()
    subprocess.run([sys.executable, "-c", _BUILD, str(wheels), str(sources / "core"), str(sources / "apex_plugin")],
                   check=True, capture_output=True, text=True, timeout=180)
    built = sorted(p.name for p in wheels.glob("*.whl"))
    assert [n.split("-")[0] for n in built] == ["torchplug", "torchplug_apex"], built

    python = create(tmp_path / "venv", share=("torch", "pluggy", "packaging", "tqdm"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TORCHPLUG") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--find-links", str(wheels)]

    report = tmp_path / "report.json"
    dry = subprocess.run([*pip, "--dry-run", "--report", str(report), "torchplug[apex]"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    planned = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert planned == {"torchplug", "torchplug-apex"}  # torch & co. are already there (shared)

    done = subprocess.run([*pip, "torchplug[apex]"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = subprocess.run([str(python), "-c", _IN_VENV], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    names = {canonicalize_name(n) for n in result["names"]}
    assert "apex" not in names
    assert {"torchplug", "torchplug-apex", "torch"} <= names
    assert Path(result["plugin_file"]).is_relative_to(tmp_path / "venv")  # the wheel, not the source tree
    assert (result["entry_point"], result["dist"]) == ("torchplug_apex:ApexPlugin", "torchplug-apex")
    reason, message = result["error"]
    assert reason == "not_installed"
    assert "NVIDIA apex is not installed" in message
    assert "git checkout 25.05" in message
