"""The plan handshake on 2 real gloo ranks whose environments differ: rank 1's PYTHONPATH holds
another version of a small test plugin distribution. Both ranks stop with PlanMismatchError
naming rank 1 and both versions, quickly, and no process is left. (Every other 2-rank test of
this folder runs the handshake with matching plans.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

PROBE = '''
from torchplug import Plugin


class Probe(Plugin):
    plugin_name = "probe"

    def on_fit_start(self, trainer):
        pass
'''


def probe_distribution(site: Path, version: str) -> Path:
    """``torchplug-test-probe <version>`` installed into ``site`` as pip would (metadata and module)."""
    dist_info = site / f"torchplug_test_probe-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchplug-test-probe\nVersion: {version}\n"
                                        "Requires-Dist: torchplug>=0.1,<1\n\n")
    (dist_info / "entry_points.txt").write_text("[torchplug.plugins]\nprobe = probe_mod:Probe\n")
    (dist_info / "RECORD").write_text("")
    (site / "probe_mod.py").write_text(PROBE)
    return site


@pytest.mark.timeout(60)
def test_ranks_with_different_plugin_versions_stop_naming_the_rank_and_both_versions(tmp_path: Path) -> None:
    sites = [probe_distribution(tmp_path / f"site{rank}", version) for rank, version in ((0, "1.0"), (1, "1.1"))]
    base = {k: v for k, v in os.environ.items() if not k.startswith("TORCHPLUG_") and k != "PYTHONPATH"}
    store = tmp_path / "store"
    start = time.monotonic()
    procs = []
    for rank, site in enumerate(sites):
        env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(site), str(TESTS)])}
        out = tmp_path / f"r{rank}.json"
        argv = [sys.executable, str(TESTS / "handshake_script.py"), str(rank), str(store), str(out)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [proc.communicate(timeout=50) for proc in procs]
    finally:
        for proc in procs:  # never leave a rank behind, whatever failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - start
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    results = [json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["fingerprint"] != results[1]["fingerprint"]
    for result in results:
        assert result["error_type"] == "PlanMismatchError", result
        message = result["error"]
        assert "rank(s) 1 differ from rank 0" in message
        assert "plugin 'probe' (distribution torchplug-test-probe) version: 1.0 -> 1.1" in message
        assert "global_step" not in result  # stopped before training
        assert result["seconds_from_init"] < 5, result
    print(f"handshake mismatch: stopped {max(r['seconds_from_init'] for r in results):.2f} s after the process "
          f"group init; {wall:.1f} s for both processes in all")
