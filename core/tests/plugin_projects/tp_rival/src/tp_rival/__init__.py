"""``rival_precision``: a second precision-role plugin, to conflict with ``precise``."""

import os

if os.environ.get("TP_TEST_IMPORT_LOG"):  # lets tests prove when this module is (not) imported
    with open(os.environ["TP_TEST_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(__name__ + "\n")

from contextlib import AbstractContextManager, nullcontext

from torchplug import Plugin


class RivalPrecision(Plugin):
    role = "precision"

    def forward_context(self) -> AbstractContextManager[None]:
        return nullcontext()
