"""fp16 under DDP (two gloo processes) with gradient accumulation: an inf gradient on one rank
makes every rank skip the same step, because the skip is decided on all-reduced gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp
from native_amp_helpers import DDP_INF_MICRO_BATCHES, ddp_worker


def _torchplug_ddp_missing() -> str | None:
    try:
        import torchplug_ddp
    except ImportError as exc:
        return f"torchplug_ddp is not importable ({exc}); pip install -e plugins/ddp_plugin"
    if not hasattr(torchplug_ddp, "DDPPlugin"):
        return "torchplug_ddp has no DDPPlugin yet"
    return None


STRATEGIES = [
    pytest.param("inline", id="inline-torch-ddp"),
    pytest.param("torchplug_ddp", id="torchplug-ddp", marks=pytest.mark.skipif(
        _torchplug_ddp_missing() is not None, reason=str(_torchplug_ddp_missing()))),
]


def _run(tmp_path: Path, strategy: str) -> list[dict[str, Any]]:
    mp.start_processes(  # type: ignore[attr-defined,no-untyped-call]
        ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), strategy), nprocs=2, join=True,
        start_method="spawn",
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_rank_makes_the_same_skip_decision(tmp_path: Path, strategy: str) -> None:
    rank0, rank1 = _run(tmp_path, strategy)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["step_modules"] == rank1["step_modules"] == ["DistributedDataParallel"]  # really wrapped
    # 5 windows of 2 micro-batches; rank 1 alone made window 1 (micro-batch 2, under no_sync)
    # and window 3 (micro-batch 7, the all-reducing one) infinite.
    assert sorted(DDP_INF_MICRO_BATCHES) == [2, 7]
    expected = [True, False, True, False, True]
    assert rank0["steps"] == rank1["steps"] == expected
    assert rank0["unchanged"] == rank1["unchanged"] == [not s for s in expected]
    assert rank0["scales"] == rank1["scales"] == [1024.0, 512.0, 512.0, 256.0, 256.0]
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 2.0
    assert rank0["micro_batches"] == rank1["micro_batches"] == 10
    assert rank0["params"] == rank1["params"]  # bitwise: the ranks stayed in lockstep
