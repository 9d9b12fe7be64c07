"""Plugin listing with many installed distributions, and what ``import torchplug`` costs.

Usage:
    python bench/discovery_import.py [--n 1000,5000] [--reps 5] [--import-reps 9] [--quick]

(a) Listing. For each N, a temporary folder gets N fake ``*.dist-info`` distributions (METADATA
    + entry_points.txt, as in the shared bench/discovery.py): every 10th declares a
    ``torchplug.plugins`` entry point whose module exists and writes a marker file when
    imported; the rest declare another group. A fresh subprocess puts the folder first on
    ``sys.path``, imports ``torchplug.listing`` (not timed: that is ``import torchplug``, part
    (b)), then times the ``torchplug plugins --json`` machinery (``listing.main(["--json"])``:
    scan, statuses, JSON) on its first call, and checks that every fake plugin was listed and
    none was imported (marker file and ``sys.modules``). The reference is the standard
    library's ``importlib.metadata.entry_points()`` (first call in its own process, both groups
    selected), measured interleaved with it. Also timed: the whole command,
    ``python -m torchplug.listing --json``, interpreter start and ``import torch`` included.
(b) Import. ``python -c "import torch"`` and ``python -c "import torchplug"`` (and a bare
    ``python -c pass``) in subprocesses, interleaved, one discarded warm-up each, median of
    repetitions, with the paired per-repetition difference; plus the in-process cost of
    ``import torchplug`` after ``import torch`` (the precise figure the target is checked on:
    the subprocess difference carries the ±0.3 s noise of importing torch on this machine).

Targets: listing 1,000 < 0.3 s (issue 2) and 5,000 < 0.3 s (issue 8); ``import torchplug``
adds < 0.15 s to ``import torch``. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LISTING_TARGET_S = 0.3
IMPORT_TARGET_S = 0.15

LISTING_CHILD = r"""
import contextlib, io, json, sys, time
sys.path.insert(0, sys.argv[1])
import torchplug.listing as listing
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = listing.main(["--json"])
t1 = time.perf_counter()
data = json.loads(out.getvalue())
fake = [p for p in data["plugins"] if p["name"].startswith("plug")]
imported = sorted(m for m in sys.modules if m.startswith("fakepkg"))
print(json.dumps({"seconds": t1 - t0, "code": code, "listed": len(fake), "imported": imported}))
"""

STDLIB_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from importlib.metadata import entry_points
t0 = time.perf_counter()
eps = entry_points()
found = list(eps.select(group="torchplug.plugins")) + list(eps.select(group="torchplug.autoload"))
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "listed": sum(ep.name.startswith("plug") for ep in found)}))
"""

AFTER_TORCH_CHILD = r"""
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import torchplug
t2 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "torchplug_after_torch": t2 - t1}))
"""

MARKER = """import os
with open(os.environ["BENCH_IMPORT_MARKER"], "a") as _f:
    _f.write(__name__ + "\\n")


class Plugin:
    pass
"""


def make_dists(root: Path, n: int) -> int:
    """N fake distributions; every 10th has a torchplug.plugins entry point (with its module)."""
    plugins = 0
    for i in range(n):
        dist_info = root / f"fakepkg{i}-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepkg{i}\nVersion: 1.0\n")
        group = "torchplug.plugins" if i % 10 == 0 else "other.group"
        (dist_info / "entry_points.txt").write_text(f"[{group}]\nplug{i} = fakepkg{i}.plugin:Plugin\n")
        if i % 10 == 0:
            package = root / f"fakepkg{i}"
            package.mkdir()
            (package / "__init__.py").write_text("")
            (package / "plugin.py").write_text(MARKER)
            plugins += 1
    return plugins


