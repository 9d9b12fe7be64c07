"""The ``torchplug`` command: ``plugins`` (list installed plugins), ``demo``, ``fit``, ``new-plugin``.

Only ``demo`` and ``fit`` import torch (on use): ``torchplug plugins`` reads metadata alone.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

#: The demo's default number of epochs (the digits MLP reaches >= 95% validation accuracy).
DEMO_EPOCHS = 15
#: ``torchplug fit``'s number of epochs without --max-epochs or --max-steps (the Trainer's own
#: default, 1000, suits no command line).
FIT_EPOCHS = 10

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def plain_text(doc: str | None) -> str:
    """A docstring as terminal text: reST roles (:class:`~a.B` -> B, :mod:`a.b` -> a.b),
    ``literals`` -> literals, a paragraph-ending ``::`` -> ``:``."""
    if not doc:
        return ""

    def role(match: re.Match[str]) -> str:
        target = match.group(1).strip()
        return target.rsplit(".", 1)[-1] if match.group(0).split("`", 1)[1].startswith("~") else target

    text = _ROLE.sub(role, doc)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"(?<=\S)::$", ":", text, flags=re.MULTILINE)
    text = re.sub(r"\s+::$", "", text, flags=re.MULTILINE)
    text = re.sub(r"\\ ", "", text)  # an escaped space joins a literal to a suffix: ``x``\\ s
    text = re.sub(r"\\(.)", r"\1", text)  # other reST escapes
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    from torchplug import __version__, listing, newplugin, plancli

    parser = argparse.ArgumentParser(prog="torchplug", description=plain_text(__doc__))
    parser.add_argument("--version", action="version", version=f"torchplug {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    listing.add_parser(sub)
    add_parsers(sub)
    plancli.add_parser(sub)
    newplugin.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("torchplug: interrupted", file=sys.stderr)
        return 130


def _lazy(name: str, module: str = "torchplug.demo") -> Callable[[argparse.Namespace], int]:
    """A command that imports its module (and so torch) only when it runs."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), name)(args))

    return run


def add_parsers(subparsers: Any) -> None:
    """Register ``demo`` and ``fit`` on the ``torchplug`` command's subparsers."""
    demo = subparsers.add_parser(
        "demo", help="train an MLP on scikit-learn's digits (needs torchplug[demo])",
        description="Train an MLP on scikit-learn's bundled digits data set on the CPU in seconds "
                    "(>= 95% validation accuracy), with any plugins, devices and precision.",
    )
    _add_run_options(demo, default_epochs=DEMO_EPOCHS)
    demo.add_argument("--hidden", type=_positive_int, default=128, help="hidden width (default 128)")
    demo.set_defaults(run=_lazy("run_demo"))

    fit = subparsers.add_parser(
        "fit", help="train your TrainingModule: torchplug fit package.module:Class",
        description="Train a TrainingModule given as package.module:Class. The class is constructed "
                    "with no arguments and must define train_dataloader() (val_dataloader() optional). "
                    f"The current directory is importable. Without --max-epochs or --max-steps it trains "
                    f"{FIT_EPOCHS} epochs, and says so.",
    )
    fit.add_argument("target", metavar="package.module:Class", help="the TrainingModule class to train")
    _add_run_options(fit, default_epochs=None)
    fit.set_defaults(run=_lazy("run_fit", "torchplug.fitcmd"))


def _add_run_options(parser: argparse.ArgumentParser, default_epochs: int | None) -> None:
    parser.add_argument("--plugins", type=_name_list, default=[], metavar="A,B",
                        help="plugins to use, by entry-point name (see 'torchplug plugins')")
    parser.add_argument("--devices", type=_positive_int, default=1, help="processes/devices (default 1)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu", "cuda", "auto"], default="cpu",
                        help="device kind (default cpu)")
    parser.add_argument("--precision", choices=["32", "16", "bf16"], default="32", help="default 32")
    epochs_help = (f"default {default_epochs}" if default_epochs
                   else f"default {FIT_EPOCHS}, or no epoch limit when --max-steps is given")
    parser.add_argument("--max-epochs", type=_positive_int, default=default_epochs, help=epochs_help)
    parser.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--accumulate", type=_positive_int, default=1, metavar="N",
                        help="accumulate gradients over N batches (default 1)")
    parser.add_argument("--gradient-clip-val", type=float, default=0.0, metavar="NORM", help="default: no clipping")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--root-dir", default=None, help="where torchplug_logs/ goes (default: current directory)")
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint")
    parser.add_argument("--no-progress-bar", action="store_true", help="no progress bar (it is off when not a TTY)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (the run's summary, or the error) to stdout, and everything "
                             "else (progress, plugin and run messages) to stderr")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


