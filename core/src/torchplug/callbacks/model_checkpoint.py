"""``ModelCheckpoint``: keep the best ``save_top_k`` checkpoints by a monitored metric."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchplug.callbacks._common import StatefulCallback, check_mode, improved, monitored, state_key
from torchplug.errors import MisconfigurationError
from torchplug.sharded import remove_checkpoint

if TYPE_CHECKING:
    from torchplug.trainer import Trainer

_FIELD = re.compile(r"\{([^{}:]+)(:[^{}]*)?\}")


class ModelCheckpoint(StatefulCallback):
    """Save checkpoints (``trainer.save_checkpoint``: atomic, resumable) and keep the
    ``save_top_k`` best by ``monitor`` (Lightning's arguments and file names).

    :param dirpath: the folder; default: the run folder's ``checkpoints/`` (``trainer.log_dir``).
    :param filename: a template such as ``"{epoch}-{val_loss:.2f}"``, rendered as
        ``epoch=3-val_loss=0.12.ckpt``; default ``"{epoch}-{<monitor>:.3f}"``, or
        ``"{epoch}-{step}"`` without a monitor. A name already taken gets ``-v1``, ``-v2`` ….
    :param monitor: the metric to rank by; ``None`` keeps the latest ``save_top_k``.
    :param mode: ``"min"`` or ``"max"``.
    :param save_top_k: how many to keep; ``-1`` all, ``0`` none (``save_last`` still applies).
    :param save_last: also write ``last.ckpt`` in ``dirpath`` at every save.
    :param every_n_epochs: save after every n-th epoch's validation (or its end, without
        validation); default 1 unless ``every_n_train_steps`` is set.
    :param every_n_train_steps: save every n optimizer steps instead.
    :param auto_insert_metric_name: write ``name=value`` (True) or the value alone.

    ``best_model_path``, ``best_model_score``, ``best_k_models`` (path → score) and
    ``last_model_path`` tell what was kept; they are saved in every checkpoint and restored on
    resume. A file that leaves the top k is deleted only after the new one was written, so a
    kill during a save leaves every kept file loadable. Decisions are taken on every rank alike
    (the metrics are reduced); global rank 0 writes and deletes.
    """

    plugin_name = "model_checkpoint"
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | Path | None = None, filename: str | None = None, monitor: str | None = None,
                 verbose: bool = False, save_last: bool | None = None, save_top_k: int = 1, mode: str = "min",
                 auto_insert_metric_name: bool = True, every_n_train_steps: int | None = None,
                 every_n_epochs: int | None = None) -> None:
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise MisconfigurationError(f"ModelCheckpoint(save_top_k={save_top_k!r}) must be an integer >= -1.")
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise MisconfigurationError(f"ModelCheckpoint({name}={value!r}) must be an integer >= 0.")
        if every_n_train_steps and every_n_epochs:
            raise MisconfigurationError(
                "ModelCheckpoint: pass every_n_train_steps or every_n_epochs, not both (they are two schedules)."
            )
        self.dirpath: Path | None = Path(dirpath).absolute() if dirpath is not None else None
        self.filename = filename
        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.mode = check_mode("ModelCheckpoint", mode)
        self.auto_insert_metric_name = auto_insert_metric_name
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (0 if every_n_train_steps else 1)
        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.kth_best_model_path = ""
        self.last_model_path = ""
        self._order: dict[str, int] = {}  # path -> global step, to rank by recency without a monitor
        self._saved_at: tuple[int, int] | None = None
        self._last_step_seen = -1

    def __repr__(self) -> str:
        return f"ModelCheckpoint(dirpath={self.dirpath!r}, monitor={self.monitor!r}, save_top_k={self.save_top_k})"

    @property
    def state_key(self) -> str:
        return state_key("ModelCheckpoint", monitor=self.monitor, mode=self.mode,
                         every_n_train_steps=self.every_n_train_steps, every_n_epochs=self.every_n_epochs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor, "dirpath": str(self.dirpath) if self.dirpath else "",
            "best_model_score": self.best_model_score, "best_model_path": self.best_model_path,
            "best_k_models": dict(self.best_k_models), "kth_best_model_path": self.kth_best_model_path,
            "last_model_path": self.last_model_path, "order": dict(self._order),
            "saved_at": list(self._saved_at or ()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_model_score = None if state["best_model_score"] is None else float(state["best_model_score"])
        self.best_model_path = str(state["best_model_path"])
        self.best_k_models = {str(k): float(v) for k, v in state["best_k_models"].items()}
        self.kth_best_model_path = str(state["kth_best_model_path"])
        self.last_model_path = str(state["last_model_path"])
        self._order = {str(k): int(v) for k, v in state.get("order", {}).items()}
        saved: list[Any] = list(state.get("saved_at") or [])
        self._saved_at = (int(saved[0]), int(saved[1])) if len(saved) == 2 else None
        if self.dirpath is None and state.get("dirpath"):
            self.dirpath = Path(state["dirpath"])  # the resumed run continues the same top-k folder

    # -- hooks -------------------------------------------------------------------------------
    def check_configuration(self, trainer: Trainer) -> None:
        if not trainer.enable_checkpointing and not trainer.fast_dev_run:  # fast_dev_run: _save writes nothing
            raise MisconfigurationError(
                "ModelCheckpoint (torchplug.callbacks, distribution torchplug) is in the callbacks, but "
                "Trainer(enable_checkpointing=False) turns checkpointing off. Drop one of the two."
            )

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.dirpath is None:
            found = str(Path(trainer.log_dir) / "checkpoints") if trainer.log_dir is not None else None
            # Only rank 0 has a run folder; every rank names files alike, so all get its path.
            found = trainer.hooks.broadcast(obj=found, src=0)
            self.dirpath = Path(found) if found is not None else None
        self._last_step_seen = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer) -> None:
        step = trainer.global_step
        if step == self._last_step_seen:
            return  # inside an accumulation window: no optimizer step yet
        self._last_step_seen = step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0:
            self._save(trainer, "the optimizer step")

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self._epoch_due(trainer) and (trainer.val_dataloaders is None or trainer.limit_val_batches == 0):
            self._save(trainer, "the end of the training epoch")

    def on_validation_end(self, trainer: Trainer) -> None:
        if trainer.fitting and self._epoch_due(trainer):
            self._save(trainer, "validation")

    # -- saving ------------------------------------------------------------------------------
    def format_checkpoint_name(self, metrics: dict[str, Any], ver: int | None = None) -> str:
        """The file name for ``metrics`` (which include ``epoch`` and ``step``)."""
        template = self.filename or ("{epoch}-{step}" if self.monitor is None else f"{{epoch}}-{{{self.monitor}:.3f}}")

        def render(match: re.Match[str]) -> str:
            name, spec = match.group(1), (match.group(2) or ":")[1:]
            if name not in metrics:
                logged = ", ".join(repr(k) for k in sorted(metrics))
                raise MisconfigurationError(
                    f"ModelCheckpoint(filename={template!r}) names {name!r}, which was never logged. Logged metrics: "
                    f"{logged}."
                )
            value = format(metrics[name], spec)
            return f"{name}={value}" if self.auto_insert_metric_name else value

        name = _FIELD.sub(render, template)
        if ver is not None:
            name = f"{name}-v{ver}"
        return name + self.FILE_EXTENSION

    def _epoch_due(self, trainer: Trainer) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _save(self, trainer: Trainer, where: str) -> None:
        if trainer.fast_dev_run:
            return  # Lightning's semantics: a fast_dev_run writes no checkpoint
        position = (trainer.current_epoch, trainer.global_step)
        if self._saved_at == position:
            return  # resumed from the checkpoint of this very save
        self._saved_at = position
        if self.dirpath is None:
            raise MisconfigurationError(
                "ModelCheckpoint has no folder to write to: pass ModelCheckpoint(dirpath=...) or let the Trainer make "
                "a run folder (logger=True or enable_checkpointing=True)."
            )
        metrics: dict[str, Any] = {**trainer.callback_metrics, "epoch": trainer.current_epoch,
                                   "step": trainer.global_step}
        if self.save_top_k != 0:
            score = float(trainer.global_step) if self.monitor is None else \
                monitored("ModelCheckpoint", self.monitor, trainer, where)
            if math.isnan(score):  # never better than a real score
                score = math.inf if self.mode == "min" else -math.inf
            if self._qualifies(score):
                self._save_top_k(trainer, score, metrics)
        if self.save_last:
            path = self.dirpath / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            self.last_model_path = str(path)

    def _mode(self) -> str:
        return "max" if self.monitor is None else self.mode

    def _qualifies(self, score: float) -> bool:
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        return improved(score, self.best_k_models[self.kth_best_model_path], self._mode())

    def _save_top_k(self, trainer: Trainer, score: float, metrics: dict[str, Any]) -> None:
        assert self.dirpath is not None
        path = self._free_path(metrics)
        self.best_k_models[path] = score
        self._order[path] = trainer.global_step
        dropped = None
        if self.save_top_k != -1 and len(self.best_k_models) > self.save_top_k:
            dropped = self.kth_best_model_path
            del self.best_k_models[dropped]
            self._order.pop(dropped, None)
        if self._mode() == "max":  # ties: the older file ranks first either way
            ranked = sorted(self.best_k_models, key=lambda p: (-self.best_k_models[p], self._order.get(p, 0)))
        else:
            ranked = sorted(self.best_k_models, key=lambda p: (self.best_k_models[p], self._order.get(p, 0)))
        self.best_model_path = ranked[0]
        self.kth_best_model_path = ranked[-1]
        self.best_model_score = None if self.monitor is None else self.best_k_models[ranked[0]]
        trainer.save_checkpoint(path)  # with the bookkeeping above in it: a resume continues from here
        if dropped is not None and dropped != path and trainer.is_global_zero:
            remove_checkpoint(dropped)  # only once the new file is complete; with its sharded state folder
        if self.verbose and trainer.is_global_zero:
            print(f"ModelCheckpoint: saved {path} ({self.monitor}={score:.6g})")

    def _free_path(self, metrics: dict[str, Any]) -> str:
        assert self.dirpath is not None
        path = str(self.dirpath / self.format_checkpoint_name(metrics))
        ver = 0
        while path in self.best_k_models or Path(path).exists():
            ver += 1
            path = str(self.dirpath / self.format_checkpoint_name(metrics, ver))
        return path
