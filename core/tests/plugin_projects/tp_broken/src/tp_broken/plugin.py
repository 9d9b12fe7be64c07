"""``broken``: imports a dependency that is not installed."""

import os

if os.environ.get("TP_TEST_IMPORT_LOG"):  # lets tests prove when this module is (not) imported
    with open(os.environ["TP_TEST_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(__name__ + "\n")

import tp_missing_dependency  # noqa: F401
