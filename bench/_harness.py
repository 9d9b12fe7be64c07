"""Shared pieces of the bench scripts written for bench/run.py: models, a timed loader, the
Trainer arguments, and the statistics every script reports (no torchplug import here).

Method (see bench/README.md): every figure is a ratio against a hand-written loop measured in
the same process, the variants interleaved (ABBA order per repetition), one discarded warm-up
run per variant, median over repetitions; the paired ratio is the median of the per-repetition
ratios, which is robust to the machine changing speed between repetitions.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: first_step.py's parent process never needs it
    import torch
    from torch import nn

LR = 0.01
MOMENTUM = 0.9

#: name: (layer widths, batch size). "tiny" is the issue's 32-64-10 at batch 32; "compute" is
#: the compute-bound MLP (~110 ms per fp32 step on one CPU thread here).
SIZES: dict[str, tuple[tuple[int, ...], int]] = {
    "tiny": ((32, 64, 10), 32),
    "compute": ((512, 2048, 2048, 10), 256),
}


def make_mlp(widths: Sequence[int]) -> nn.Sequential:
    from torch import nn

    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_batches(widths: Sequence[int], batch: int, pool: int = 8, seed: int = 0,
                 device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A pool of ready-made batches: data loading is not what is timed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(pool * batch, widths[0], generator=g)
    ys = torch.randint(0, widths[-1], (pool * batch,), generator=g)
    return [(xs[i * batch:(i + 1) * batch].to(device), ys[i * batch:(i + 1) * batch].to(device))
            for i in range(pool)]


class TimedLoader:
    """Hands out ``steps`` batches from a pool and notes ``time.perf_counter()`` at every fetch.

    Per-step time is ``(stamps[warmup + measure] - stamps[warmup]) / measure``: a steady-state
    window that leaves out setup and teardown, and is the same measurement for any loop that
    reads the loader (a Trainer, Lightning, a hand loop). ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before the two window stamps so queued GPU work is counted.
    """

    def __init__(self, batches: Sequence[Any], steps: int, sync: Callable[[], None] | None = None,
                 sync_at: Sequence[int] = ()) -> None:
        self.batches, self.steps, self.sync, self.sync_at = list(batches), steps, sync, set(sync_at)
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        self.stamps = []
        for i in range(self.steps):
            if self.sync is not None and i in self.sync_at:
                self.sync()
            self.stamps.append(time.perf_counter())
            yield self.batches[i % len(self.batches)]

    def per_step(self, warmup: int, measure: int) -> float:
        if len(self.stamps) <= warmup + measure:
            raise RuntimeError(f"the loop fetched {len(self.stamps)} batches, expected {warmup + measure + 1}")
        return (self.stamps[warmup + measure] - self.stamps[warmup]) / measure


#: Trainer arguments that switch off everything a hand loop does not do either.
QUIET: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}


def lightning_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytorch_lightning") is not None


def fit_lightning(net: nn.Module, loader: Any, steps: int, clip: float, **extra: Any) -> None:
    """PyTorch Lightning's fit on the same module, loss, optimizer and loader (optional column)."""
    import importlib
    import logging

    import torch
    import torch.nn.functional as F

    pl = importlib.import_module("pytorch_lightning")  # optional: not a dependency of anything
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.net = inner

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    kwargs: dict[str, Any] = {
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "accelerator": "cpu", "devices": 1, "max_epochs": 1,
        "max_steps": steps, "num_sanity_val_steps": 0,
    }
    if clip:
        kwargs["gradient_clip_val"] = clip
    kwargs.update(extra)
    pl.Trainer(**kwargs).fit(Module(net), train_dataloaders=loader)


# ------------------------------------------------------------------------------- statistics
def abba(names: Sequence[str], rep: int) -> list[str]:
    """The interleaving order of repetition ``rep``: forward on even, reversed on odd."""
    return list(names) if rep % 2 == 0 else list(reversed(names))


def interleave(once: Callable[[str], float], names: Sequence[str], reps: int, label: str,
               warmup: bool = True) -> dict[str, list[float]]:
    """One discarded warm-up call of ``once(name)`` per variant (unless ``warmup`` is false:
    smoke runs), then ``reps`` repetitions in ABBA order; returns the samples per variant
    (progress on stderr unless ``label`` is empty)."""
    for name in names if warmup else ():
        once(name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in abba(names, rep):
            samples[name].append(once(name))
        if label:
            progress(f"{label} rep {rep}: " + "  ".join(f"{n} {samples[n][-1] * 1e3:.3f} ms" for n in names))
    return samples


def summarize(samples: dict[str, list[float]], base: str, scale: float = 1e3) -> dict[str, Any]:
    """Median/min/max of each variant (times ``scale``) and its ratio against ``base``:
    ratio of medians and the paired ratio (median of per-repetition ratios)."""
    out: dict[str, Any] = {}
    base_values = samples[base]
    base_med = statistics.median(base_values)
    for name, values in samples.items():
        med = statistics.median(values)
        paired = [a / b for a, b in zip(values, base_values)]
        out[name] = {
            "median": round(med * scale, 4),
            "min": round(min(values) * scale, 4),
            "max": round(max(values) * scale, 4),
            "ratio": round(med / base_med, 4),
            "ratio_paired": round(statistics.median(paired), 4),
            "ratio_per_rep": [round(r, 3) for r in paired],
        }
    return out


def row(metric: str, unit: str, stats: dict[str, Any], hand: str, trainer: str,
        target: float | None = None, lightning: str | None = None, note: str = "") -> dict[str, Any]:
    """One line of run.py's table: the Trainer against the hand loop (and Lightning)."""
    ratio = stats[trainer]["ratio_paired"]
    result: dict[str, Any] = {
        "metric": metric, "unit": unit,
        "hand": stats[hand]["median"], "torchplug": stats[trainer]["median"],
        "ratio": ratio, "target": f"<= {target:.2f}x" if target is not None else "",
        "ok": (ratio <= target) if target is not None else None, "note": note,
    }
    if lightning is not None and lightning in stats:
        result["lightning"] = stats[lightning]["median"]
        result["lightning_ratio"] = stats[lightning]["ratio_paired"]
    return result


def stamp(path: str, what: str) -> None:
    """Append ``what <time.monotonic()>`` to ``path`` in one write (several processes share the
    file; CLOCK_MONOTONIC is system-wide, so stamps of different processes compare)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {time.monotonic():.6f}\n".encode())
    finally:
        os.close(fd)


def aa_note(stats: dict[str, Any], name: str = "hand_aa") -> str:
    """The A/A check's verdict: the hand loop against itself should give ~1.0."""
    if name not in stats:
        return ""
    aa = stats[name]["ratio_paired"]
    verdict = "" if 0.95 <= aa <= 1.05 else " OUTSIDE 0.95-1.05: the machine changed speed, distrust this row"
    return f"A/A (hand vs hand) {aa:.3f}{verdict}"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """The script's result: one JSON object, the last line of stdout."""
    import importlib.metadata

    result.setdefault("torch", importlib.metadata.version("torch"))
    print(json.dumps(result), flush=True)
