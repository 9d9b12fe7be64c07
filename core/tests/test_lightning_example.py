"""examples/lightning_style.py: a Lightning 1.1 style script that runs with only the import swapped."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "lightning_style.py"
IMPORT = "import torchplug.lightning as pl"


def test_the_script_differs_from_a_pytorch_lightning_one_only_in_the_import() -> None:
    text = SCRIPT.read_text()
    assert text.count(IMPORT) == 1
    as_lightning = text.replace(IMPORT, "import pytorch_lightning as pl")
    assert "torchplug" not in as_lightning
    for name in ("optimizer_idx", "pl.LightningDataModule", "prog_bar=True", "def validation_epoch_end",
                 "trainer.test(", "self.save_hyperparameters()"):
        assert name in text


@pytest.mark.timeout(180)
def test_the_script_trains_and_tests_without_any_warning(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--max_epochs", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stderr
    result = ast.literal_eval(done.stdout.strip().splitlines()[-1])  # print(trainer.test(...))
    assert isinstance(result, list)
    assert len(result) == 1
    assert set(result[0]) == {"test_acc"}
    assert 0.6 < result[0]["test_acc"] <= 1.0  # 10 classes: chance is 0.1
    assert "DATALOADER:0 TEST RESULTS" in done.stdout
    lowered = done.stderr.lower()
    for word in ("warning", "refus", "error", "deprecat"):
        assert word not in lowered, done.stderr
    assert (tmp_path / "torchplug_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
