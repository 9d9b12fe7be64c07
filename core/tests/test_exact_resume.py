"""Exact resume from every checkpoint point, in one process: {step end, inside an accumulation
window, epoch end, validation end, SIGTERM} x {shuffle, StepLR, accumulate 3}.

One uninterrupted run per variant writes every checkpoint (``torchplug.testing.resume``); a run
resumed from each, in a scrambled RNG and from other initial weights, must end bit-identical
to it (fp32, CPU) and call exactly the epoch-end events that followed the checkpoint's writing:
none repeated, none skipped. The 2-rank cells are in plugins/ddp_plugin/tests/test_exact_resume_ddp.py.
"""

from __future__ import annotations

import random
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import torchplug
from torchplug import checkpoint as ckpt
from torchplug.callbacks import ModelCheckpoint
from torchplug.testing.resume import (
    MAX_EPOCHS,
    STEP_AT,
    VARIANTS,
    ResumeNet,
    ResumeProbe,
    differences,
    final_state,
    loaders,
)


def _fit(variant: str, root: Path, probe: ResumeProbe, ckpt_path: str | None = None,
         scramble: bool = False) -> tuple[dict[str, Any], torchplug.Trainer]:
    """A fit with the probe and a ModelCheckpoint keeping every epoch's checkpoint (written at
    validation end) in ``root/every_epoch``."""
    torch.manual_seed(999 if scramble else 1234)
    random.seed(999 if scramble else 1234)
    model = ResumeNet(variant, seed=5 if scramble else 0)  # other weights: the checkpoint must replace them
    trainer = torchplug.Trainer(
        max_epochs=MAX_EPOCHS, accumulate_grad_batches=3 if variant == "accumulate3" else 1, default_root_dir=root,
        enable_progress_bar=False, autoload_plugins=False, logger=False, plugins=[probe],
        callbacks=[ModelCheckpoint(dirpath=root / "every_epoch", save_top_k=-1)])
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchplug.PlanChangedWarning)  # the probe's settings differ
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return final_state(model, trainer), trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[dict[str, Any], ResumeProbe, Path]]:
    """``reference(variant)``: the uninterrupted run's final state, its probe and the folder of
    its checkpoints (one run per variant, shared by the cells)."""
    done: dict[str, tuple[dict[str, Any], ResumeProbe, Path]] = {}

    def get(variant: str) -> tuple[dict[str, Any], ResumeProbe, Path]:
        if variant not in done:
            root = tmp_path_factory.mktemp(f"reference-{variant}")
            probe = ResumeProbe(root, step_at=STEP_AT[variant])
            state, _ = _fit(variant, root, probe)
            done[variant] = (state, probe, root)
        return done[variant]

    return get


CELLS = [pytest.param(variant, point, id=f"{point}-{variant}") for variant in VARIANTS
         for point in ("step", "window", "epoch_end", "validation_end", "model_checkpoint")
         if point != "window" or variant == "accumulate3"]


@pytest.mark.parametrize(("variant", "point"), CELLS)
def test_resume_from_a_checkpoint_point_is_exact(reference: Any, tmp_path: Path, variant: str, point: str) -> None:
    expected, probe, root = reference(variant)
    resumed_probe = ResumeProbe()
    if point == "model_checkpoint":  # ModelCheckpoint's file of the first epoch, written at its validation end
        path, point = next((root / "every_epoch").glob("epoch=0-*.ckpt")), "validation_end"
    else:
        path = root / f"{point}.ckpt"
    state, _ = _fit(variant, tmp_path, resumed_probe, ckpt_path=str(path), scramble=True)
    assert differences(expected, state) == []
    assert resumed_probe.events == probe.events_after(point)  # each end event and validation exactly once


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_after_sigterm_is_exact(reference: Any, tmp_path: Path, variant: str) -> None:
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM has a handler here; the fit only catches it where Python's default is installed")
    expected, probe, _ = reference(variant)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        _fit(variant, tmp_path / "stopped", ResumeProbe(step_at=STEP_AT[variant], sigterm=True))
    path = next((tmp_path / "stopped").glob("torchplug_logs/version_*/checkpoints/last.ckpt"))
    assert ckpt.load(path)["global_step"] == STEP_AT[variant]
    resumed_probe = ResumeProbe()
    state, _ = _fit(variant, tmp_path / "resumed", resumed_probe, ckpt_path=str(path), scramble=True)
    assert differences(expected, state) == []
    assert resumed_probe.events == probe.events_after("step")
