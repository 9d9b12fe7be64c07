"""The 2-rank exact-resume matrix, run inside two worker processes that share one gloo group.

Each worker (``matrix_worker``) runs, per variant of :mod:`torchplug.testing.resume`, the
uninterrupted reference fit (which writes every checkpoint), one fit resumed from each of them,
a fit stopped by SIGTERM after a step and its resume; then a ZeRO-1 (``ddp_zero``) run
checkpointed mid-epoch by a plugin, and its resume. Every fit runs in the same two processes
(the plugin leaves a group it did not create alone), so the whole matrix costs one launch.
Results go to ``out/results-rank<r>.json``: per cell, what differs (empty: bit-identical) and
whether the resumed run called exactly the epoch-end events that followed the checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import torchplug
from torchplug.callbacks import ModelCheckpoint
from torchplug.testing.resume import (
    MAX_EPOCHS,
    STEP_AT_2_RANKS,
    VARIANTS,
    ResumeNet,
    ResumeProbe,
    differences,
    final_state,
    loaders,
)
from torchplug_ddp import DDPPlugin


def fit(variant: str, root: Path, probe: ResumeProbe, ckpt_path: str | None = None, scramble: bool = False,
        zero: bool = False) -> dict[str, Any]:
    torch.manual_seed(999 if scramble else 1234)
    random.seed(999 if scramble else 1234)
    model = ResumeNet(variant, seed=5 if scramble else 0)
    trainer = torchplug.Trainer(
        max_epochs=MAX_EPOCHS, accumulate_grad_batches=3 if variant == "accumulate3" else 1, default_root_dir=root,
        accelerator="cpu", enable_progress_bar=False, autoload_plugins=False, logger=False,
        plugins=[DDPPlugin(timeout=60, zero_redundancy=zero), probe],
        callbacks=[ModelCheckpoint(dirpath=root / "every_epoch", save_top_k=-1)])
    train, val = loaders(distributed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchplug.PlanChangedWarning)  # the probe's settings differ
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return final_state(model, trainer)


def cell(expected: dict[str, Any], probe: ResumeProbe, after: str, root: Path, path: Path, variant: str,
         zero: bool = False) -> dict[str, Any]:
    resumed_probe = ResumeProbe()
    state = fit(variant, root, resumed_probe, ckpt_path=str(path), scramble=True, zero=zero)
    return {"differences": differences(expected, state), "events": resumed_probe.events,
            "expected_events": probe.events_after(after)}


def matrix_worker(rank: int, world: int, store: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, Any] = {}
    base = Path(out)
    try:
        for variant in VARIANTS:
            root = base / variant
            probe = ResumeProbe(root, step_at=STEP_AT_2_RANKS[variant])
            expected = fit(variant, root / "reference", probe)
            dist.barrier()  # every checkpoint is on disk before any rank reads one
            for point in ("step", "window", "epoch_end", "validation_end"):
                if point == "window" and variant != "accumulate3":
                    continue
                results[f"{point}-{variant}"] = cell(expected, probe, point, root / point, root / f"{point}.ckpt",
                                                     variant)
            first = next((root / "reference" / "every_epoch").glob("epoch=0-*.ckpt"))
            results[f"model_checkpoint-{variant}"] = cell(expected, probe, "validation_end", root / "mc", first,
                                                          variant)
            # SIGTERM on both ranks after the same step (a scheduler stopping the job): rank 0 keeps last.ckpt
            stopped = root / "stopped"
            try:
                fit(variant, stopped, ResumeProbe(step_at=STEP_AT_2_RANKS[variant], sigterm=True))
                results[f"sigterm-{variant}"] = {"error": "the fit was not interrupted"}
                continue
            except KeyboardInterrupt:
                pass
            dist.barrier()  # rank 0 has written last.ckpt
            last = next(stopped.glob("torchplug_logs/version_*/checkpoints/last.ckpt"))
            results[f"sigterm-{variant}"] = cell(expected, probe, "step", root / "resumed", last, variant)
        # ZeRO-1: a plugin's mid-epoch save_checkpoint consolidates the sharded optimizer state first.
        root = base / "zero"
        probe = ResumeProbe(root, step_at=STEP_AT_2_RANKS["shuffle"])
        expected = fit("shuffle", root / "reference", probe, zero=True)
        dist.barrier()
        for point in ("step", "epoch_end"):
            results[f"zero-{point}"] = cell(expected, probe, point, root / point, root / f"{point}.ckpt", "shuffle",
                                            zero=True)
        results["zero-state-tensors"] = sum(len(s) for s in expected["optimizer"])
    finally:
        (base / f"results-rank{rank}.json").write_text(json.dumps(results, indent=1))
        dist.destroy_process_group()
