"""``TensorBoardLogger``: every metrics row at its global step, and the run's hyperparameters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from torchplug import MisconfigurationError, Plugin, Trainer

#: hyperparameter values TensorBoard's hparams plugin can show as they are; others become str
_SCALARS = (bool, int, float, str)


class TensorBoardLogger(Plugin):
    """Write TensorBoard event files with ``torch.utils.tensorboard.SummaryWriter``.

    :param log_dir: where the event files go; default: the run folder (``trainer.log_dir``,
        ``torchplug_logs/version_N``), so ``tensorboard --logdir torchplug_logs`` shows every run.
    :param log_hyperparams: write the module's ``hparams`` (a mapping) if it has one, else the
        Trainer's arguments (``trainer.arguments``), to TensorBoard's HPARAMS tab.
    :param flush_secs: how often the writer flushes on its own.

    Every row the core writes (``on_log_metrics``: the logging interval, epoch ends, validation
    ends) becomes one scalar per metric at its global step. Global rank 0 only writes; the
    writer is flushed and closed when the fit ends, also on an exception.
    """

    plugin_name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, log_hyperparams: bool = True,
                 flush_secs: int = 120) -> None:
        self.log_dir = Path(log_dir).absolute() if log_dir is not None else None
        self.log_hyperparams = log_hyperparams
        self.flush_secs = flush_secs
        self._writer: Any = None
        #: the folder written to, once a fit started on rank 0
        self.written_dir: Path | None = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger(log_dir={self.log_dir!r})"

    def __getstate__(self) -> dict[str, Any]:  # the open writer stays in its process
        return {"log_dir": self.log_dir, "log_hyperparams": self.log_hyperparams, "flush_secs": self.flush_secs,
                "_writer": None, "written_dir": None}

    def check_configuration(self, trainer: Trainer) -> None:
        if trainer.fast_dev_run:
            return  # a fast_dev_run writes no logger files (Lightning's semantics): on_fit_start opens no writer
        if self.log_dir is None and not (trainer.logger or trainer.enable_checkpointing):
            raise MisconfigurationError(
                "TensorBoardLogger (plugin 'tensorboard', distribution torchplug-tensorboard) writes into the run "
                "folder, and Trainer(logger=False, enable_checkpointing=False) makes none. Pass "
                "TensorBoardLogger(log_dir=...) or turn logger or checkpointing on."
            )

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported on use: tensorboard is slow to import

        target = self.log_dir if self.log_dir is not None else Path(str(trainer.log_dir))
        self.written_dir = target
        self._writer = SummaryWriter(log_dir=str(target), flush_secs=self.flush_secs)
        if self.log_hyperparams:
            self._write_hparams(hyperparameters(model, trainer))

    def on_log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(name, value, global_step=step)

    def on_fit_end(self) -> None:
        self._close()

    def on_exception(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def _write_hparams(self, params: dict[str, Any]) -> None:
        # add_hparams would write into a new sub-run; written like this they belong to this run.
        from torch.utils.tensorboard.summary import hparams

        experiment, start, end = hparams(params, {})  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        writer = self._writer.file_writer
        for summary in (experiment, start, end):
            writer.add_summary(summary)


def hyperparameters(model: nn.Module, trainer: Trainer) -> dict[str, Any]:
    """The module's ``hparams`` mapping if it has one, else the Trainer's arguments, with
    values TensorBoard cannot show (lists, objects, None) written as strings."""
    found = getattr(model, "hparams", None)
    source = dict(found) if isinstance(found, dict) else trainer.arguments
    return {str(k): v if isinstance(v, _SCALARS) else str(v) for k, v in source.items()}
