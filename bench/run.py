"""The benchmark suite: one command, one table, one JSON file.

Usage:
    python bench/run.py [--quick] [--out bench/results/latest.json] [--only part,part] [--skip part,part]

Runs every bench script as a subprocess (each prints one JSON object as its last line), turns
their results into rows of one table, prints it, and writes everything (raw results included) to
``--out``. Every figure is the torchplug Trainer against a hand-written loop measured in the same
run, interleaved, median of repetitions; a PyTorch Lightning column appears where the script
measured it (when ``pytorch_lightning`` is importable). ``--quick`` runs each script in its
smoke mode: it proves the suite runs, its numbers are not measurements.

Parts, in order: see ``PARTS`` (``--list`` prints them).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

Row = dict[str, Any]

#: The issue's targets, printed beside the results.
TARGETS = {
    "tiny": 1.05,  # Trainer / hand loop, tiny MLP step time
    "compute": 1.01,  # Trainer / hand loop, compute-bound MLP step time
    "listing_5000_s": 0.3,  # listing plugins with 5,000 installed distributions
    "import_over_torch_s": 0.15,  # import torchplug minus import torch
}


@dataclass
class Part:
    name: str
    script: str
    args: list[str]
    quick_args: list[str]
    rows: Callable[[dict[str, Any]], list[Row]]
    what: str
    timeout_s: float = 1800.0
    owner_note: str = ""
    env: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------- result adapters
def own_rows(result: dict[str, Any]) -> list[Row]:
    """Scripts written for this suite report their table rows themselves."""
    return list(result.get("rows", []))


def _ratio_row(metric: str, unit: str, hand: Any, trainer: Any, ratio: Any, target: float | None,
               lightning: Any = None, lightning_ratio: Any = None, note: str = "") -> Row:
    row: Row = {"metric": metric, "unit": unit, "hand": hand, "torchplug": trainer, "ratio": ratio,
                "target": f"<= {target:.2f}x" if target is not None else "",
                "ok": (ratio <= target) if (target is not None and isinstance(ratio, (int, float))) else None,
                "note": note}
    if lightning is not None:
        row["lightning"], row["lightning_ratio"] = lightning, lightning_ratio
    return row


def ddp_no_sync_rows(result: dict[str, Any]) -> list[Row]:
    """bench/ddp_no_sync.py: the no_sync accumulation speedup, Trainer vs hand-written DDP."""
    if "rows" in result:
        return own_rows(result)
    ms = result["ms_per_step"]
    window = f"window {result.get('accum')}, micro-batch {result.get('batch')}/rank"
    speed_t = result["speedup_no_sync_trainer"]["paired_median"]
    speed_h = result["speedup_no_sync_hand"]["paired_median"]
    return [
        _ratio_row(f"no_sync speedup (sync every micro-batch / no_sync), ddp 2 gloo ranks, {window}", "x",
                   speed_h, speed_t, round(speed_t / speed_h, 4), None,
                   note="ratio = Trainer speedup / hand speedup; 1.0: the Trainer keeps all of no_sync's gain"),
        _ratio_row("step time, ddp accumulation with no_sync (medium MLP)", "ms/step", ms["hand_no_sync"]["median"],
                   ms["trainer_no_sync"]["median"], result["trainer_vs_hand_no_sync"]["paired_median"], None),
        _ratio_row("step time, ddp accumulation, sync every micro-batch", "ms/step", ms["hand_sync"]["median"],
                   ms["trainer_sync"]["median"], result["trainer_vs_hand_sync"]["paired_median"], None),
        _ratio_row("A/A check of the ddp harness (hand no_sync twice)", "ms/step", ms["hand_no_sync"]["median"],
                   ms["hand_no_sync_aa"]["median"], result["aa_check"]["paired_median"], None,
                   note="the hand loop against itself: distrust the ddp rows if this is outside 0.95-1.05"),
    ]


PARTS = [
    Part("loop_overhead", "loop_overhead.py", [], ["--quick"], own_rows,
         "fp32 step time, Trainer vs hand loop, tiny and compute-bound MLP (+ Lightning)"),
    Part("callbacks_overhead", "callbacks_overhead.py", [], ["--quick"], own_rows,
         "tiny MLP step time with EarlyStopping + ModelCheckpoint + TensorBoard, vs a hand loop writing the same "
         "TensorBoard scalars"),
    Part("module_hooks_overhead", "module_hooks_overhead.py", [], ["--quick"], own_rows,
         "tiny MLP step time with six per-step module hooks, vs a hand loop calling the same hooks"),
    Part("instructions", "instructions.py", [], ["--quick"], own_rows,
         "CPU instructions per step under valgrind, tiny MLP plain and with module hooks (noise-free)"),
    Part("amp_overhead", "amp_overhead.py", [], ["--quick"], own_rows,
         "bf16 native_amp step time on the CPU, Trainer vs hand autocast loop (+ Lightning)"),
    Part("ddp_step", "ddp_step.py", [], ["--quick"], own_rows,
         "step time on two gloo ranks, Trainer(ddp) vs hand-written DDP"),
    Part("sharded_step", "sharded_step.py", [], ["--quick"], own_rows,
         "step time on two gloo ranks, Trainer(fsdp / ddp_zero) vs hand FSDP2 / ZeRO; optimizer state per rank"),
    Part("ddp_no_sync", "ddp_no_sync.py", [], ["--reps", "1", "--warmup", "1", "--measure", "1"], ddp_no_sync_rows,
         "no_sync accumulation speedup, Trainer vs hand-written DDP"),
    Part("handshake", "handshake.py", [], ["--quick"], own_rows,
         "the plan handshake's start-up cost on two gloo ranks (once per fit)"),
    Part("hook_dispatch", "hook_dispatch.py", [], ["--quick"], own_rows,
         "hook dispatch cost per step: façade, raw pluggy, plain calls"),
    Part("discovery_import", "discovery_import.py", [], ["--quick"], own_rows,
         "plugin listing with 1,000/5,000 distributions; import torchplug vs import torch"),
    Part("first_step", "first_step.py", [], ["--quick"], own_rows,
         "time to the first optimizer step, one process and devices=2"),
]


# ---------------------------------------------------------------------------------- running
def run_part(part: Part, quick: bool) -> dict[str, Any]:
    script = BENCH / part.script
    if not script.exists():
        return {"status": "missing", "error": f"{script.relative_to(ROOT)} does not exist"}
    cmd = [sys.executable, str(script), *(part.quick_args if quick else part.args)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               **part.env)
    print(f"\n== {part.name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        # stderr (progress) goes straight to the terminal; stdout ends with the JSON result.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                              timeout=part.timeout_s if not quick else min(part.timeout_s, 600))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.monotonic() - start, 1)}
    seconds = round(time.monotonic() - start, 1)
    result = None
    printed = [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith("{")]
    if printed:  # a script's own table: keep it in the log
        print("\n".join(printed), file=sys.stderr, flush=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if proc.returncode != 0 or result is None:
        return {"status": "failed", "returncode": proc.returncode, "seconds": seconds,
                "stdout_tail": proc.stdout[-2000:]}
    if result.get("skipped"):
        return {"status": "skipped", "reason": result["skipped"], "seconds": seconds, "result": result}
    try:
        rows = part.rows(result)
    except Exception as exc:  # an adapter out of step with its script must not lose the raw result
        return {"status": "ok", "seconds": seconds, "result": result, "rows": [],
                "adapter_error": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "seconds": seconds, "result": result, "rows": rows}


def environment() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "platform": platform.platform(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "commit": commit,
        "versions": {d: version(d) for d in ("torch", "pluggy", "torchplug", "torchplug-ddp", "torchplug-native-amp",
                                             "torchplug-apex", "pytorch-lightning")},
    }


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(rows: list[Row], lightning: bool) -> str:
    head = ["metric", "unit", "hand", "torchplug", "ratio", "target", "ok"]
    if lightning:
        head += ["lightning", "L ratio"]
    lines = [[r.get("metric", ""), r.get("unit", ""), fmt(r.get("hand")), fmt(r.get("torchplug")),
              fmt(r.get("ratio")), r.get("target", ""), fmt(r.get("ok"))]
             + ([fmt(r.get("lightning")), fmt(r.get("lightning_ratio"))] if lightning else []) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: every script in its fastest setting")
    p.add_argument("--out", default=str(BENCH / "results" / "latest.json"), help="where the JSON goes")
    p.add_argument("--only", default="", help="comma list of parts to run")
    p.add_argument("--skip", default="", help="comma list of parts to leave out")
    p.add_argument("--list", action="store_true", help="list the parts and exit")
    args = p.parse_args(argv)
    if args.list:
        for part in PARTS:
            print(f"{part.name:18} bench/{part.script:22} {part.what}")
        return 0
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    unknown = (only | skip) - {part.name for part in PARTS}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; see --list")
    selected = [part for part in PARTS if (not only or part.name in only) and part.name not in skip]

    report: dict[str, Any] = {"suite": "torchplug bench", "quick": args.quick, "environment": environment(),
                              "targets": TARGETS, "parts": {}, "rows": []}
    start = time.monotonic()
    for part in selected:
        outcome = run_part(part, args.quick)
        outcome["what"] = part.what
        report["parts"][part.name] = outcome
        for row in outcome.get("rows", []):
            report["rows"].append({"part": part.name, **row})
        if outcome["status"] != "ok":
            report["rows"].append({"part": part.name, "metric": f"{part.name}: {outcome['status']}",
                                   "note": outcome.get("reason") or outcome.get("error") or ""})
    report["seconds"] = round(time.monotonic() - start, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    lightning = any("lightning" in r for r in report["rows"])
    env = report["environment"]
    print(f"\ntorchplug bench{' (QUICK: smoke mode, not measurements)' if args.quick else ''} — "
          f"{env['date']}, {env['cpu']} x{env['cpu_count']}, torch {env['versions']['torch']}, "
          f"commit {env['commit']}")
    print(table(report["rows"], lightning))
    notes = [f"  [{r['part']}] {r['metric']}: {r['note']}" for r in report["rows"] if r.get("note")]
    if notes:
        print("notes:\n" + "\n".join(notes))
    print(f"\nratio: Trainer / hand loop, median of per-repetition ratios (interleaved); written to {out}")
    failed = [name for name, o in report["parts"].items() if o["status"] in ("failed", "timeout")]
    if failed:
        print(f"FAILED parts: {', '.join(failed)} (see {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
