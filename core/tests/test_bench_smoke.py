"""The bench scripts run: each cheap one in its smallest mode, and bench/run.py end to end on
one part. No timing assertions: these prove the suite works, the numbers come from
``python bench/run.py`` (see bench/README.md)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(last)
    return result


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _check_rows(rows: list[dict[str, Any]]) -> None:
    assert rows
    for row in rows:
        assert row["metric"]
        assert row["unit"]
        assert row["hand"] > 0
        assert row["torchplug"] > 0
        assert row["ratio"] > 0


@pytest.mark.timeout(60)
def test_amp_overhead_quick_tiny() -> None:
    result = _result(_run(str(BENCH / "amp_overhead.py"), "--quick", "--sizes", "tiny", "--no-lightning"))
    if not _installed("torchplug-native-amp"):
        assert "skipped" in result
        return
    assert result["sizes"]["tiny"]["plugins"] == ["native_amp"]
    _check_rows(result["rows"])


@pytest.mark.timeout(90)
def test_callbacks_overhead_quick() -> None:
    if not _installed("torchplug-tensorboard"):
        pytest.skip("torchplug-tensorboard is not installed (pip install -e plugins/tensorboard_plugin)")
    result = _result(_run(str(BENCH / "callbacks_overhead.py"), "--quick"))
    _check_rows(result["rows"])


@pytest.mark.timeout(90)
def test_module_hooks_overhead_quick() -> None:
    result = _result(_run(str(BENCH / "module_hooks_overhead.py"), "--quick"))
    assert result["stats"]["torchplug"]["median"] > 0
    _check_rows(result["rows"])


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
                    reason="valgrind is not installed")
def test_instruction_counts_are_exact() -> None:
    """The calibration case runs the same loop as both variants: the counts per step agree to
    0.1% (--quick's few steps leave a few instructions in ~18,000 of spread, 0.02% seen in CI),
    against the ±10% of a wall-clock repetition here."""
    result = _result(_run(str(BENCH / "instructions.py"), "--quick"))
    counts = result["cases"]["calibration"]["per_step"]
    assert counts["hand"] > 1000
    assert abs(counts["torchplug"] / counts["hand"] - 1) < 1e-3
    _check_rows(result["rows"])


@pytest.mark.timeout(90)
def test_first_step_quick_one_process() -> None:
    result = _result(_run(str(BENCH / "first_step.py"), "--quick", "--no-ddp"))
    stamps = result["groups"]["one"]["stamps_median_s"]
    for kind in ("hand", "torchplug"):
        assert 0 < stamps[kind]["child_started"] < stamps[kind]["torch_imported"] < stamps[kind]["first_step"]
    _check_rows(result["rows"])


@pytest.mark.timeout(90)
@pytest.mark.skipif(not _installed("torchplug-ddp"), reason="torchplug-ddp is not installed")
def test_ddp_step_quick() -> None:
    result = _result(_run(str(BENCH / "ddp_step.py"), "--quick"))
    assert result["sizes"]["tiny"]["ms_per_step"]["torchplug"]["median"] > 0
    _check_rows(result["rows"])


@pytest.mark.timeout(150)
@pytest.mark.skipif(not _installed("torchplug-fsdp"), reason="torchplug-fsdp is not installed")
def test_sharded_step_quick() -> None:
    result = _result(_run(str(BENCH / "sharded_step.py"), "--quick", timeout=150))
    assert result["groups"]["fsdp"]["ms_per_step"]["torchplug"]["median"] > 0
    assert result["groups"]["zero"]["ms_per_step"]["torchplug"]["median"] > 0
    ddp, zero, fsdp = (result["state_bytes_per_rank"][s] for s in ("ddp", "ddp_zero", "fsdp"))
    assert sum(zero) == ddp[0]  # ZeRO-1 splits DDP's Adam state between the ranks
    assert sum(fsdp) == ddp[0]
    _check_rows(result["rows"])


@pytest.mark.timeout(90)
@pytest.mark.skipif(not _installed("torchplug-ddp"), reason="torchplug-ddp is not installed")
def test_handshake_quick() -> None:
    result = _result(_run(str(BENCH / "handshake.py"), "--quick"))
    assert [len(rank["handshake_ms"]) for rank in result["ranks"]] == [3, 3]
    assert result["handshake_ms_median"] > 0
    _check_rows(result["rows"])


@pytest.mark.timeout(90)
def test_run_py_writes_json_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "results" / "bench.json"
    proc = _run(str(BENCH / "run.py"), "--quick", "--only", "loop_overhead,hook_dispatch", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert report["environment"]["versions"]["torch"]
    assert report["parts"]["hook_dispatch"]["status"] == "ok"
    assert report["parts"]["loop_overhead"]["status"] == "ok"
    _check_rows(report["parts"]["loop_overhead"]["rows"])
    assert [r["part"] for r in report["rows"]].count("hook_dispatch") == 2
    result = report["parts"]["hook_dispatch"]["result"]
    assert set(result["cases"]) == {"defaults", "one_plugin"}
    for case in result["cases"].values():
        assert case["plain_us"] > 0
        assert case["facade_us"] > 0
        assert case["pluggy_us"] > 0
    _check_rows(report["parts"]["hook_dispatch"]["rows"])
    assert "hook dispatch per step" in proc.stdout
    assert "QUICK" in proc.stdout


def test_run_py_lists_every_script_it_runs() -> None:
    proc = _run(str(BENCH / "run.py"), "--list", timeout=30)
    assert proc.returncode == 0
    listed = [line.split()[1] for line in proc.stdout.splitlines()]
    assert "bench/hook_dispatch.py" in listed
    assert "bench/first_step.py" in listed
    for script in listed:  # the parts of this suite's own scripts exist
        name = script.removeprefix("bench/")
        if name in ("amp_overhead.py", "ddp_step.py", "first_step.py", "hook_dispatch.py"):
            assert (BENCH / name).exists()
