"""Step time with native AMP on the CPU: ``Trainer(precision="bf16")`` against a hand-written
``torch.autocast("cpu", dtype=torch.bfloat16)`` loop (and PyTorch Lightning's
``precision="bf16-mixed"`` when it is installed).

Usage:
    python bench/amp_overhead.py [--sizes tiny,compute] [--reps 9] [--precision bf16|32] [--quick]

Every variant trains the same MLP (SGD lr 0.01 momentum 0.9, cross-entropy, clip_grad_norm_ 1.0)
from the same loader of ready-made batches; per-step time is the steady-state window of
``_harness.TimedLoader``. Variants are interleaved (ABBA) and each gets one discarded warm-up
fit. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from typing import Any

import _harness as h
import torch
import torch.nn.functional as F
from _tpbench import BenchModule

import torchplug

DEFAULT_STEPS = {"tiny": (50, 400), "compute": (3, 12)}  # (warmup, measure)
QUICK_STEPS = {"tiny": (5, 30), "compute": (1, 2)}
TARGETS = {"tiny": 1.05, "compute": 1.01}


def fit_hand(net: torch.nn.Module, loader: h.TimedLoader, clip: float, precision: str) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=h.LR, momentum=h.MOMENTUM)
    net.train()
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def fit_trainer(net: torch.nn.Module, loader: h.TimedLoader, clip: float, precision: str) -> list[str]:
    trainer = torchplug.Trainer(accelerator="cpu", precision=precision if precision == "bf16" else 32,
                                max_steps=loader.steps, gradient_clip_val=clip, **h.QUIET)
    trainer.fit(BenchModule(net), train_dataloaders=loader)
    return trainer.plugin_names


def fit_lightning(net: torch.nn.Module, loader: h.TimedLoader, clip: float, precision: str) -> None:
    h.fit_lightning(net, loader, loader.steps, clip, precision="bf16-mixed" if precision == "bf16" else "32-true")


def run_once(impls: dict[str, Any], widths: tuple[int, ...], batches: list[Any], warmup: int, measure: int,
             args: argparse.Namespace, plugins: list[str], name: str) -> float:
    torch.manual_seed(0)
    loader = h.TimedLoader(batches, warmup + measure + 1)
    out = impls[name](h.make_mlp(widths), loader, args.clip, args.precision)
    if name == "torchplug":
        plugins[:] = out
    return loader.per_step(warmup, measure)


#: bf16/fp32 time of a probe matmul above which the compute-bound bf16 size is skipped
SLOW_BF16 = 10.0


def bf16_slowdown() -> float:
    """How much slower a bf16 matmul is than fp32 here (64x512 @ 512x512, best of 3). About 1-2
    where the CPU has native bf16 (AVX512-BF16, AMX); ~40 on an AVX2-only CPU, where torch falls
    back to a scalar path and one compute-bound bf16 step takes minutes instead of ~50 ms."""
    a, b = torch.randn(64, 512), torch.randn(512, 512)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.bfloat16] / best[torch.float32]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,compute")
    p.add_argument("--precision", choices=["bf16", "32"], default="bf16")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--clip", type=float, default=1.0, help="max grad norm; 0 disables clipping")
    p.add_argument("--no-lightning", action="store_true", help="leave PyTorch Lightning out even if installed")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 repetition, a few steps")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    reps = 1 if args.quick else args.reps
    steps_table = QUICK_STEPS if args.quick else DEFAULT_STEPS

    # hand_aa: the hand loop again, an A/A check of the harness (its ratio should be ~1.0).
    impls: dict[str, Any] = {"hand": fit_hand, "torchplug": fit_trainer, "hand_aa": fit_hand}
    if not args.no_lightning and h.lightning_available():
        impls["lightning"] = fit_lightning
    result: dict[str, Any] = {"bench": "amp_overhead", "precision": args.precision, "reps": reps,
                              "clip": args.clip, "threads": 1, "sizes": {}, "rows": []}
    try:
        torchplug.Trainer(precision="bf16" if args.precision == "bf16" else 32, **h.QUIET)
    except Exception as exc:  # e.g. torchplug-native-amp not installed
        result["skipped"] = f"{type(exc).__name__}: {exc}"
        h.emit(result)
        return

    slowdown = bf16_slowdown() if args.precision == "bf16" else 1.0
    for size in args.sizes.split(","):
        widths, batch = h.SIZES[size]
        if size == "compute" and slowdown > SLOW_BF16:
            why = (f"skipped: a bf16 matmul is {slowdown:.0f}x slower than fp32 on this CPU (torch CPU capability "
                   f"{torch.backends.cpu.get_cpu_capability()}, no native bf16), so this size would take hours")
            result["sizes"][size] = {"widths": widths, "batch": batch, "skipped": why}
            h.progress(f"amp_overhead {size}: {why}")
            continue
        warmup, measure = steps_table[size]
        plugins: list[str] = []
        once = functools.partial(run_once, impls, widths, h.make_batches(widths, batch), warmup, measure, args, plugins)
        samples = h.interleave(once, list(impls), reps, f"amp_overhead {size}", warmup=not args.quick)
        stats = h.summarize(samples, "hand")
        result["sizes"][size] = {"widths": widths, "batch": batch, "warmup": warmup, "measure": measure,
                                 "plugins": plugins, "ms_per_step": stats}
        label = "bf16 native_amp" if args.precision == "bf16" else "fp32"
        result["rows"].append(h.row(f"step time {size} MLP, {label} (CPU)", "ms/step", stats, "hand", "torchplug",
                                    target=TARGETS[size], lightning="lightning", note=h.aa_note(stats)))
    h.emit(result)


if __name__ == "__main__":
    main()
