"""Integration tests of the installed distributions (torchplug and its first-party plugins).

Run them in any environment that has the packages installed. ``nox -s wheels`` installs the four
wheels into a fresh venv and sets ``TORCHPLUG_TEST_INSTALLED=1``: then the run refuses to start
unless the code under test comes from that venv's site-packages (never this source tree, never
an editable install), and no ``src`` folder of the repository is on ``sys.path``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest
from installtools import REPO, build_wheel

INSTALLED_ENV = "TORCHPLUG_TEST_INSTALLED"
#: A folder with wheels already built (``nox -s wheels`` passes dist/): tests install those.
WHEELHOUSE_ENV = "TORCHPLUG_WHEELHOUSE"
PACKAGES = {"torchplug": "torchplug", "torchplug_ddp": "torchplug-ddp",
            "torchplug_native_amp": "torchplug-native-amp", "torchplug_apex": "torchplug-apex",
            "torchplug_fsdp": "torchplug-fsdp", "torchplug_compile": "torchplug-compile"}
SRC_DIRS = [REPO / "core" / "src", *sorted(REPO.glob("plugins/*/src")), *sorted(REPO.glob("examples/*/src"))]


def _origin(module: str) -> str:
    try:
        return str(Path(importlib.import_module(module).__file__ or "?").resolve().parent)
    except ImportError:
        return "not installed"


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"{module}: {_origin(module)}" for module in PACKAGES]


def installed_problems() -> list[str]:
    """Why the code under test is not the installed distributions ('' when it is)."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    problems = []
    for module, dist in PACKAGES.items():
        try:
            path = Path(importlib.import_module(module).__file__ or "").resolve()
        except ImportError as exc:
            problems.append(f"{module} is not importable ({exc})")
            continue
        if not path.is_relative_to(site):
            problems.append(f"{module} comes from {path}, not from {site}")
        if any(path.is_relative_to(src) for src in SRC_DIRS):
            problems.append(f"{module} comes from the source tree ({path})")
        direct_url = importlib.metadata.distribution(dist).read_text("direct_url.json")
        if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
            problems.append(f"{dist} is an editable install")
    for entry in sys.path:
        resolved = Path(entry or ".").resolve()
        if any(resolved == src or resolved.is_relative_to(src) for src in SRC_DIRS):
            problems.append(f"the source folder {resolved} is on sys.path")
    return problems


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(INSTALLED_ENV) == "1":
        problems = installed_problems()
        if problems:
            raise pytest.UsageError(f"{INSTALLED_ENV}=1 but the code under test is not the installed wheels:\n  "
                                    + "\n  ".join(problems))


@pytest.fixture(scope="session")
def core_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The torchplug wheel: from ``TORCHPLUG_WHEELHOUSE`` when set, else built from core/."""
    house = os.environ.get(WHEELHOUSE_ENV)
    if house:
        wheels = sorted(Path(house).glob("torchplug-*.whl"))
        assert wheels, f"{WHEELHOUSE_ENV}={house} has no torchplug wheel"
        return wheels[-1]
    wheel_dir = tmp_path_factory.mktemp("wheels") / "out"
    wheel_dir.mkdir()
    return build_wheel(REPO / "core", wheel_dir)
