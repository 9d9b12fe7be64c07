"""What a run writes: its folder (``torchplug_logs/version_N``), ``metrics.csv`` and the progress bar."""

from __future__ import annotations

from pathlib import Path

from torchplug.errors import MisconfigurationError
from torchplug.metrics import CSVLogger, ProgressBar


class RunOutputs:
    """The run folder, its CSV logger and the progress bar of one process.

    :param root: ``default_root_dir``; the folder is ``root/torchplug_logs/version_N``.
    :param folder: make the folder (global rank 0 with logging or checkpointing on).
    :param csv: write ``metrics.csv`` there.
    :param progress: show a progress bar (on a terminal).
    """

    def __init__(self, root: Path, *, folder: bool, csv: bool, progress: bool) -> None:
        self._created: list[Path] = []  # folders this run made, removed again if it fails empty
        self.log_dir = self._new_version_dir(root / "torchplug_logs") if folder else None
        #: the automatic last.ckpt, once written
        self.last_checkpoint: Path | None = None
        self.csv: CSVLogger | None = None
        if csv and self.log_dir is not None:
            try:
                self.csv = CSVLogger(self.log_dir)
            except MisconfigurationError:
                self.remove_if_empty()
                raise
        self.progress = ProgressBar(progress)

    @property
    def last_checkpoint_path(self) -> Path | None:
        return self.log_dir / "checkpoints" / "last.ckpt" if self.log_dir is not None else None

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if self.csv is not None:
            self.csv.log(step, epoch, values)

    def close(self) -> None:
        self.progress.close()
        if self.csv is not None:
            self.csv.close()

    def remove_if_empty(self) -> None:
        """A run that failed before writing any metric or checkpoint leaves no folder behind."""
        if self.last_checkpoint is not None or (self.csv is not None and self.csv.rows):
            return
        for folder in reversed(self._created):
            try:
                (folder / "metrics.csv").unlink(missing_ok=True)
                checkpoints = folder / "checkpoints"
                if checkpoints.is_dir() and not any(checkpoints.iterdir()):
                    checkpoints.rmdir()
                folder.rmdir()
            except OSError:  # not empty (someone else's files): keep it
                return

    def _new_version_dir(self, root: Path) -> Path:
        try:
            if not root.exists():
                root.mkdir(parents=True)
                self._created.append(root)
            path = new_version_dir(root)
        except OSError as exc:
            raise MisconfigurationError(
                f"Cannot create the run folder under {root}: {exc}. Pass a writable default_root_dir, "
                "or Trainer(logger=False, enable_checkpointing=False) to write nothing."
            ) from exc
        self._created.append(path)
        return path


def new_version_dir(root: Path) -> Path:
    """``root/version_N`` with the next free N, made atomically (mkdir fails if taken)."""
    versions = [int(p.name.split("_", 1)[1]) for p in root.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    version = max(versions, default=-1) + 1
    while True:
        path = root / f"version_{version}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took it meanwhile
            version += 1
