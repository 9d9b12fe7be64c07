"""CPU instructions per step, counted by valgrind: ``torchplug.Trainer`` against the hand loop,
a measure that does not move with the machine's speed.

Usage:
    python bench/instructions.py [--cases tiny,module_hooks] [--steps 200] [--aa]
    python bench/instructions.py --cases calibration      # the method's own A/A check (no torch)

Wall-clock ratios on a shared 2-vCPU VM spread by ±10% per repetition and the machine switches
between two speeds (bench/README.md). An instruction count is deterministic: each variant runs in
a child process under ``valgrind --tool=callgrind`` with instrumentation off (so ``import torch``
costs ~1 min, not ~3), warms up, switches counting on with ``callgrind_control -i on`` and trains
STEPS steps; a second child trains 2 * STEPS. The difference of the two totals divided by STEPS is
the steady-state count per step, with setup and teardown cancelled. Cases: ``tiny`` (the fp32
MLP 32-64-10 of loop_overhead.py), ``module_hooks`` (the six module hooks of
module_hooks_overhead.py), ``callbacks`` (callbacks_overhead.py's EarlyStopping, ModelCheckpoint
and TensorBoard logger; needs torchplug-tensorboard) and ``calibration`` (the same pure-Python
loop as both variants: its ratio is 1.0000, the counts a few instructions apart). ``--aa`` also
counts the hand loop a second time.

Instructions are a proxy for time, not time: a Python bytecode, a dict lookup and a matmul
instruction cost different cycles. A ratio here above the wall-clock one means the overhead is
in work the CPU does fast; below it, in stalls (memory, branches). Needs ``valgrind`` and
``callgrind_control`` on PATH (Debian: ``apt-get install valgrind``). The last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _harness as h

BENCH = Path(__file__).resolve().parent
TARGET = 1.05
WARMUP = 20
CASES = ("tiny", "module_hooks", "callbacks", "calibration")
WHAT = {
    "tiny": "CPU instructions per step, tiny MLP 32-64-10 batch 32 fp32",
    "module_hooks": "CPU instructions per step, tiny MLP with six per-step module hooks",
    "callbacks": "CPU instructions per step, tiny MLP with EarlyStopping + ModelCheckpoint + TensorBoard",
    "calibration": "CPU instructions per step, the same pure-Python loop twice (A/A of the method)",
}


def _calibration_loop(net: Any, loader: h.TimedLoader, clip: float) -> None:
    total = 0
    for batch in loader:
        total += sum(range(len(batch) * 100))  # some thousands of instructions per step


Fit = Callable[[Any, h.TimedLoader, float], None]


def _in_temporary_folder(fit: Callable[[Any, h.TimedLoader, Path], None]) -> Fit:
    """callbacks_overhead.py's fits write TensorBoard files and checkpoints under a folder."""
    def run(net: Any, loader: h.TimedLoader, clip: float) -> None:
        with tempfile.TemporaryDirectory() as folder:
            fit(net, loader, Path(folder))

    return run


def workload(case: str, variant: str) -> tuple[Fit, Callable[[], Any], Any]:
    """The fit function, a model factory and the batches of ``case``'s ``variant``."""
    if case == "calibration":
        return _calibration_loop, lambda: None, [(1, 2)] * 8
    import torch

    torch.set_num_threads(1)
    fit: Fit
    if case == "tiny":
        import loop_overhead

        fit = loop_overhead.fit_hand if variant.startswith("hand") else loop_overhead.fit_trainer
    elif case == "callbacks":
        import callbacks_overhead

        fit = _in_temporary_folder(callbacks_overhead.fit_hand if variant.startswith("hand")
                                   else callbacks_overhead.fit_trainer)
    else:
        import module_hooks_overhead

        fit = module_hooks_overhead.fit_hand if variant.startswith("hand") else module_hooks_overhead.fit_trainer
    widths, batch = h.SIZES["tiny"]
    return fit, lambda: h.make_mlp(widths), h.make_batches(widths, batch)


