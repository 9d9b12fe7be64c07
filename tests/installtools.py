"""Helpers of the integration tests: copy and build projects into wheels."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_project(source: Path, target: Path) -> Path:
    """Copy a project without build leftovers: building in the source tree would write
    ``build/`` and ``*.egg-info`` there."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache"))
    return target


def build_wheel(project: Path, wheel_dir: Path) -> Path:
    """Build ``project`` (copied first) into ``wheel_dir`` with this interpreter's setuptools."""
    work = copy_project(project, wheel_dir.parent / f"src-{project.name}")
    before = set(wheel_dir.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(wheel_dir), str(work)], check=True, capture_output=True, text=True)
    (built,) = set(wheel_dir.glob("*.whl")) - before
    return built
