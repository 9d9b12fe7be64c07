"""The CLI's honest output: ``--json`` modes write JSON alone to stdout, ``--help`` is plain text.

Each command runs as a subprocess of this interpreter (``python -m torchplug``), so stdout is a
real file descriptor: spawned workers and native code write there too unless it is redirected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchplug import discovery

REST_MARKUP = ("``", ":mod:", ":class:", ":func:", ":meth:", ":data:", ":attr:", ":param", "::")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHPLUG_") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def torchplug(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torchplug", *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd, timeout=timeout)


def only_json(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """stdout is exactly one JSON object (and a newline)."""
    assert proc.stdout.endswith("\n"), proc.stdout[-500:]
    assert proc.stdout.count("\n") == 1, f"stdout holds more than the JSON:\n{proc.stdout[:3000]}"
    data: dict[str, object] = json.loads(proc.stdout)
    return data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [["plugins", "--json"], ["plugins", "--requirements", "--json"],
                                  ["plugins", "--check", "--json"]], ids=" ".join)
def test_plugins_json_modes_write_only_json(argv: list[str], tmp_path: Path) -> None:
    proc = torchplug(*argv, cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr  # --check: 1 when a plugin is refused here
    data = only_json(proc)
    assert data["python"] == sys.executable
    if "--requirements" in argv:
        assert isinstance(data["requirements"], list)
        assert all("==" in line for line in data["requirements"])
    else:
        assert isinstance(data["plugins"], list)


@pytest.mark.timeout(120)
def test_demo_json_on_two_processes_writes_only_json(tmp_path: Path) -> None:
    """Messages, the workers' output and the loss-curve line go to stderr; the summary alone to stdout."""
    if discovery.find("ddp") is None:
        pytest.skip("needs torchplug-ddp")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    proc = torchplug("demo", "--json", "--devices", "2", "--max-epochs", "1", "--hidden", "16", "--root-dir",
                     str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = only_json(proc)
    assert summary["devices"] == 2
    assert summary["plugins"] == ["ddp"]
    assert "plugins active: ddp (torchplug-ddp" in proc.stderr
    assert "loss curves: " in proc.stderr


@pytest.mark.parametrize("command", ["", "plugins", "demo", "fit", "new-plugin"])
def test_help_is_plain_text(command: str) -> None:
    proc = torchplug(*([command] if command else []), "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = [mark for mark in REST_MARKUP if mark in proc.stdout]
    assert not found, f"reST markup {found} in `torchplug {command} --help`:\n{proc.stdout}"
    if command == "fit":
        assert "default 10" in proc.stdout.replace("\n", " ")  # how many epochs it trains without --max-epochs


def test_plain_text_strips_rest() -> None:
    from torchplug.cli import plain_text

    assert plain_text("Use :class:`~torchplug.FitOutcome`, :mod:`torchplug.discovery` and ``x``\\ s.") == (
        "Use FitOutcome, torchplug.discovery and xs.")
    assert plain_text("For example::\n\n    code\n\nor ::\n") == "For example:\n\n    code\n\nor"
