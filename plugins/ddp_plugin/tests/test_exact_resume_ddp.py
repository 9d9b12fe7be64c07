"""Exact resume on 2 gloo ranks (DistributedSampler with shuffle, set_epoch): {step end, inside an
accumulation window, epoch end, validation end, ModelCheckpoint, SIGTERM} x {shuffle, StepLR,
accumulate 3}, and a ZeRO-1 run checkpointed mid-epoch by a plugin. Every cell is a fit resumed
from a checkpoint of the uninterrupted reference run, which it must match bit for bit (weights,
optimizer state: ZeRO's shard on each rank, schedulers), calling each epoch-end event once.

One launch of two workers runs the whole matrix (``exact_resume_support.matrix_worker``); the
one-process cells are core/tests/test_exact_resume.py.
"""

from __future__ import annotations

import json
import multiprocessing
from typing import Any

import pytest
from exact_resume_support import matrix_worker

from torchplug.testing.resume import VARIANTS

CELLS = [f"{point}-{variant}" for variant in VARIANTS
         for point in ("step", "window", "epoch_end", "validation_end", "model_checkpoint", "sigterm")
         if point != "window" or variant == "accumulate3"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("exact-resume")
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=matrix_worker, args=(rank, 2, str(out / "store"), str(out))) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(240)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((out / f"results-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cell", [*CELLS, "zero-step", "zero-epoch_end"])
def test_two_rank_resume_is_exact(matrix: list[dict[str, Any]], cell: str) -> None:
    for rank, results in enumerate(matrix):
        result = results[cell]
        assert result["differences"] == [], f"rank {rank}"
        assert result["events"] == result["expected_events"], f"rank {rank}"


@pytest.mark.timeout(300)
def test_zero_cells_compare_sharded_optimizer_state(matrix: list[dict[str, Any]]) -> None:
    # each rank holds (and compared) the momentum buffers of its own share of the parameters
    held = [results["zero-state-tensors"] for results in matrix]
    assert all(held)
    assert sum(held) == 4  # ResumeNet's 4 parameter tensors, split between the ranks
