"""scripts/gpu_check.py on a machine without CUDA: it refuses clearly, and its ``--allow-cpu``
dry run exercises every section's logic and writes valid JSON.

Both run the script as a subprocess with ``CUDA_VISIBLE_DEVICES=""``, so they test the CPU
behaviour on GPU machines too.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=150)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.timeout(60)
def test_without_cuda_it_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    proc = _run("--out", str(tmp_path / "gpu.json"), tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "CUDA is not available: this script checks GPU behaviour; run it on a GPU machine" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.timeout(150)
def test_allow_cpu_quick_dry_run_writes_valid_json(tmp_path: Path) -> None:
    # Default output path: ./gpu_check.json when $OUT is unset.
    proc = _run("--allow-cpu", "--quick", tmp_path=tmp_path)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "Traceback" not in proc.stderr, proc.stderr
    assert report["device"] == "cpu"
    assert report["dry_run_on_cpu"] is True
    assert report["torch"]
    assert report["date"]
    assert report["gpu"] is None
    sections = report["sections"]
    assert list(sections) == ["native_amp_dtype", "native_amp_overflow", "host_syncs", "native_amp_speed",
                              "ddp_one_rank", "apex", "apex_pytest"]
    for section in sections.values():
        assert section["status"] in ("ok", "failed", "skipped")
    # CUDA-only features say they were skipped, and why.
    assert sections["apex"]["status"] == "skipped"
    assert "CUDA" in sections["apex"]["reason"]
    assert sections["apex_pytest"]["status"] == "skipped"
    assert report["summary"]["failed"] == sum(s["status"] == "failed" for s in sections.values())
    assert proc.returncode == (1 if report["summary"]["failed"] else 0)
    assert "gpu_check" in proc.stdout
    assert "CPU DRY RUN" in proc.stdout

    if _installed("torchplug-native-amp"):
        dtype = sections["native_amp_dtype"]
        assert dtype["status"] == "ok", dtype
        assert dtype["precision=16"]["autocast_dtype_in_training_step"] == "float16"
        assert dtype["precision=bf16"]["autocast_dtype_in_training_step"] == "bfloat16"
        overflow = sections["native_amp_overflow"]
        assert overflow["status"] == "ok", overflow
        assert overflow["scale_after_skip"] == overflow["scale_before"] / 2
        syncs = sections["host_syncs"]
        assert syncs["status"] == "ok", syncs
        assert syncs["fp32"]["torchplug"] == syncs["fp32"]["hand"] == {"host_reads_per_step": 0.0}
        assert syncs["fp16"]["torchplug"] == syncs["fp16"]["hand"] == {"host_reads_per_step": 1.0}
        speed = sections["native_amp_speed"]
        assert speed["status"] == "ok", speed
        assert "strict fp32" in speed["fp32_baseline"]
        tiny = speed["timings"]["tiny/bf16"]
        assert tiny["hand"]["ms_median"] > 0
        assert tiny["torchplug"]["ms_median"] > 0
    if _installed("torchplug-ddp"):
        ddp = sections["ddp_one_rank"]
        assert ddp["status"] == "ok", ddp
        assert ddp["backend"] == "gloo"
        assert ddp["wrapped"] is False
        assert ddp["trainer_world_size"] == 1
