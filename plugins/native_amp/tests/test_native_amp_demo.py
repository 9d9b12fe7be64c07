"""``torchplug demo --precision bf16`` and ``--precision 16`` on the CPU, as a user runs them:
a subprocess of the installed ``torchplug`` command, through the ``native_amp`` entry point."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(importlib.util.find_spec("torchplug.demo") is None, reason="torchplug.demo is not written yet"),
    pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                       reason='the demo needs the demo extra: pip install "torchplug[demo]"'),
]


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_demo_trains_with_native_amp(tmp_path: Path, precision: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("TORCHPLUG_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torchplug", "demo", "--precision", precision, "--max-steps", "60",
         "--root-dir", str(tmp_path), "--no-progress-bar", "--json"],
        capture_output=True, text=True, env=env, timeout=170, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["precision"] == precision
    assert result["plugins"] == ["native_amp"]
    assert result["global_step"] == 60
    assert result["val_acc"] > 0.5  # 60 steps of a 10-class problem: well above chance
    ckpt = torch.load(tmp_path / result["checkpoint"], weights_only=True)
    if precision == "16":
        assert set(ckpt["native_amp"]) == {"scale", "growth_factor", "backoff_factor", "growth_interval",
                                           "_growth_tracker"}
    else:
        assert "native_amp" not in ckpt
