"""``torchplug plan``: the resolved plan for the given trainer options, without running anything.

Takes the same options as ``torchplug demo`` and ``torchplug fit`` and builds the ``Trainer``
they would build (no fit: no process started, nothing written), then prints ``trainer.plan``:
which plugin answers each duty, what lost and why, and where each setting came from. With
``--json`` stdout holds exactly ``trainer.plan.to_dict()`` as JSON; errors go to stderr (and,
with ``--json``, as ``{"error": ...}`` to stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``plan`` on the ``torchplug`` command's subparsers."""
    from torchplug.cli import _add_run_options, plain_text

    parser = subparsers.add_parser(
        "plan", help="which plugin answers each duty, why, and where each setting came from (runs nothing)",
        description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(parser, default_epochs=None)
    parser.set_defaults(run=run)
    return parser


def trainer_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Trainer`` arguments ``torchplug demo``/``fit`` build from their options."""
    return {
        "plugins": args.plugins, "accelerator": args.accelerator, "devices": args.devices,
        "precision": args.precision if args.precision != "32" else 32,
        "max_epochs": args.max_epochs, "max_steps": args.max_steps if args.max_steps else -1,
        "accumulate_grad_batches": args.accumulate, "gradient_clip_val": args.gradient_clip_val,
        "default_root_dir": args.root_dir, "enable_progress_bar": not args.no_progress_bar,
        "log_every_n_steps": 5,
    }


def run(args: argparse.Namespace) -> int:
    from torchplug.errors import TorchplugError
    from torchplug.trainer import Trainer

    try:
        trainer = Trainer(**trainer_arguments(args))
    except TorchplugError as exc:
        print(f"torchplug plan: error: {exc}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"command": "plan", "error": str(exc), "error_type": type(exc).__name__}), flush=True)
        return 2 if isinstance(exc, (ValueError, LookupError, ImportError)) else 1
    if args.json:
        print(json.dumps(trainer.plan.to_dict(), sort_keys=True), flush=True)
    else:
        print(trainer.plan.table(), flush=True)
    return 0


__all__ = ["add_parser", "run", "trainer_arguments"]
