"""Find NVIDIA apex's ``amp`` and, when it cannot be used, say exactly why and what to do.

Four cases are told apart (the "availability matrix"):

* ``not_installed``: no module named ``apex`` at all.
* ``import_failed``: a module named ``apex`` exists but importing it raises. The usual cause is
  PyPI's ``apex`` 0.9.10.dev0 (2013), an unrelated Pyramid toolkit that ``pip install apex``
  installs and whose import fails with ``cannot import name
  'UnencryptedCookieSessionFactoryConfig'``. A broken NVIDIA build lands here too.
* ``amp_removed``: ``apex`` imports but has no ``apex.amp``: NVIDIA apex 25.07 or later (commit
  cb65b8e removed amp after tag 25.05).
* ``not_apex_amp``: ``apex.amp`` imports but lacks ``initialize``, ``scale_loss`` or
  ``master_params``.

The distribution name cannot tell NVIDIA apex from the Pyramid package (both are called
``apex``), so detection imports ``apex.amp`` inside ``except Exception`` and checks the API.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import warnings
from types import ModuleType

from torchplug import MisconfigurationError

DISTRIBUTION = "torchplug-apex"
#: What ``apex.amp`` must provide for the plugin to use it.
REQUIRED_API = ("initialize", "scale_loss", "master_params")

HOW_TO_GET_APEX = """\
To use amp_backend="apex", build NVIDIA apex 25.05 or earlier from source (NVIDIA apex is not on \
PyPI, and `pip install apex` installs an unrelated 2013 Pyramid package):
    git clone https://github.com/NVIDIA/apex
    cd apex
    git checkout 25.05
    # python-only, no compiler needed: put this checkout (the folder that holds apex/) on PYTHONPATH
    export PYTHONPATH="$PWD:$PYTHONPATH"
    # or install it with apex's CUDA extensions (needs nvcc matching torch's CUDA version):
    pip install -v --disable-pip-version-check --no-cache-dir --no-build-isolation \
--config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" ./
Or use PyTorch's native AMP, which apex itself recommends: pip install "torchplug[native-amp]" and \
Trainer(precision=16) (amp_backend="native", the default)."""
#: The fix for every case, in the error's first line; HOW_TO_GET_APEX (after it) has the steps.
BUILD_FIX = "build NVIDIA apex 25.05 from source (steps below)"
REBUILD_FIX = "rebuild NVIDIA apex 25.05 from source (steps below)"


class ApexUnavailableError(MisconfigurationError, ImportError):
    """NVIDIA apex amp cannot be used here; ``reason`` says which case of the matrix applies:
    ``"not_installed"``, ``"import_failed"``, ``"amp_removed"`` or ``"not_apex_amp"``.

    The message's first line is ``ApexPlugin (torchplug-apex): <blocker>.``; ``blocker`` is that
    clause (what is wrong, then ``fix: ...``), ``details`` the lines after it (more about the
    case, then the build instructions, last)."""

    def __init__(self, blocker: str, reason: str, details: str = "") -> None:
        self.blocker = blocker
        self.details = (details + "\n" if details else "") + HOW_TO_GET_APEX
        self.reason = reason
        super().__init__(f"ApexPlugin ({DISTRIBUTION}): {blocker}.\n{self.details}")


def load_amp() -> ModuleType:
    """Import and return ``apex.amp``, or raise :class:`ApexUnavailableError` naming the case
    and the fix. Nothing is cached: ``sys.modules`` caches a successful import anyway."""
    apex = _import("apex")
    if isinstance(apex, BaseException):
        if isinstance(apex, ModuleNotFoundError) and apex.name == "apex":
            raise ApexUnavailableError(
                f"NVIDIA apex is not installed (no module named 'apex'); fix: {BUILD_FIX}",
                "not_installed",
            ) from apex
        blocker, details = _import_failed(apex)
        raise ApexUnavailableError(blocker, "import_failed", details) from apex
    amp = _import("apex.amp")
    location = _location(apex)
    if isinstance(amp, BaseException):
        if isinstance(amp, ModuleNotFoundError) and amp.name == "apex.amp":
            raise ApexUnavailableError(
                f"the apex at {location}{_version_text()} has no apex.amp (apex 25.07 and later cannot run amp "
                f"O0-O3); fix: {BUILD_FIX}",
                "amp_removed",
                "NVIDIA removed amp from apex after tag 25.05 (commit cb65b8e, 'remove old features: amp, "
                "ddp, and rnn').",
            ) from amp
        text, rest = _exception_text(amp)
        raise ApexUnavailableError(
            f"importing apex.amp from {location} raised {text}; fix: {REBUILD_FIX}",
            "import_failed",
            rest,
        ) from amp
    missing = [name for name in REQUIRED_API if not callable(getattr(amp, name, None))]
    if missing:
        raise ApexUnavailableError(
            f"the apex.amp at {_location(amp)} is not NVIDIA apex amp: it lacks {', '.join(missing)}; "
            f"fix: {BUILD_FIX}",
            "not_apex_amp",
        )
    return amp


