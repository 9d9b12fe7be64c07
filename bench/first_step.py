"""Time to the first optimizer step: wall time from starting a Python process to the end of its
first optimizer step, through the Trainer and through a hand-written loop.

Usage:
    python bench/first_step.py [--reps 5] [--no-ddp] [--quick]

Four kinds of child process, each ``python bench/first_step.py --child KIND``, run interleaved
(ABBA) and timed from the parent's ``Popen`` to a ``time.monotonic()`` stamp the child writes
(CLOCK_MONOTONIC is system-wide, so the two processes' clocks agree):

* ``hand``: import torch, build the tiny MLP, one forward/backward/step;
* ``torchplug``: the same through ``Trainer(max_steps=1).fit``;
* ``hand_ddp``: ``torch.multiprocessing`` spawn of two workers, each joining a gloo group through
  a FileStore and running one step of ``DistributedDataParallel``; rank 0 stamps;
* ``torchplug_ddp``: ``Trainer(devices=2, strategy="ddp").fit``: the ddp plugin starts the
  workers; rank 0 stamps from ``on_train_batch_end`` of its first batch.

Stamps along the way (child start, torch imported, torchplug imported, worker start) give the
breakdown. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
WORLD = 2
KINDS = {"one": ("hand", "torchplug"), "ddp": ("hand_ddp", "torchplug_ddp")}


# ----------------------------------------------------------------------------- child processes
def child(kind: str, stamp_path: str) -> None:
    import _harness as h
    import torch

    h.stamp(stamp_path, "torch_imported")
    widths, batch = h.SIZES["tiny"]
    if kind == "hand":
        _hand_step(widths, batch, stamp_path)
    elif kind == "hand_ddp":
        import torch.multiprocessing as mp

        spawn: Any = mp.start_processes  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory(prefix="bench-first-") as tmp:
            spawn(_hand_ddp_worker, args=(os.path.join(tmp, "store"), stamp_path), nprocs=WORLD, start_method="spawn")
    else:
        from _tpbench import BenchModule, FirstStepStamp

        import torchplug

        h.stamp(stamp_path, "torchplug_imported")
        torch.manual_seed(0)
        ddp = {"devices": WORLD, "strategy": "ddp"} if kind == "torchplug_ddp" else {}
        trainer = torchplug.Trainer(accelerator="cpu", max_steps=1, plugins=[FirstStepStamp(stamp_path)],
                                    **ddp, **h.QUIET)  # type: ignore[arg-type]
        trainer.fit(BenchModule(h.make_mlp(widths)), train_dataloaders=h.make_batches(widths, batch, pool=2))


def _hand_step(widths: tuple[int, ...], batch: int, stamp_path: str, model: Any = None) -> None:
    import _harness as h
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = model if model is not None else h.make_mlp(widths)
    opt = torch.optim.SGD(net.parameters(), lr=h.LR, momentum=h.MOMENTUM)
    x, y = h.make_batches(widths, batch, pool=1)[0]
    loss = F.cross_entropy(net(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    h.stamp(stamp_path, "first_step")


def _hand_ddp_worker(rank: int, store_path: str, stamp_path: str) -> None:
    import datetime

    import _harness as h
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if rank == 0:
        h.stamp(stamp_path, "worker_started")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        widths, batch = h.SIZES["tiny"]
        torch.manual_seed(0)
        model = DistributedDataParallel(h.make_mlp(widths))
        _hand_step(widths, batch, stamp_path if rank == 0 else os.devnull, model=model)
        # Both ranks leave together: a rank that tears gloo down while its peer still talks to it
        # makes the peer abort ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # As the ddp plugin's workers do: skip the interpreter's teardown, where C++ destructors of
    # torch's distributed objects can abort the process (an intermittent SIGABRT at exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------- parent
def run_child(kind: str, timeout: float) -> dict[str, float]:
    """Start one child and return its stamps as seconds since the parent started it."""
    with tempfile.TemporaryDirectory(prefix="bench-first-") as tmp:
        stamp_path = os.path.join(tmp, "stamps")
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])))
        start = time.monotonic()
        proc = subprocess.run([sys.executable, str(BENCH / "first_step.py"), "--child", kind, "--stamps", stamp_path],
                              env=env, timeout=timeout, capture_output=True, text=True)
        end = time.monotonic()
        if proc.returncode != 0:
            raise RuntimeError(f"child {kind} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        stamps: dict[str, float] = {}
        for line in Path(stamp_path).read_text().splitlines():
            what, _, value = line.partition(" ")
            stamps.setdefault(what, float(value) - start)
        stamps["exited"] = end - start
        if "first_step" not in stamps:
            raise RuntimeError(f"child {kind} never reached its first optimizer step:\n{proc.stderr[-3000:]}")
        return stamps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-ddp", action="store_true", help="only the one-process pair")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 repetition")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds one child may take")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--stamps", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        with open(args.stamps, "a") as f:  # before anything heavy is imported
            f.write(f"child_started {time.monotonic():.6f}\n")
        child(args.child, args.stamps)
        return

    sys.path.insert(0, str(BENCH))
    import _harness as h

    reps = 1 if args.quick else args.reps
    groups = ["one"] if args.no_ddp else ["one", "ddp"]
    result: dict[str, Any] = {"bench": "first_step", "reps": reps, "python": sys.version.split()[0],
                              "groups": {}, "rows": []}
    for group in groups:
        hand, trainer = KINDS[group]
        runs: dict[str, list[dict[str, float]]] = {hand: [], trainer: []}
        try:
            for rep in range(reps):
                for kind in h.abba([hand, trainer], rep):
                    runs[kind].append(run_child(kind, args.timeout))
                h.progress(f"first_step {group} rep {rep}: " + "  ".join(
                    f"{k} {runs[k][-1]['first_step']:.2f} s" for k in (hand, trainer)))
        except Exception as exc:  # e.g. torchplug-ddp missing: keep the other group
            result["groups"][group] = {"error": f"{type(exc).__name__}: {exc}"}
            h.progress(f"first_step {group}: {type(exc).__name__}: {exc}")
            continue
        stats = h.summarize({"hand": [r["first_step"] for r in runs[hand]],
                             "torchplug": [r["first_step"] for r in runs[trainer]]}, "hand", scale=1.0)
        breakdown = {kind: {what: round(statistics.median(r[what] for r in runs[kind]), 3)
                            for what in runs[kind][0] if all(what in r for r in runs[kind])}
                     for kind in (hand, trainer)}
        result["groups"][group] = {"seconds": stats, "stamps_median_s": breakdown}
        label = "one process" if group == "one" else f"devices={WORLD} (ddp, gloo)"
        result["rows"].append(h.row(f"time to first step, {label}", "s", stats, "hand", "torchplug",
                                    note="process start -> end of first optimizer step"))
    h.emit(result)


if __name__ == "__main__":
    main()
