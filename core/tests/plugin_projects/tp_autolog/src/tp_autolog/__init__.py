"""Autoloaded test plugin (module style): records the events it sees in $TP_AUTOLOG_FILE."""

import os

if os.environ.get("TP_TEST_IMPORT_LOG"):  # lets tests prove when this module is (not) imported
    with open(os.environ["TP_TEST_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(__name__ + "\n")

from torchplug import hookimpl


def record(line: str) -> None:
    path = os.environ.get("TP_AUTOLOG_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


@hookimpl
def on_fit_start(trainer: object) -> None:
    record("autolog on_fit_start")


@hookimpl
def on_train_batch_end(batch_idx: int) -> None:
    record(f"autolog on_train_batch_end {batch_idx}")


@hookimpl
def on_fit_end() -> None:
    record("autolog on_fit_end")
