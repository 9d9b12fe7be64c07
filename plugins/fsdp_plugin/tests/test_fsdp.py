"""FSDPPlugin on 2 real gloo ranks on the CPU, fp32: parity with a one-process run on the
concatenated batches (with and without accumulation, clipping active), no gradient collective
inside an accumulation window, and full-state checkpoints that resume at another world size.

Two spawned 2-rank fits (a module fixture) serve every check: ~10 s each on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_support import CollectiveCounter
from torchplug_fsdp import FSDPPlugin

from torchplug import MisconfigurationError, Trainer
from torchplug.errors import PlanChangedWarning
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader

N, MICRO, CLIP = 64, 4, 0.1  # 64 samples: 8 micro-batches of 4 per rank, 8 of 8 in one process


def quiet(root: Path, **kwargs: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                            "enable_checkpointing": True, "default_root_dir": str(root), "max_epochs": 1,
                            "autoload_plugins": False, "gradient_clip_val": CLIP}
    base.update(kwargs)
    return base


def single(root: Path, epochs: int, accumulate: int, ckpt_path: str | None = None) -> tuple[TinyMLP, Trainer]:
    model = TinyMLP()
    trainer = Trainer(**quiet(root, max_epochs=epochs, accumulate_grad_batches=accumulate))
    if ckpt_path is None:
        trainer.fit(model, tiny_loader(n=N, batch_size=2 * MICRO))
    else:  # a checkpoint of the 2-rank strategy resumed in one process: another plan, which warns
        with pytest.warns(PlanChangedWarning):
            trainer.fit(model, tiny_loader(n=N, batch_size=2 * MICRO), ckpt_path=ckpt_path)
    return model, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp")
    # A: strategy="fsdp" by entry point, accumulation 2, 1 epoch; its last.ckpt resumes at 1 rank.
    accumulated = TinyMLP()
    trainer_a = Trainer(**quiet(out / "a", devices=2, strategy="fsdp", accumulate_grad_batches=2,
                                plugins=[CollectiveCounter(str(out))]))
    trainer_a.fit(accumulated, tiny_loader(n=N, batch_size=MICRO))
    # B: a one-process checkpoint (epoch 1, no accumulation) resumed on 2 FSDP ranks for epoch 2.
    _, one = single(out / "b1", epochs=1, accumulate=1)
    resumed = TinyMLP()
    with pytest.warns(PlanChangedWarning):  # 1 rank -> 2: another plan
        Trainer(**quiet(out / "b2", devices=2, max_epochs=2, plugins=[FSDPPlugin(timeout=60)])).fit(
            resumed, tiny_loader(n=N, batch_size=MICRO), ckpt_path=one.checkpoint_path)
    counts = [json.loads(p.read_text()) for p in sorted(out.glob("counts-rank*.json"))]
    return {"out": out, "accumulated": accumulated, "trainer_a": trainer_a, "resumed": resumed, "counts": counts}


@pytest.mark.timeout(240)
def test_two_fsdp_ranks_equal_one_process_with_accumulation(runs: dict[str, Any], tmp_path: Path) -> None:
    reference, _ = single(tmp_path, epochs=1, accumulate=2)
    trained = parameters_vector(runs["accumulated"])  # rank 0's full weights, handed back to this process
    assert not torch.equal(trained, parameters_vector(TinyMLP()))
    assert float((trained - parameters_vector(reference)).abs().max()) < 1e-5
    assert runs["trainer_a"].global_step == N // (2 * MICRO) // 2


@pytest.mark.timeout(240)
def test_no_gradient_collective_inside_an_accumulation_window(runs: dict[str, Any]) -> None:
    assert len(runs["counts"]) == 2
    for seen in runs["counts"]:
        assert seen["transforms"] == [["shard", "fsdp"]]
        assert seen["optimizer_params_are_dtensors"]
        assert seen["optimizer_holds_model_params"]
        inside = [b["collectives"] for b in seen["per_batch"] if not b["window_end"]]
        ends = [b["collectives"] for b in seen["per_batch"] if b["window_end"]]
        assert inside == [0] * 4
        assert len(ends) == 4
        assert all(n >= 1 for n in ends)


@pytest.mark.timeout(240)
def test_a_two_rank_checkpoint_resumes_at_one_rank_like_an_uninterrupted_run(runs: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    path = runs["trainer_a"].checkpoint_path
    saved = torch.load(path, map_location="cpu", weights_only=True)
    plain = TinyMLP(seed=1)
    plain.load_state_dict(saved["state_dict"])  # a full state dict: a plain module takes it as is
    assert torch.equal(parameters_vector(plain), parameters_vector(runs["accumulated"]))
    continued, _ = single(tmp_path / "continued", epochs=2, accumulate=2, ckpt_path=path)
    uninterrupted, _ = single(tmp_path / "uninterrupted", epochs=2, accumulate=2)
    assert float((parameters_vector(continued) - parameters_vector(uninterrupted)).abs().max()) < 1e-5


@pytest.mark.timeout(240)
def test_a_one_rank_checkpoint_resumes_at_two_ranks_like_an_uninterrupted_run(runs: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    uninterrupted, _ = single(tmp_path, epochs=2, accumulate=1)
    diff = float((parameters_vector(runs["resumed"]) - parameters_vector(uninterrupted)).abs().max())
    assert diff < 1e-5


def test_a_second_precision_owner_and_unknown_arguments_are_refused() -> None:
    with pytest.raises(MisconfigurationError, match="mp_policy is not accepted: precision comes from the precision"):
        FSDPPlugin(mp_policy=object())
    with pytest.raises(MisconfigurationError, match="reshard_after_forwrd not accepted"):
        FSDPPlugin(reshard_after_forwrd=True)
