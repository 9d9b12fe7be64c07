"""Errors of spawned ``devices=2`` runs come back named, first, and short.

A script without ``if __name__ == "__main__":`` calls fit again in every worker (spawn
re-imports the main script there); the run stops with the two-line fix instead of pages of
multiprocessing tracebacks. A worker that fails before torchplug's worker code runs is said to
have failed while starting, not "without a Python exception".
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchplug import discovery

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(discovery.find("ddp") is None, reason="needs torchplug-ddp")]

MODEL = """
import multiprocessing
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchplug import Trainer, TrainingModule


class Tiny(TrainingModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=4)
trainer = Trainer(devices=2, max_epochs=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                  autoload_plugins=False)
"""


def run_script(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHPLUG_")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=110)


def test_a_missing_main_guard_is_named_with_the_fix(tmp_path: Path) -> None:
    proc = run_script(tmp_path, MODEL + "trainer.fit(Tiny(), loader)\nprint('trained')\n")
    assert proc.returncode == 1
    err = proc.stderr
    last = err.strip().splitlines()[-1]
    assert "bootstrapping phase" not in err  # multiprocessing's own RuntimeError never surfaces
    assert "without a Python exception" not in err
    assert err.count("Traceback (most recent call last)") == 1, err  # the launcher's, not one per worker
    assert len(err.splitlines()) < 45, err
    script = tmp_path / "train.py"
    line = script.read_text().splitlines().index("trainer.fit(Tiny(), loader)") + 1
    assert f"WorkerFailedError: DDPPlugin (torchplug-ddp): {script}, line {line}: trainer.fit(Tiny(), loader) " \
           "calls Trainer.fit when the script is imported." in err, err
    assert '    if __name__ == "__main__":\n        trainer.fit(Tiny(), loader)\n' in err
    assert last.startswith("  then rank ")
    assert last.endswith(") raised the same torchplug_ddp._spawn.MainGuardError"), last


def test_with_the_guard_it_trains(tmp_path: Path) -> None:
    body = MODEL + ('if __name__ == "__main__":\n    trainer.fit(Tiny(), loader)\n'
                    '    print("trained", trainer.global_step)\n')
    proc = run_script(tmp_path, body)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "trained 2"  # 4 batches over 2 ranks


def test_a_worker_failing_while_it_starts_is_reported_as_such(tmp_path: Path) -> None:
    """The workers' import of the main script raises (here: on purpose, only in a child)."""
    body = ("import multiprocessing\nif multiprocessing.current_process().name != 'MainProcess':\n"
            "    raise RuntimeError('boom while a worker imports the script')\n" + MODEL
            + 'if __name__ == "__main__":\n    trainer.fit(Tiny(), loader)\n')
    proc = run_script(tmp_path, body)
    assert proc.returncode == 1
    assert "RuntimeError: boom while a worker imports the script" in proc.stderr  # the worker's own traceback
    last = proc.stderr.strip().splitlines()
    summary = next(line for line in last if line.startswith("torchplug_ddp._spawn.WorkerFailedError"))
    assert "exited with code 1 before torchplug's worker code could report an exception" in summary
    assert "imported the main script again (its traceback is on stderr above)" in summary
    assert "without a Python exception" not in proc.stderr
