"""``broken_autoload``: an autoloaded plugin that raises on import."""

import os

if os.environ.get("TP_TEST_IMPORT_LOG"):  # lets tests prove when this module is (not) imported
    with open(os.environ["TP_TEST_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(__name__ + "\n")


def _fail() -> None:
    raise RuntimeError("Don't hide me: tp_broken.autoplugin failed on import")


_fail()
