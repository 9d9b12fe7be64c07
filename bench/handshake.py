"""The plan handshake's start-up cost on two gloo ranks (CPU), measured inside the ranks.

Usage:
    python bench/handshake.py [--calls 21] [--quick]

Two spawned processes join one gloo group through a FileStore, build
``Trainer(strategy="ddp", devices=2)`` (the ddp plugin finds the initialised group), run its
``setup_environment`` and then time :func:`torchplug.handshake.check_ranks` (one
``all_gather_object`` of each rank's plan fingerprint, plus the comparison) ``--calls`` times
after two warm-up calls; a fit runs it once, before the first step, and never per step. For
scale, the same number of plain ``dist.barrier()`` calls is timed too. The last line printed is
one JSON object with the medians of both ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _harness as h
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchplug
from torchplug.handshake import check_ranks

WORLD = 2


def _timed(call: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        dist.barrier()  # line the ranks up: each sample is one call, not a wait for the peer
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def worker(rank: int, store_path: str, calls: int, out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        trainer = torchplug.Trainer(accelerator="cpu", strategy="ddp", devices=WORLD, **h.QUIET)
        trainer.hooks.setup_environment(trainer=trainer)
        trainer.world_size, trainer.global_rank = trainer.hooks.world_size(), trainer.hooks.global_rank()
        _timed(lambda: check_ranks(trainer), 2)  # warm-up: the first pickling and gloo buffers
        handshake = _timed(lambda: check_ranks(trainer), calls)
        barrier = _timed(dist.barrier, calls)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"handshake_ms": handshake, "barrier_ms": barrier}))
        dist.barrier()  # leave together (gloo aborts a rank whose peer tears down first)
        trainer.hooks.teardown_environment(trainer=trainer)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=21)
    p.add_argument("--quick", action="store_true", help="smoke mode: 3 calls")
    args = p.parse_args(argv)
    calls = 3 if args.quick else args.calls
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result: dict[str, Any] = {"bench": "handshake", "world_size": WORLD, "backend": "gloo", "calls": calls, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-handshake-") as tmp:
        spawn: Any = mp.start_processes  # type: ignore[attr-defined]
        spawn(worker, args=(os.path.join(tmp, "store"), calls, tmp), nprocs=WORLD, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]
    handshake = max(statistics.median(r["handshake_ms"]) for r in ranks)
    barrier = max(statistics.median(r["barrier_ms"]) for r in ranks)
    result.update(handshake_ms_median=round(handshake, 3), barrier_ms_median=round(barrier, 3),
                  ranks=[{k: [round(v, 3) for v in vs] for k, vs in r.items()} for r in ranks])
    result["rows"].append({
        "metric": "plan handshake at start-up, 2 gloo ranks (once per fit, nothing per step)", "unit": "ms",
        "hand": round(barrier, 3), "torchplug": round(handshake, 3), "ratio": round(handshake / barrier, 2),
        "target": "< 50 ms", "ok": handshake < 50,
        "note": "hand column: one dist.barrier() for scale (ratio: handshake / barrier); median of the slower rank",
    })
    h.emit(result)


if __name__ == "__main__":
    main()
