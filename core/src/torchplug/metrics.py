"""Where metrics go: a CSV file in the run folder, and a progress bar on a terminal."""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from torchplug.errors import MisconfigurationError

if TYPE_CHECKING:
    from torchplug.hookcalls import Hooks
    from torchplug.losscheck import LossCheck
    from torchplug.module import MetricStore
    from torchplug.outputs import RunOutputs
    from torchplug.state import RunState
    from torchplug.trainer import Trainer

CSV_FIELDS = ("step", "epoch", "metric", "value")


def to_floats(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """One host sync for all tensor values, not one per metric."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        stacked = torch.stack([t.reshape(()).float() for t in tensors.values()]).cpu().tolist()
        out.update(zip(tensors, stacked))
    return out


class CSVLogger:
    """Appends ``step,epoch,metric,value`` rows to ``metrics.csv``: a long format that
    survives new metric names and a crash mid-run (each flush ends on a complete row)."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / "metrics.csv"
        self.rows = 0
        self._closed = False
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            self._file: IO[str] = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(CSV_FIELDS)
                self._file.flush()
        except OSError as exc:
            raise MisconfigurationError(
                f"Cannot write metrics to {self.path}: {exc}. Choose a writable "
                "default_root_dir, or turn metrics off with Trainer(logger=False)."
            ) from exc

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        try:
            for name, value in metrics.items():
                self._writer.writerow((step, epoch, name, repr(float(value))))
            self._file.flush()
            self.rows += len(metrics)
        except OSError as exc:
            raise OSError(exc.errno, f"Writing metrics to {self.path} failed: {exc}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # once: a close that failed is not retried (the file is closed anyway)
        try:
            self._file.close()
        except OSError as exc:
            raise OSError(exc.errno, f"Writing metrics to {self.path} failed: {exc}") from exc


def read_csv(path: str | Path) -> dict[str, list[tuple[int, int, float]]]:
    """``metrics.csv`` as ``{metric: [(step, epoch, value), ...]}`` in file order."""
    series: dict[str, list[tuple[int, int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_FIELDS:
            raise ValueError(f"{path} is not a torchplug metrics.csv (header {header!r})")
        for step, epoch, metric, value in reader:
            series.setdefault(metric, []).append((int(step), int(epoch), float(value)))
    return series


class ProgressBar:
    """A tqdm bar per epoch, shown only on a terminal (stderr is a TTY)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def start_epoch(self, epoch: int, total: int | None, initial: int = 0) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.close()
            try:  # a terminal that reports no size (a fresh pty) would get a zero-width bar
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except (OSError, ValueError):
                sized = False
            self._bar = tqdm(total=total, initial=initial, desc=f"Epoch {epoch}", leave=True, file=sys.stderr,
                             dynamic_ncols=sized, ncols=None if sized else 100)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, metrics: dict[str, float], prog_bar: Collection[str] = ()) -> None:
        """Show the metrics logged with ``prog_bar=True``; while none is, every metric."""
        if self._bar is not None:
            self._bar.set_postfix(postfix(metrics, prog_bar), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def postfix(metrics: dict[str, float], prog_bar: Collection[str] = ()) -> dict[str, str]:
    """What the progress bar shows of ``metrics``."""
    shown = {k: v for k, v in metrics.items() if k in prog_bar} if prog_bar else metrics
    return {k: f"{v:.4g}" if math.isfinite(v) else str(v) for k, v in shown.items()}

class TrainLogging:
    """The logging steps of :class:`torchplug.loop.FitLoop` (whose attributes they use): what
    was logged during training goes to ``callback_metrics``, ``metrics.csv``, ``on_log_metrics``
    and the progress bar, in one host transfer per row."""

    trainer: Trainer
    hooks: Hooks
    state: RunState
    metrics: MetricStore
    outputs: RunOutputs
    losses: LossCheck

    def log_train(self, event: dict[str, float] | None = None) -> None:
        """Write the metrics logged since the last call (and ``event``'s, already floats): one
        host transfer for all of them, one metrics row, one ``on_log_metrics`` call."""
        state = self.state
        self.losses.flush(state.global_step)
        if state.skipped_steps:
            state.callback_metrics["skipped_steps"] = float(state.skipped_steps)
        values = {**(event or {}), **self.take_logged()}
        if not values:
            return
        logged = {k: v for k, v in values.items() if k not in self.metrics.not_logged}
        if logged:
            state.logged_metrics.update(logged)
            self.outputs.log(state.global_step, state.epoch, logged)
            if self.trainer.is_global_zero:
                self.hooks.on_log_metrics(trainer=self.trainer, metrics=logged, step=state.global_step)
        self.outputs.progress.show(state.callback_metrics, self.metrics.prog_bar)

    def take_logged(self) -> dict[str, float]:
        """The training metrics logged since the last row, as floats (one host transfer), now
        in ``callback_metrics``; the store is emptied."""
        if not self.metrics.train:
            return {}
        values = to_floats(self.metrics.train)
        self.metrics.train.clear()
        self.state.callback_metrics.update(values)
        return values
