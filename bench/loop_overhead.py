"""fp32 step time: ``torchplug.Trainer`` against a hand-written PyTorch loop in the same run
(and PyTorch Lightning when ``pytorch_lightning`` is importable).

Usage:
    python bench/loop_overhead.py [--sizes tiny,compute] [--reps 9] [--clip 1.0] [--quick]
    python bench/loop_overhead.py --profile 3000      # cProfile of the Trainer's tiny step path
    python bench/loop_overhead.py --count-calls       # Python calls per step, hand loop vs Trainer

Sizes: ``tiny`` is the MLP 32-64-10 at batch 32 (the loop's own cost dominates), ``compute`` the
MLP 512-2048-2048-10 at batch 256 (~0.1 s of matmuls per step on one CPU thread). Targets:
Trainer <= 1.05x the hand loop on tiny, <= 1.01x on compute.

Every variant trains the same MLP (SGD lr 0.01 momentum 0.9, cross-entropy, clip_grad_norm_,
zero_grad(set_to_none=True)) from the same pool of ready-made batches. Per-step time is the
steady-state window of ``_harness.TimedLoader`` (stamps at batch fetches), so setup and
teardown are outside it. Variants run interleaved in ABBA order after one discarded warm-up
each; ``hand_aa`` is the hand loop a second time (the A/A check: ~1.0, else the machine
changed speed during the run). Reported ratios are paired: the median over repetitions of
(variant / hand of the same repetition). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import warnings
from typing import Any

import _harness as h
import torch
import torch.nn.functional as F
from _tpbench import BenchModule

import torchplug

DEFAULT_STEPS = {"tiny": (50, 500), "compute": (3, 15)}  # (warmup, measure)
QUICK_STEPS = {"tiny": (5, 30), "compute": (1, 2)}
TARGETS = {"tiny": 1.05, "compute": 1.01}


def fit_hand(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=h.LR, momentum=h.MOMENTUM)
    net.train()
    for x, y in loader:
        loss = F.cross_entropy(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def fit_trainer(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    trainer = torchplug.Trainer(accelerator="cpu", max_steps=loader.steps, gradient_clip_val=clip, **h.QUIET)
    trainer.fit(BenchModule(net), train_dataloaders=loader)


def fit_lightning(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    h.fit_lightning(net, loader, loader.steps, clip)


IMPLS = {"hand": fit_hand, "hand_aa": fit_hand, "torchplug": fit_trainer, "lightning": fit_lightning}


def measure_size(size: str, args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    widths, batch = h.SIZES[size]
    warmup, measure = (QUICK_STEPS if args.quick else DEFAULT_STEPS)[size]
    if args.measure:
        measure = args.measure
    batches = h.make_batches(widths, batch)

    def once(name: str) -> float:
        torch.manual_seed(0)
        net = h.make_mlp(widths)
        loader = h.TimedLoader(batches, warmup + measure + 1)
        IMPLS[name](net, loader, args.clip)
        return loader.per_step(warmup, measure)

    samples = h.interleave(once, names, args.reps, label=size, warmup=not args.quick)
    stats = h.summarize(samples, "hand")
    return {"widths": widths, "batch": batch, "warmup": warmup, "measure": measure, "stats": stats,
            "overhead_us": round((stats["torchplug"]["median"] - stats["hand"]["median"]) * 1e3, 1)}


def profile(steps: int, clip: float) -> str:
    """cProfile of ``steps`` tiny Trainer steps: where the per-step time goes."""
    widths, batch = h.SIZES["tiny"]
    batches = h.make_batches(widths, batch)
    fit_trainer(h.make_mlp(widths), h.TimedLoader(batches, 20), clip)  # warm
    net = h.make_mlp(widths)
    loader = h.TimedLoader(batches, steps)
    profiler = cProfile.Profile()
    profiler.enable()
    fit_trainer(net, loader, clip)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    calls = sum(s[1] for s in stats.stats.values())  # type: ignore[attr-defined]
    return out.getvalue() + f"\n{calls / steps:.0f} Python function calls per step\n"


def calls_per_step(fit: Any, clip: float) -> float:
    """Python function calls per tiny step, counted by cProfile: the difference between runs of
    1,000 and 2,000 steps, so setup and teardown cancel. A count, not a time: it does not
    change with the machine's speed, unlike the timings on a shared VM."""
    widths, batch = h.SIZES["tiny"]
    batches = h.make_batches(widths, batch)
    counts = []
    for steps in (1000, 2000):
        fit(h.make_mlp(widths), h.TimedLoader(batches, 20), clip)  # warm
        profiler = cProfile.Profile()
        profiler.enable()
        fit(h.make_mlp(widths), h.TimedLoader(batches, steps), clip)
        profiler.disable()
        stats = pstats.Stats(profiler)
        counts.append(sum(s[1] for s in stats.stats.values()))  # type: ignore[attr-defined]
    return (counts[1] - counts[0]) / 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="tiny,compute", help="comma list of tiny,compute")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 9 tiny+compute, 1 quick)")
    parser.add_argument("--measure", type=int, default=None, help="timed steps per run (default by size)")
    parser.add_argument("--clip", type=float, default=1.0, help="max grad norm; 0 disables clipping")
    parser.add_argument("--no-lightning", action="store_true", help="leave out the Lightning column")
    parser.add_argument("--quick", action="store_true", help="smoke mode: proves the script runs; not a measurement")
    parser.add_argument("--count-calls", action="store_true",
                        help="count Python calls per tiny step, hand loop and Trainer (noise-free)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="print a cProfile of STEPS tiny Trainer steps instead of benchmarking")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.profile:
        print(profile(args.profile, args.clip))
        return
    if args.count_calls:
        counted = {name: calls_per_step(IMPLS[name], args.clip) for name in ("hand", "torchplug")}
        print(f"Python calls per tiny step: hand {counted['hand']:.0f}, torchplug {counted['torchplug']:.0f}")
        h.emit({"bench": "loop_overhead", "calls_per_step": counted})
        return
    if args.reps is None:
        args.reps = 1 if args.quick else 9
    names = ["hand", "torchplug", "hand_aa"]
    if h.lightning_available() and not args.no_lightning:
        names.append("lightning")
    sizes = [s for s in args.sizes.split(",") if s]
    results: dict[str, Any] = {}
    rows = []
    for size in sizes:
        result = measure_size(size, args, names)
        results[size] = result
        stats = result["stats"]
        note = h.aa_note(stats)
        rows.append(h.row(f"step time {size} MLP {'-'.join(map(str, result['widths']))} batch {result['batch']}, "
                          "fp32 (CPU)", "ms/step", stats, "hand", "torchplug", TARGETS[size],
                          lightning="lightning" if "lightning" in stats else None,
                          note=f"overhead {result['overhead_us']} us/step; {note}"))
    print(f"\n{'size':<8} {'hand ms':>9} {'torchplug ms':>13} {'ratio':>7} {'target':>8} {'A/A':>6} "
          f"{'lightning':>10}", flush=True)
    for size in sizes:
        stats = results[size]["stats"]
        light = f"{stats['lightning']['ratio_paired']:.3f}x" if "lightning" in stats else "-"
        print(f"{size:<8} {stats['hand']['median']:>9.4f} {stats['torchplug']['median']:>13.4f} "
              f"{stats['torchplug']['ratio_paired']:>6.3f}x {'<= ' + format(TARGETS[size], '.2f'):>8} "
              f"{stats['hand_aa']['ratio_paired']:>6.3f} {light:>10}", flush=True)
    h.emit({"bench": "loop_overhead", "quick": args.quick, "reps": args.reps, "clip": args.clip,
            "threads": torch.get_num_threads(), "sizes": results, "rows": rows})


if __name__ == "__main__":
    main()
