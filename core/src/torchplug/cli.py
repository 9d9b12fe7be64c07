"""The ``torchplug`` command: ``plugins`` (list installed plugins), ``demo``, ``fit``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from torchplug import __version__

    parser = argparse.ArgumentParser(prog="torchplug", description=__doc__)
    parser.add_argument("--version", action="version", version=f"torchplug {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from torchplug import demo, listing

    listing.add_parser(sub)
    demo.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("torchplug: interrupted", file=sys.stderr)
        return 130
