"""What no_sync() buys through the Trainer: accumulation with and without gradient all-reduce
on every micro-batch, next to the same ratio for a hand-written DDP loop, in one run.

Usage:
    python bench/ddp_no_sync.py [--batch 32] [--accum 4] [--reps 9] [--warmup 2] [--measure 4]

Two gloo ranks on this machine (127.0.0.1), one thread each. The bench starts the two processes
and initialises the process group itself, so every ``Trainer.fit`` below runs in-process in an
already initialised group (DDPPlugin's pre-initialised mode) and process start-up (~5 s per
spawn) stays out of the numbers. Model: the medium MLP 512->2048->2048->10 of
../shared/bench/ddp_cpu.py, SGD(lr=0.01, momentum=0.9), cross-entropy; each optimizer step is
``--accum`` micro-batches of ``--batch`` samples per rank, prebuilt (no data loading timed).

Variants, interleaved (order reversed every other repetition):
  trainer_no_sync   Trainer + DDPPlugin: the first accum-1 micro-batches run inside no_sync()
  trainer_sync      Trainer + a DDPPlugin subclass whose block_backward_sync returns nullcontext()
  hand_no_sync      a hand-written DDP loop with no_sync()
  hand_sync         the same loop all-reducing every micro-batch
  hand_no_sync_aa   hand_no_sync again: an A/A check of the harness (ratio should be ~1.0)
Each variant's time per optimizer step is the steady-state window after ``--warmup`` steps:
(t[warmup + measure] - t[warmup]) / measure, on rank 0, after a barrier.

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchplug import Plugin, Trainer, TrainingModule
from torchplug_ddp import DDPPlugin

WIDTHS = (512, 2048, 2048, 10)
VARIANTS = ("trainer_no_sync", "trainer_sync", "hand_no_sync", "hand_sync", "hand_no_sync_aa")


def make_net() -> nn.Module:
    torch.manual_seed(0)
    a, b, c, d = WIDTHS
    return nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c), nn.ReLU(), nn.Linear(c, d))


class MediumMLP(TrainingModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class SyncEveryMicroBatch(DDPPlugin):
    """The baseline: never block gradient sync, so every micro-batch all-reduces."""

    def block_backward_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


class StepClock(Plugin):
    """Notes the time at the end of every accumulation window (= every optimizer step)."""

    def __init__(self, accum: int) -> None:
        self.accum = accum
        self.times: list[float] = []

    def on_train_batch_end(self, batch_idx: int) -> None:
        if (batch_idx + 1) % self.accum == 0:
            self.times.append(time.perf_counter())


def per_step(times: list[float], warmup: int, measure: int) -> float:
    return (times[warmup + measure - 1] - times[warmup - 1]) / measure


def run_trainer(variant: str, batches: list[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace) -> float:
    strategy = DDPPlugin() if variant == "trainer_no_sync" else SyncEveryMicroBatch()
    clock = StepClock(args.accum)
    trainer = Trainer(plugins=[strategy, clock], accelerator="cpu", accumulate_grad_batches=args.accum,
                      max_steps=args.warmup + args.measure, enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, autoload_plugins=False)
    dist.barrier()
    trainer.fit(MediumMLP(), batches)
    return per_step(clock.times, args.warmup, args.measure)


def run_hand(variant: str, batches: list[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace) -> float:
    ddp = DistributedDataParallel(make_net())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    skip_sync = variant != "hand_sync"
    times = []
    dist.barrier()
    micro = iter(batches)
    for _ in range(args.warmup + args.measure):
        for k in range(args.accum):
            x, y = next(micro)
            blocked = skip_sync and k < args.accum - 1
            with ddp.no_sync() if blocked else contextlib.nullcontext():
                (F.cross_entropy(ddp(x), y) / args.accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return per_step(times, args.warmup, args.measure)


def worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        g = torch.Generator().manual_seed(rank)
        n_micro = (args.warmup + args.measure) * args.accum
        batches = [(torch.randn(args.batch, WIDTHS[0], generator=g),
                    torch.randint(0, WIDTHS[-1], (args.batch,), generator=g)) for _ in range(n_micro)]
        for variant in VARIANTS:  # untimed first round: imports, first DDP(), allocator
            (run_trainer if variant.startswith("trainer") else run_hand)(variant, batches, args)
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                run = run_trainer if variant.startswith("trainer") else run_hand
                samples[variant].append(run(variant, batches, args))
        if rank == 0:
            Path(out).write_text(json.dumps(samples))
    finally:
        dist.destroy_process_group()


def paired(samples: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    per_rep = [x / y for x, y in zip(samples[a], samples[b])]
    return {"paired_median": round(statistics.median(per_rep), 3),
            "median_of_medians": round(statistics.median(samples[a]) / statistics.median(samples[b]), 3),
            "per_rep": [round(r, 3) for r in per_rep]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="samples per micro-batch per rank (default 32)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per fit (default 2)")
    parser.add_argument("--measure", type=int, default=4, help="timed optimizer steps per fit (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    with tempfile.TemporaryDirectory(prefix="ddp-no-sync-") as tmp:
        out = os.path.join(tmp, "samples.json")
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=worker, args=(rank, 2, os.path.join(tmp, "store"), args, out))
                 for rank in range(2)]
        start = time.perf_counter()
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            sys.exit(f"a worker failed: exit codes {[proc.exitcode for proc in procs]}")
        samples: dict[str, list[float]] = json.loads(Path(out).read_text())
    wall = time.perf_counter() - start

    ms = {v: {"median": round(statistics.median(s) * 1e3, 1), "min": round(min(s) * 1e3, 1),
              "max": round(max(s) * 1e3, 1)} for v, s in samples.items()}
    result = {
        "bench": "ddp_no_sync", "torch": torch.__version__, "world": 2, "backend": "gloo",
        "batch": args.batch, "accum": args.accum, "reps": args.reps, "warmup": args.warmup,
        "measure": args.measure, "threads_per_rank": args.threads, "ms_per_step": ms,
        "speedup_no_sync_trainer": paired(samples, "trainer_sync", "trainer_no_sync"),
        "speedup_no_sync_hand": paired(samples, "hand_sync", "hand_no_sync"),
        "trainer_vs_hand_no_sync": paired(samples, "trainer_no_sync", "hand_no_sync"),
        "trainer_vs_hand_sync": paired(samples, "trainer_sync", "hand_sync"),
        "aa_check": paired(samples, "hand_no_sync_aa", "hand_no_sync"),
        "wall_s": round(wall, 1),
    }
    print(f"DDP gloo, 2 ranks, micro-batch {args.batch}/rank, window {args.accum}, "
          f"{args.reps} reps of {args.measure} timed steps: ms per optimizer step")
    print(f"{'variant':<18}{'median':>9}{'min':>9}{'max':>9}")
    for variant in VARIANTS:
        row = ms[variant]
        print(f"{variant:<18}{row['median']:>9.1f}{row['min']:>9.1f}{row['max']:>9.1f}")
    for label, key in (("speedup of no_sync, Trainer", "speedup_no_sync_trainer"),
                       ("speedup of no_sync, hand loop", "speedup_no_sync_hand"),
                       ("Trainer / hand, no_sync", "trainer_vs_hand_no_sync"),
                       ("Trainer / hand, sync", "trainer_vs_hand_sync"),
                       ("A/A (hand no_sync twice)", "aa_check")):
        print(f"{label:<32}{result[key]['paired_median']:>7.3f}  (paired median; per rep "
              f"{min(result[key]['per_rep']):.3f}-{max(result[key]['per_rep']):.3f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