def _import(name: str) -> ModuleType | Exception:
    """``import name``, returning the exception instead of raising it.

    apex's own import-time warnings are recorded, not shown. apex 25.05's ``transformer``
    package has invalid escape sequences in docstrings: compiling them warns, and under
    ``-W error`` (pytest's ``filterwarnings = error``) that warning becomes a SyntaxError
    that would make a good apex look broken. Warnings from elsewhere are passed on.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module: ModuleType | Exception = importlib.import_module(name)
        except Exception as exc:  # any failure means "not usable"; the message says which
            module = exc
    for w in caught:
        if not _is_apex_file(w.filename):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, module=_module_named(w.filename))
    return module


def _module_named(filename: str) -> str | None:
    """The dotted name of the loaded module ``filename`` belongs to, so that filters by module
    (``ignore::DeprecationWarning:torch.*``) still apply to a re-emitted warning."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return None


def _is_apex_file(filename: str) -> bool:
    parts = os.path.normpath(filename).split(os.sep)
    return "apex" in parts[:-1]


def _exception_text(exc: BaseException) -> tuple[str, str]:
    """``"Type: first line"`` for the error's first line, and the full text when it has more lines."""
    text = f"{type(exc).__name__}: {exc}"
    first = text.split("\n", 1)[0]
    return first, ("" if first == text else text)


def _import_failed(exc: BaseException) -> tuple[str, str]:
    """The blocker and the details for an ``import apex`` that raised."""
    text, rest = _exception_text(exc)
    pyramid = "pyramid" in str(exc).lower() or "UnencryptedCookieSessionFactoryConfig" in str(exc)
    found = f"a package named 'apex' is installed{_distribution_summary()} but importing it raised {text}"
    if pyramid:
        blocker = f"{found}; fix: pip uninstall apex (PyPI's unrelated Pyramid toolkit), then {BUILD_FIX}"
        about = ("This is PyPI's 'apex' 0.9.10.dev0 (2013), an unrelated Pyramid web toolkit that `pip install apex` "
                 "installs, not NVIDIA apex. Remove it: pip uninstall apex")
    else:
        blocker = f"{found}; fix: pip uninstall apex if it is PyPI's, else {REBUILD_FIX}"
        about = ("If it is PyPI's 'apex' (an unrelated 2013 Pyramid toolkit), remove it with `pip uninstall apex`; "
                 "if it is NVIDIA apex, its build is broken: rebuild it as below.")
    return blocker, "\n".join(part for part in (rest, about) if part)


def _distribution_summary() -> str:
    """`` (distribution apex 0.9.10.dev0: "summary")`` when pip metadata exists, else ``""``."""
    try:
        meta = importlib.metadata.metadata("apex")
    except Exception:  # no metadata (a folder on PYTHONPATH) or unreadable: say nothing
        return ""
    summary = meta["Summary"] or ""
    version = meta["Version"] or "?"
    return f" (distribution apex {version}" + (f': "{summary}"' if summary else "") + ")"


def _version_text() -> str:
    try:
        version: str = importlib.metadata.version("apex")
        return f" (distribution apex {version})"
    except Exception:
        return ""


def _location(module: ModuleType) -> str:
    file = getattr(module, "__file__", None)
    if file:
        return os.path.dirname(str(file))
    paths = [str(p) for p in getattr(module, "__path__", None) or []]
    return paths[0] if paths else module.__name__
