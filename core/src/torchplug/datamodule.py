"""``DataModule``: Lightning's ``LightningDataModule``, the data of a run in one object.

``fit(model, datamodule=dm)``, ``validate``/``test``/``predict(datamodule=dm)`` call, in the
process that called them and before any work: ``prepare_data()`` (once per machine: only where
``LOCAL_RANK`` is 0 or unset) → ``setup(stage)`` (``"fit"``, ``"validate"``, ``"test"``,
``"predict"``) → the stage's ``*_dataloader()`` methods; ``teardown(stage)`` once the call ends.
With ``devices=N`` the loaders travel into the workers (the data is prepared once, here).
``state_dict()`` is stored in fit's checkpoints under ``"datamodule"`` and given back to
``load_state_dict`` when a fit resumes from one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from torchplug._validation import distance
from torchplug.errors import MisconfigurationError
from torchplug.hookspecs import hookimpl

STAGES = ("fit", "validate", "test", "predict")
#: What a datamodule may define (its own helpers start with ``_``, or are far from these).
DATAMODULE_API = ("prepare_data", "setup", "teardown", "train_dataloader", "val_dataloader", "test_dataloader",
                  "predict_dataloader", "state_dict", "load_state_dict", "transfer_batch_to_device",
                  "on_before_batch_transfer", "on_after_batch_transfer", "save_hyperparameters", "hparams",
                  "from_datasets", "size", "dims")
#: Lightning datamodule methods torchplug would never call.
_UNSUPPORTED = {
    "transfer_batch_to_device": "implement on_before_forward(model, args) on a torchplug.Plugin",
    "on_before_batch_transfer": "implement on_before_forward(model, args) on a torchplug.Plugin",
    "on_after_batch_transfer": "implement on_before_forward(model, args) on a torchplug.Plugin",
}


class DataModule:
    """Subclass it and define the loaders your runs need (``train_dataloader()`` for fit,
    ``val_dataloader()``, ``test_dataloader()``, ``predict_dataloader()``); optionally
    ``prepare_data()`` (download, once per machine), ``setup(stage)`` (build the datasets),
    ``teardown(stage)``, and ``state_dict()``/``load_state_dict(state)`` (kept in checkpoints)."""

    def prepare_data(self) -> None:
        """Download or write data, once per machine, before ``setup``. Default: nothing."""

    def setup(self, stage: str | None = None) -> None:
        """Build what the ``stage`` (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``) needs. Default: nothing."""

    def teardown(self, stage: str | None = None) -> None:
        """Release what ``setup(stage)`` acquired. Default: nothing."""

    def train_dataloader(self) -> Any:
        return None

    def val_dataloader(self) -> Any:
        return None

    def test_dataloader(self) -> Any:
        return None

    def predict_dataloader(self) -> Any:
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this datamodule (``checkpoint["datamodule"]``). Default: nothing."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s result when a fit resumes. Default: nothing."""


def check_datamodule(datamodule: Any) -> None:
    """Refuse, before any work, something that is no datamodule, or one with a method that is
    one typo from a datamodule method (it would never be called) or that torchplug does not call."""
    if not all(callable(getattr(datamodule, name, None)) for name in ("setup", "prepare_data", "teardown")):
        raise MisconfigurationError(
            f"datamodule= takes a torchplug.DataModule (Lightning's LightningDataModule), got "
            f"{type(datamodule).__name__}; subclass torchplug.DataModule.")
    for cls in type(datamodule).__mro__:
        if cls in (DataModule, object):
            continue
        for name, value in vars(cls).items():
            if name.startswith("_") or not callable(value):
                continue
            where = f"{type(datamodule).__qualname__}.{name} (module {type(datamodule).__module__})"
            if name in _UNSUPPORTED:
                raise MisconfigurationError(f"{where} is a Lightning datamodule hook that torchplug does not call: "
                                            f"{_UNSUPPORTED[name]}. Rename it '_{name}' if it is a helper.")
            if name in DATAMODULE_API:
                continue
            close = [known for known in DATAMODULE_API if distance(name, known) <= (1 if len(name) <= 8 else 2)]
            if close:
                raise MisconfigurationError(
                    f"{where} looks like the datamodule method {close[0]!r} misspelled, so it would never be called. "
                    f"Rename it to {close[0]!r}, or '_{name}' if it is a helper.")


def prepare_stage(datamodule: Any, stage: str, trainer: Any = None) -> None:
    """``prepare_data()`` (on the machine's first process only) then ``setup(stage)``."""
    check_datamodule(datamodule)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        datamodule.prepare_data()
    datamodule.setup(stage)


@contextmanager
def staged(datamodule: Any, stage: str) -> Iterator[None]:
    """``prepare_stage`` on entry, ``teardown(stage)`` on exit (a ``None`` datamodule: nothing)."""
    if datamodule is None:
        yield
        return
    prepare_stage(datamodule, stage)
    try:
        yield
    finally:
        datamodule.teardown(stage)


def datamodule_loaders(datamodule: Any, train: Any, val: Any) -> tuple[Any, Any]:
    """fit's loaders from the datamodule (set up already; ``None``: the ones given); refused when
    loaders were passed too."""
    if datamodule is None:
        return train, val
    given = [name for name, loader in (("train_dataloaders", train), ("val_dataloaders", val)) if loader is not None]
    if given:
        raise MisconfigurationError(
            f"fit() got {' and '.join(given)} and datamodule={type(datamodule).__name__}: pass the loaders or the "
            "datamodule, not both.")
    train = datamodule.train_dataloader()
    if train is None:
        raise MisconfigurationError(f"fit(datamodule={type(datamodule).__name__}): its train_dataloader() returned "
                                    "None; define it.")
    return train, datamodule.val_dataloader()


def checkpoint_plugin(datamodule: Any) -> object:
    """The plugin that keeps the datamodule's ``state_dict`` in fit's checkpoints."""

    def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
        checkpoint["datamodule"] = datamodule.state_dict()

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        if "datamodule" in checkpoint:
            datamodule.load_state_dict(checkpoint["datamodule"])

    return SimpleNamespace(on_save_checkpoint=hookimpl(on_save_checkpoint),
                           on_load_checkpoint=hookimpl(on_load_checkpoint))


__all__ = ["DATAMODULE_API", "STAGES", "DataModule", "check_datamodule", "checkpoint_plugin", "datamodule_loaders",
           "prepare_stage", "staged"]
