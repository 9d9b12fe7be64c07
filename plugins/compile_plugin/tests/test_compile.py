"""CompilePlugin: the compiled step trains to the eager run's weights, alone, composed with
native_amp bf16 and ddp, and with fsdp, on 2 gloo ranks (CPU, ``backend="aot_eager"``), in the
documented order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from compile_support import SetupProbe
from torchplug_compile import CompilePlugin

from torchplug import MisconfigurationError, Trainer
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader

N, MICRO = 32, 4


def quiet(**kwargs: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                            "enable_checkpointing": False, "max_epochs": 1, "autoload_plugins": False}
    base.update(kwargs)
    return base


def eager(**kwargs: Any) -> torch.Tensor:
    """One eager process on the concatenated batches."""
    model = TinyMLP()
    Trainer(**quiet(**kwargs)).fit(model, tiny_loader(n=N, batch_size=2 * MICRO))
    return parameters_vector(model)


@pytest.mark.timeout(300)
def test_compile_with_bf16_and_ddp_trains_like_the_eager_run(tmp_path: Path) -> None:
    model = TinyMLP()
    Trainer(**quiet(devices=2, precision="bf16", accumulate_grad_batches=2,
                    plugins=[CompilePlugin(backend="aot_eager"), SetupProbe(str(tmp_path))])).fit(
        model, tiny_loader(n=N, batch_size=MICRO))
    # The eager run of the same configuration: bf16 sums over 4-sample shards round differently
    # from one process's 8-sample batches (2e-4 apart), so the reference is 2 eager ranks too.
    eager_model = TinyMLP()
    Trainer(**quiet(devices=2, precision="bf16", accumulate_grad_batches=2)).fit(
        eager_model, tiny_loader(n=N, batch_size=MICRO))
    assert not torch.equal(parameters_vector(model), parameters_vector(TinyMLP()))
    assert float((parameters_vector(model) - parameters_vector(eager_model)).abs().max()) < 1e-5
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("setup-rank*.json"))]
    assert len(seen) == 2
    for rank in seen:
        assert rank["transforms"] == [["compile", "compile"]]
        # compile ran on the module, then DDP wrapped it: the wrapper's step is the compiled one
        assert rank["wrapper"] == "DistributedDataParallel"
        assert rank["wraps_the_module"]
        assert rank["step_compiled"]
        assert not any("_orig_mod" in key for key in rank["keys"])


@pytest.mark.timeout(300)
def test_compile_with_fsdp_trains_like_eager_fsdp_compiling_before_sharding(tmp_path: Path) -> None:
    model = TinyMLP()
    Trainer(**quiet(devices=2, strategy="fsdp", accumulate_grad_batches=2, gradient_clip_val=0.1,
                    plugins=[CompilePlugin(backend="aot_eager"), SetupProbe(str(tmp_path))])).fit(
        model, tiny_loader(n=N, batch_size=MICRO))
    eager_model = TinyMLP()
    Trainer(**quiet(devices=2, strategy="fsdp", accumulate_grad_batches=2, gradient_clip_val=0.1)).fit(
        eager_model, tiny_loader(n=N, batch_size=MICRO))
    assert not torch.equal(parameters_vector(model), parameters_vector(TinyMLP()))
    assert float((parameters_vector(model) - parameters_vector(eager_model)).abs().max()) < 1e-5
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("setup-rank*.json"))]
    assert len(seen) == 2
    for rank in seen:
        # the declared order: compile, then shard (fully_shard on the compiled module's parameters)
        assert rank["transforms"] == [["compile", "compile"], ["shard", "fsdp"]]
        assert rank["root_of_the_module"]  # the FSDP root runs the module's (compiled) training_step
        assert rank["step_compiled"]
        assert rank["sharded"]
        assert not any("_orig_mod" in key for key in rank["keys"])


def test_compile_alone_trains_like_the_eager_run_and_leaves_the_module_uncompiled() -> None:
    model = TinyMLP()
    trainer = Trainer(**quiet(plugins=[CompilePlugin(backend="aot_eager")]))
    trainer.fit(model, tiny_loader(n=N, batch_size=2 * MICRO))
    assert trainer.model_transforms == [("compile", "compile")]
    assert float((parameters_vector(model) - eager()).abs().max()) < 1e-5
    assert "training_step" not in model.__dict__


def test_unknown_options_are_refused_naming_them() -> None:
    with pytest.raises(MisconfigurationError, match=r"bakend not accepted by torch\.compile"):
        CompilePlugin(bakend="aot_eager")
