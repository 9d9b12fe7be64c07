"""ZeRO-1 (``DDPPlugin(zero_redundancy=True)``, strategy ``ddp_zero``) on 2 real gloo ranks, fp32:
parity with one process on the concatenated batches (with and without accumulation), the
optimizer state split between the ranks, and consolidated checkpoints that resume at another
world size. Two spawned fits (a module fixture) serve every check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from zero_support import AdamMLP, StateBytes, state_bytes

from torchplug import Trainer
from torchplug.errors import PlanChangedWarning
from torchplug.testing.models import parameters_vector, tiny_loader
from torchplug_ddp import DDPPlugin, DDPZeroPlugin

N, MICRO = 64, 4


def quiet(root: Path, **kwargs: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                            "enable_checkpointing": True, "default_root_dir": str(root), "max_epochs": 1,
                            "autoload_plugins": False, "gradient_clip_val": 0.5}
    base.update(kwargs)
    return base


def single(root: Path, epochs: int, accumulate: int, ckpt_path: str | None = None) -> tuple[AdamMLP, Trainer]:
    model = AdamMLP()
    trainer = Trainer(**quiet(root, max_epochs=epochs, accumulate_grad_batches=accumulate))
    if ckpt_path is None:
        trainer.fit(model, tiny_loader(n=N, batch_size=2 * MICRO))
    else:  # a checkpoint of the 2-rank strategy resumed in one process: another plan, which warns
        with pytest.warns(PlanChangedWarning):
            trainer.fit(model, tiny_loader(n=N, batch_size=2 * MICRO), ckpt_path=ckpt_path)
    return model, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("zero")
    accumulated = AdamMLP()
    trainer_a = Trainer(**quiet(out / "a", devices=2, strategy="ddp_zero", accumulate_grad_batches=2,
                                plugins=[StateBytes(str(out))]))
    trainer_a.fit(accumulated, tiny_loader(n=N, batch_size=MICRO))
    _, one = single(out / "b1", epochs=1, accumulate=1)
    resumed = AdamMLP()
    zero = DDPPlugin(timeout=60, zero_redundancy=True)
    with pytest.warns(PlanChangedWarning):  # 1 rank -> 2: another plan
        Trainer(**quiet(out / "b2", devices=2, max_epochs=2, plugins=[zero])).fit(
            resumed, tiny_loader(n=N, batch_size=MICRO), ckpt_path=one.checkpoint_path)
    states = [json.loads((out / f"state-rank{r}.json").read_text()) for r in range(2)]
    return {"accumulated": accumulated, "trainer_a": trainer_a, "resumed": resumed, "states": states, "one": one}


@pytest.mark.timeout(240)
def test_zero_ranks_equal_one_process_with_accumulation(runs: dict[str, Any], tmp_path: Path) -> None:
    reference, _ = single(tmp_path, epochs=1, accumulate=2)
    diff = float((parameters_vector(runs["accumulated"]) - parameters_vector(reference)).abs().max())
    assert diff < 1e-5


@pytest.mark.timeout(240)
def test_each_rank_holds_its_share_of_the_adam_state(runs: dict[str, Any]) -> None:
    full = state_bytes(runs["one"].optimizers[0])  # a one-process Adam: 2 float32 tensors per parameter
    held = [s["bytes"] for s in runs["states"]]
    assert [s["optimizers"] for s in runs["states"]] == [["ZeroRedundancyOptimizer"]] * 2
    assert sum(held) == full
    assert max(held) < 0.7 * full  # TinyMLP's 4 tensors split 128 / 48+16+3 elements: 0.66 and 0.34 of it


@pytest.mark.timeout(240)
def test_a_consolidated_two_rank_checkpoint_resumes_at_one_rank(runs: dict[str, Any], tmp_path: Path) -> None:
    path = runs["trainer_a"].checkpoint_path
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert len(saved["optimizer_states"][0]["state"]) == 4  # every parameter's Adam state, from both ranks
    continued, _ = single(tmp_path / "continued", epochs=2, accumulate=2, ckpt_path=path)
    uninterrupted, _ = single(tmp_path / "uninterrupted", epochs=2, accumulate=2)
    assert float((parameters_vector(continued) - parameters_vector(uninterrupted)).abs().max()) < 1e-5


@pytest.mark.timeout(240)
def test_a_one_rank_checkpoint_resumes_at_two_zero_ranks(runs: dict[str, Any], tmp_path: Path) -> None:
    uninterrupted, _ = single(tmp_path, epochs=2, accumulate=1)
    assert float((parameters_vector(runs["resumed"]) - parameters_vector(uninterrupted)).abs().max()) < 1e-5


def test_zero_is_an_option_and_its_own_strategy_name() -> None:
    assert DDPZeroPlugin().zero_redundancy
    assert "zero_redundancy=True" in repr(DDPZeroPlugin())
    assert not DDPPlugin().zero_redundancy