def child(case: str, variant: str, steps: int) -> None:
    """Runs under callgrind: warm up uncounted, then count one fit of ``steps`` steps."""
    import warnings

    warnings.filterwarnings("ignore")
    fit, model, batches = workload(case, variant)
    fit(model(), h.TimedLoader(batches, WARMUP), 1.0)
    net, loader = model(), h.TimedLoader(batches, steps)
    # callgrind_control returns once counting is on; this process waits for it, so nothing of the
    # counted fit runs uncounted (and the wait itself cancels between the two step counts).
    subprocess.run(["callgrind_control", "--instr=on", str(os.getpid())], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # no pipes to read: a fixed cost
    fit(net, loader, 1.0)


def count(case: str, variant: str, steps: int, folder: str) -> int:
    """Instructions callgrind counted in one child (``Collected`` on its stderr)."""
    out = os.path.join(folder, f"{case}.{variant}.{steps}.callgrind")
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         sys.executable, str(Path(__file__).resolve()), "--child", case, variant, str(steps)],
        cwd=BENCH, env=env, capture_output=True, text=True, timeout=1800,
    )
    found = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"{case}/{variant}/{steps} under valgrind failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return int(found.group(1))


def per_step(totals: dict[int, int], steps: int) -> float:
    """The steady-state count per step from the totals of ``steps`` and ``2 * steps`` steps."""
    return (totals[2 * steps] - totals[steps]) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--cases", default="tiny,module_hooks", help=f"comma list of {','.join(CASES)}")
    parser.add_argument("--steps", type=int, default=200, help="counted steps (the second child counts twice as many)")
    parser.add_argument("--aa", action="store_true", help="count the hand loop a second time (hand_aa)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="children at once")
    parser.add_argument("--quick", action="store_true", help="smoke mode: the calibration case only, 50 steps")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "VARIANT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        h.emit({"bench": "instructions", "skipped": f"{' and '.join(missing)} not on PATH "
                "(Debian: apt-get install valgrind)", "rows": []})
        return
    cases = ["calibration"] if args.quick else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {CASES}")
    steps = 50 if args.quick else args.steps
    variants = ["hand", "torchplug"] + (["hand_aa"] if args.aa else [])
    runs = [(case, variant, n) for case in cases for variant in variants for n in (steps, 2 * steps)]
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        totals = dict(zip(runs, pool.map(lambda run: count(run[0], run[1], run[2], folder), runs)))
    result: dict[str, Any] = {"bench": "instructions", "quick": args.quick, "steps": steps, "cases": {}, "rows": []}
    for case in cases:
        counts = {v: per_step({n: totals[(case, v, n)] for n in (steps, 2 * steps)}, steps) for v in variants}
        ratios = {v: round(counts[v] / counts["hand"], 4) for v in variants}
        result["cases"][case] = {"per_step": counts, "ratio": ratios}
        note = f"A/A {ratios['hand_aa']:.4f}; " if "hand_aa" in ratios else ""
        result["rows"].append({
            "metric": WHAT[case], "unit": "k instructions/step",
            "hand": round(counts["hand"] / 1e3, 2), "torchplug": round(counts["torchplug"] / 1e3, 2),
            "ratio": ratios["torchplug"], "target": f"<= {TARGET:.2f}x", "ok": ratios["torchplug"] <= TARGET,
            "note": note + "counted by valgrind (deterministic; a proxy for time)",
        })
        aa = f"  A/A {ratios['hand_aa']:.4f}" if "hand_aa" in ratios else ""
        h.progress(f"{case}: hand {counts['hand']:,.0f}  torchplug {counts['torchplug']:,.0f} instructions/step"
                   f"  ratio {ratios['torchplug']:.4f}{aa}")
    h.emit(result)


if __name__ == "__main__":
    main()