def child(code: str, *args: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def stats(values: list[float], scale: float = 1e3) -> dict[str, float]:
    return {"median": round(statistics.median(values) * scale, 2), "min": round(min(values) * scale, 2),
            "max": round(max(values) * scale, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="1000,5000", help="comma list of installed-distribution counts")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each listing measurement")
    parser.add_argument("--import-reps", type=int, default=9, help="repetitions of each import measurement")
    parser.add_argument("--command-reps", type=int, default=3, help="repetitions of the whole-command timing")
    parser.add_argument("--tmpdir", default=None, help="parent of the temporary dist-info trees")
    parser.add_argument("--quick", action="store_true", help="smoke mode: N=1000, one repetition each")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.reps, args.import_reps, args.command_reps = "1000", 1, 1, 1
    ns = [int(x) for x in args.n.split(",") if x]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHPLUG_")}
    env["OMP_NUM_THREADS"] = "1"
    result: dict[str, Any] = {"bench": "discovery_import", "python": sys.version.split()[0], "reps": args.reps,
                              "listing": {}, "import": {}, "rows": []}

    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        marker = Path(tmp) / "imported.txt"
        env["BENCH_IMPORT_MARKER"] = str(marker)
        roots, expected = {}, {}
        for n in ns:
            roots[n] = Path(tmp) / f"n{n}"
            roots[n].mkdir()
            expected[n] = make_dists(roots[n], n)
        samples: dict[int, dict[str, list[float]]] = {n: {"torchplug": [], "stdlib": [], "command": []} for n in ns}
        for rep in range(args.reps):
            for n in ns:
                order = (LISTING_CHILD, STDLIB_CHILD) if rep % 2 == 0 else (STDLIB_CHILD, LISTING_CHILD)
                for code in order:
                    out = child(code, str(roots[n]), env=env)
                    if out["listed"] != expected[n]:
                        raise RuntimeError(f"N={n}: listed {out['listed']} of {expected[n]} fake plugins")
                    if code is LISTING_CHILD:
                        if out["imported"] or marker.exists():
                            raise RuntimeError(f"N={n}: listing imported plugin modules: {out['imported']}")
                        samples[n]["torchplug"].append(out["seconds"])
                    else:
                        samples[n]["stdlib"].append(out["seconds"])
        for _ in range(args.command_reps):
            for n in ns:
                cmd_env = {**env, "PYTHONPATH": str(roots[n])}
                samples[n]["command"].append(wall([sys.executable, "-m", "torchplug.listing", "--json"], cmd_env))
                if marker.exists():
                    raise RuntimeError(f"N={n}: the listing command imported a plugin module")
        for n in ns:
            ours, ref = samples[n]["torchplug"], samples[n]["stdlib"]
            paired = [a / b for a, b in zip(ours, ref)]
            row: dict[str, Any] = {"torchplug_ms": stats(ours), "stdlib_entry_points_ms": stats(ref),
                   "ratio_paired": round(statistics.median(paired), 3), "command_ms": stats(samples[n]["command"]),
                   "plugins_listed": expected[n], "plugin_modules_imported": 0}
            result["listing"][str(n)] = row
            median_s = statistics.median(ours)
            issue = "issue 2" if n == 1000 else "issue 8" if n == 5000 else ""
            result["rows"].append({
                "metric": f"list plugins, {n} installed distributions", "unit": "ms",
                "hand": row["stdlib_entry_points_ms"]["median"], "torchplug": row["torchplug_ms"]["median"],
                "ratio": row["ratio_paired"], "target": f"< {LISTING_TARGET_S * 1e3:.0f} ms",
                "ok": median_s < LISTING_TARGET_S,
                "note": (f"hand = stdlib entry_points(); 0 of {expected[n]} plugin modules imported; whole "
                         f"command incl. import torch {row['command_ms']['median']:.0f} ms"
                         + (f" ({issue} target)" if issue else "")),
            })

    # (b) imports, interleaved, one warm-up each (page cache, .pyc files)
    codes = {"pass": "pass", "torch": "import torch", "torchplug": "import torchplug"}
    for code in codes.values():
        wall([sys.executable, "-c", code], env)
    times: dict[str, list[float]] = {name: [] for name in codes}
    after: list[float] = []
    for rep in range(args.import_reps):
        names = list(codes) if rep % 2 == 0 else list(reversed(codes))
        for name in names:
            times[name].append(wall([sys.executable, "-c", codes[name]], env))
        after.append(child(AFTER_TORCH_CHILD, env=env)["torchplug_after_torch"])
    diffs = [a - b for a, b in zip(times["torchplug"], times["torch"])]
    result["import"] = {
        "wall_ms": {name: stats(values) for name, values in times.items()},
        "torchplug_minus_torch_paired_ms": round(statistics.median(diffs) * 1e3, 1),
        "torchplug_after_torch_in_process_ms": stats(after),
    }
    after_s = statistics.median(after)
    result["rows"].append({
        "metric": "import torchplug on top of import torch", "unit": "ms",
        "hand": result["import"]["wall_ms"]["torch"]["median"],
        "torchplug": result["import"]["wall_ms"]["torchplug"]["median"],
        "ratio": round(statistics.median(times["torchplug"]) / statistics.median(times["torch"]), 3),
        "target": f"+< {IMPORT_TARGET_S * 1e3:.0f} ms", "ok": after_s < IMPORT_TARGET_S,
        "note": (f"hand = python -c 'import torch'; torchplug adds {after_s * 1e3:.0f} ms in-process after torch "
                 f"(subprocess paired difference {result['import']['torchplug_minus_torch_paired_ms']:.0f} ms, "
                 "within torch's import noise)"),
    })

    print(table(result["rows"]))
    print(json.dumps(result))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    head = ["metric", "stdlib / torch", "torchplug", "ratio", "target", "ok"]
    lines = [[r["metric"], f"{r['hand']:.1f} ms", f"{r['torchplug']:.1f} ms", f"{r['ratio']:.3g}", r["target"],
              "yes" if r["ok"] else "NO"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out += ["notes:"] + [f"  {r['metric']}: {r['note']}" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
