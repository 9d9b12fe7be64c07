"""``freeze``: never steps the optimizers, so the weights stay as initialised."""

import os

if os.environ.get("TP_TEST_IMPORT_LOG"):  # lets tests prove when this module is (not) imported
    with open(os.environ["TP_TEST_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(__name__ + "\n")

from torchplug import hookimpl

print("tp_named.freeze: imported (a plugin that prints on import)")


@hookimpl
def optimizer_step(optimizers: list[object]) -> bool:
    return False  # "skipped": the core counts it and does not step the schedulers
