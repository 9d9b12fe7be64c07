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


class ApexUnavailableError(MisconfigurationError, ImportError):
    """NVIDIA apex amp cannot be used here; ``reason`` says which case of the matrix applies:
    ``"not_installed"``, ``"import_failed"``, ``"amp_removed"`` or ``"not_apex_amp"``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_amp() -> ModuleType:
    """Import and return ``apex.amp``, or raise :class:`ApexUnavailableError` naming the case
    and the fix. Nothing is cached: ``sys.modules`` caches a successful import anyway."""
    apex = _import("apex")
    if isinstance(apex, BaseException):
        if isinstance(apex, ModuleNotFoundError) and apex.name == "apex":
            raise ApexUnavailableError(
                f"ApexPlugin ({DISTRIBUTION}): NVIDIA apex is not installed (no module named 'apex').\n"
                + HOW_TO_GET_APEX,
                "not_installed",
            ) from apex
        raise ApexUnavailableError(_import_failed_message(apex), "import_failed") from apex
    amp = _import("apex.amp")
    location = _location(apex)
    if isinstance(amp, BaseException):
        if isinstance(amp, ModuleNotFoundError) and amp.name == "apex.amp":
            raise ApexUnavailableError(
                f"ApexPlugin ({DISTRIBUTION}): the apex at {location}{_version_text()} has no apex.amp. "
                "NVIDIA removed amp from apex after tag 25.05 (commit cb65b8e, 'remove old features: amp, "
                "ddp, and rnn'); apex 25.07 and later cannot run amp O0-O3.\n" + HOW_TO_GET_APEX,
                "amp_removed",
            ) from amp
        raise ApexUnavailableError(
            f"ApexPlugin ({DISTRIBUTION}): importing apex.amp from {location} raised "
            f"{type(amp).__name__}: {amp}\n" + HOW_TO_GET_APEX,
            "import_failed",
        ) from amp
    missing = [name for name in REQUIRED_API if not callable(getattr(amp, name, None))]
    if missing:
        raise ApexUnavailableError(
            f"ApexPlugin ({DISTRIBUTION}): the apex.amp at {_location(amp)} is not NVIDIA apex amp: it lacks "
            f"{', '.join(missing)}.\n" + HOW_TO_GET_APEX,
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


def _import_failed_message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    pyramid = "pyramid" in text.lower() or "UnencryptedCookieSessionFactoryConfig" in text
    meta = _distribution_summary()
    lines = [f"ApexPlugin ({DISTRIBUTION}): a package named 'apex' is installed{meta} but importing it "
             f"raised {text}"]
    if pyramid:
        lines.append(
            "This is PyPI's 'apex' 0.9.10.dev0 (2013), an unrelated Pyramid web toolkit that `pip install apex` "
            "installs, not NVIDIA apex. Remove it: pip uninstall apex"
        )
    else:
        lines.append(
            "If it is PyPI's 'apex' (an unrelated 2013 Pyramid toolkit), remove it with `pip uninstall apex`; "
            "if it is NVIDIA apex, its build is broken: rebuild it as below."
        )
    return "\n".join(lines) + "\n" + HOW_TO_GET_APEX


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
