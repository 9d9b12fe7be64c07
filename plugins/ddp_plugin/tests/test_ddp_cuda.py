"""DDPPlugin on CUDA: skipped without a GPU (CI). One GPU is enough: two gloo ranks share it
in a pre-initialised group (nccl refuses two ranks on one device), and a one-rank torchrun job
exercises the nccl env:// path."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_test_support import Recorder, Regressor, loader, max_diff, preinitialised_worker, quiet, state

from torchplug import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TESTS = Path(__file__).parent


def read(out: Path, tag: str, rank: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{tag}-rank{rank}.json").read_text())
    return data


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in state(model).items()}


@pytest.mark.timeout(120)
def test_cuda_two_ranks_sync_once_per_window(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    args = (2, str(tmp_path / "store"), str(tmp_path), "cuda")
    procs = [context.Process(target=preinitialised_worker, args=(rank, *args)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(100)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in (0, 1):
        seen = read(tmp_path, "accumulate", rank)
        assert seen["device"] == "cuda:0"
        assert seen["allreduces_per_batch"] == [0, 0, 0, 1] * 2
        assert read(tmp_path, "lightning11", rank)["allreduces_per_batch"] == [0, 0, 0, 1] * 2  # no_sync entered
    reference = Regressor()
    Trainer(**quiet(accelerator="cuda")).fit(reference, loader(32))
    weights = {k: v.cpu() for k, v in torch.load(tmp_path / "accumulate-weights.pt").items()}
    assert max_diff(weights, cpu_state(reference)) < 1e-5


@pytest.mark.timeout(120)
def test_cuda_torchrun_one_rank_uses_nccl_unwrapped(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               str(TESTS / "torchrun_script.py"), str(tmp_path), "1", "8", "1", "cuda"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = read(tmp_path, "torchrun", 0)
    assert seen["after_setup_optimizers"]["backend"] == "nccl"
    assert seen["world"] == 1
    assert seen["device"] == "cuda:0"
    assert seen["model_wrapped"] == "Regressor"  # one rank: no DDP wrapper


@pytest.mark.timeout(60)
def test_cuda_one_process_trains_on_the_gpu(tmp_path: Path) -> None:
    model = Regressor()
    Trainer(**quiet(accelerator="cuda", strategy="ddp", devices=1, plugins=[Recorder(str(tmp_path))])).fit(
        model, loader(8))
    seen = read(tmp_path, "run", 0)
    assert seen["device"] == "cuda:0"
    assert seen["model_wrapped"] == "Regressor"
    reference = Regressor()
    Trainer(**quiet()).fit(reference, loader(8))  # the same run on the CPU
    assert max_diff(cpu_state(model), state(reference)) < 1e-5
