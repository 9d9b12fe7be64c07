"""Step time with DDP on two gloo ranks (CPU): ``Trainer(strategy="ddp", devices=2)`` against a
hand-written ``DistributedDataParallel`` loop, measured inside the workers.

Usage:
    python bench/ddp_step.py [--sizes tiny,compute] [--reps 5] [--quick]

The script starts two processes (spawn), each joins one gloo process group through a FileStore
in a temporary folder and runs, interleaved (ABBA), the hand-written DDP loop and a Trainer fit.
The Trainer finds the initialised group, so the ddp plugin spawns nothing and uses it (the
torchrun/Ray path); process start-up is measured separately by first_step.py. Per-step time is
rank 0's steady-state window (``_harness.TimedLoader``); a barrier lines the ranks up before every
fit. One thread per process; traffic stays on the loopback interface. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import _harness as h
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _tpbench import BenchModule
from torch.nn.parallel import DistributedDataParallel

import torchplug

WORLD = 2
DEFAULT_STEPS = {"tiny": (30, 300), "compute": (2, 6)}
QUICK_STEPS = {"tiny": (3, 10), "compute": (1, 2)}


def fit_hand(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=h.LR, momentum=h.MOMENTUM)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def fit_trainer(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    trainer = torchplug.Trainer(accelerator="cpu", strategy="ddp", devices=WORLD, max_steps=loader.steps,
                                gradient_clip_val=clip, **h.QUIET)
    trainer.fit(BenchModule(net), train_dataloaders=loader)
    if trainer.world_size != WORLD:
        raise RuntimeError(f"the Trainer ran with world_size {trainer.world_size}, expected {WORLD}")


# hand_aa: the hand loop again, an A/A check of the harness (its ratio should be ~1.0).
IMPLS = {"hand": fit_hand, "torchplug": fit_trainer, "hand_aa": fit_hand}


def run_once(widths: tuple[int, ...], batches: list[Any], warmup: int, measure: int, clip: float,
             name: str) -> float:
    torch.manual_seed(0)
    loader = h.TimedLoader(batches, warmup + measure + 1)
    dist.barrier()  # both ranks start the fit together
    IMPLS[name](h.make_mlp(widths), loader, clip)
    return loader.per_step(warmup, measure)


def worker(rank: int, store_path: str, args: argparse.Namespace, out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        steps_table = QUICK_STEPS if args.quick else DEFAULT_STEPS
        reps = 1 if args.quick else args.reps
        result: dict[str, Any] = {}
        for size in args.sizes.split(","):
            widths, batch = h.SIZES[size]
            warmup, measure = steps_table[size]
            once = functools.partial(run_once, widths, h.make_batches(widths, batch, seed=rank), warmup, measure,
                                     args.clip)
            # The warm-up fits absorb the first DDP() of the process (it imports torch._dynamo, ~2 s).
            samples = h.interleave(once, list(IMPLS), reps, f"ddp_step {size}" if rank == 0 else "",
                                  warmup=not args.quick)
            result[size] = {"widths": widths, "batch_per_rank": batch, "warmup": warmup, "measure": measure,
                            "samples": samples}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        # Both ranks leave together: a rank that tears gloo down while its peer still talks to it
        # makes the peer abort ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,compute")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny only, 1 repetition, a few steps")
    args = p.parse_args(argv)
    if args.quick and args.sizes == "tiny,compute":
        args.sizes = "tiny"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result: dict[str, Any] = {"bench": "ddp_step", "world_size": WORLD, "backend": "gloo", "reps": 1 if args.quick
                              else args.reps, "clip": args.clip, "sizes": {}, "rows": []}
    try:
        torchplug.Trainer(strategy="ddp", devices=WORLD, **h.QUIET)
    except Exception as exc:  # e.g. torchplug-ddp not installed
        result["skipped"] = f"{type(exc).__name__}: {exc}"
        h.emit(result)
        return
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        spawn: Any = mp.start_processes  # type: ignore[attr-defined]
        spawn(worker, args=(os.path.join(tmp, "store"), args, tmp), nprocs=WORLD, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]
    for size, data in ranks[0].items():
        stats = h.summarize(data["samples"], "hand")
        other = h.summarize(ranks[1][size]["samples"], "hand")
        result["sizes"][size] = {k: v for k, v in data.items() if k != "samples"} | {
            "ms_per_step": stats, "rank1_ms_per_step": other}
        result["rows"].append(h.row(f"step time {size} MLP, ddp 2 gloo ranks (CPU)", "ms/step", stats, "hand",
                                    "torchplug", note="per rank; the Trainer joins an initialised process group; "
                                    + h.aa_note(stats)))
    h.emit(result)


if __name__ == "__main__":
    main()
