"""Second autoload entry point (class style, no decorator), named to sort after ``autolog``."""

import os

if os.environ.get("TP_TEST_IMPORT_LOG"):  # lets tests prove when this module is (not) imported
    with open(os.environ["TP_TEST_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(__name__ + "\n")

from torchplug import Plugin
from tp_autolog import record


class LateRecorder(Plugin):
    def on_fit_start(self) -> None:
        record("zz_late on_fit_start")
