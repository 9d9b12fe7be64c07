"""``oldplug``: declares torchplug<0.1, so this torchplug must refuse it without importing it."""

import os

if os.environ.get("TP_TEST_IMPORT_LOG"):  # lets tests prove when this module is (not) imported
    with open(os.environ["TP_TEST_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(__name__ + "\n")

from torchplug import Plugin


class OldPlugin(Plugin):
    def on_fit_start(self) -> None:
        pass
