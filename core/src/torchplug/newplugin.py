"""``torchplug new-plugin NAME``: a new plugin project from the template shipped with torchplug.

The template (``torchplug/templates/plugin/``, package data) is a complete plugin project whose
names are placeholders: ``{{name}}`` (the entry-point name users select), ``{{dist}}`` (the
distribution, ``torchplug-NAME``), ``{{module}}`` (the import package, ``torchplug_NAME``),
``{{Class}}`` (the class is ``{{Class}}Plugin``) and ``{{ENV}}`` (the prefix of its environment
variable). :func:`render` fills them in, in file contents and paths, and drops the ``.tmpl``
suffix. ``examples/plugin-template`` in the torchplug repository is this template rendered for
``input_noise`` (a test keeps it so): ``torchplug new-plugin input_noise --dir
examples/plugin-template --force`` regenerates it.

Standard library only: no torch import.
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["PluginNames", "TemplateError", "add_parser", "create", "names_for", "render", "template_files"]

SUFFIX = ".tmpl"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
#: Names taken by the first-party plugins (their distributions would clash).
RESERVED = ("ddp", "native_amp", "apex", "fsdp", "ddp_zero", "compile")


class TemplateError(ValueError):
    """A plugin name that cannot be used, or a target folder in the way."""


@dataclass(frozen=True)
class PluginNames:
    """Every spelling of one plugin's name that the template uses."""

    name: str  # input_noise: the entry-point name users select
    dist: str  # torchplug-input-noise
    module: str  # torchplug_input_noise
    Class: str  # InputNoise (the class is InputNoisePlugin)
    ENV: str  # TORCHPLUG_INPUT_NOISE (its variable is TORCHPLUG_INPUT_NOISE_STD)

    def mapping(self) -> dict[str, str]:
        return {"name": self.name, "dist": self.dist, "module": self.module, "Class": self.Class, "ENV": self.ENV}


def names_for(name: str) -> PluginNames:
    """The names of plugin ``name`` (lower case, digits and single underscores, a letter first;
    ``-`` is read as ``_``)."""
    name = name.strip().replace("-", "_")
    if name.startswith("torchplug_"):
        name = name[len("torchplug_"):]
    if not _NAME.fullmatch(name) or keyword.iskeyword(name):
        raise TemplateError(
            f"Plugin name {name!r}: use lower-case letters, digits and single underscores, starting with a letter "
            "(e.g. input_noise); it becomes the entry-point name, torchplug-NAME and torchplug_NAME."
        )
    if name in RESERVED:
        dist = "torchplug-" + name.replace("_", "-")
        raise TemplateError(f"Plugin name {name!r} is taken by a first-party plugin ({dist}).")
    return PluginNames(
        name=name,
        dist="torchplug-" + name.replace("_", "-"),
        module="torchplug_" + name,
        Class="".join(part.capitalize() for part in name.split("_")),
        ENV="TORCHPLUG_" + name.upper(),
    )


def template_root() -> Traversable:
    return resources.files("torchplug").joinpath("templates", "plugin")


def template_files() -> dict[str, str]:
    """The template: ``{relative path with placeholders, without .tmpl: text}``."""
    files: dict[str, str] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.name == "__pycache__":
                continue
            path = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, path + "/")
            elif child.name.endswith(SUFFIX):
                files[path[: -len(SUFFIX)]] = child.read_text(encoding="utf-8")

    walk(template_root(), "")
    if not files:
        raise TemplateError(f"The plugin template is missing from this torchplug installation ({template_root()}).")
    return files


def _fill(text: str, values: dict[str, str], where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise TemplateError(f"Unknown placeholder {{{{{key}}}}} in the plugin template ({where}).")
        return values[key]

    return _PLACEHOLDER.sub(replace, text)


def render(name: str | PluginNames) -> dict[str, str]:
    """The project for plugin ``name``: ``{relative path: text}``."""
    names = name if isinstance(name, PluginNames) else names_for(name)
    values = names.mapping()
    return {_fill(path, values, path): _fill(text, values, path) for path, text in template_files().items()}


def create(name: str, target: str | Path | None = None, *, force: bool = False) -> tuple[Path, PluginNames]:
    """Write the project for plugin ``name`` into ``target`` (default ``./torchplug-NAME``).

    ``target`` must not exist or be empty; with ``force`` the template's files are overwritten
    and every other file is left alone."""
    names = names_for(name)
    project = Path(target) if target is not None else Path.cwd() / names.dist
    files = render(names)
    if project.exists() and not project.is_dir():
        raise TemplateError(f"{project} exists and is not a folder.")
    if project.is_dir() and any(project.iterdir()) and not force:
        raise TemplateError(f"{project} exists and is not empty; choose another --dir, or pass --force to overwrite "
                            "the template's files there.")
    for relative, text in files.items():
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return project, names


def run(args: argparse.Namespace) -> int:
    try:
        project, names = create(args.name, args.dir, force=args.force)
    except (TemplateError, OSError) as exc:
        print(f"torchplug new-plugin: error: {exc}", file=sys.stderr)
        return 2
    shown = project if not project.is_absolute() else _relative(project)
    print(f"Created {shown}/: distribution {names.dist}, entry point {names.name!r} "
          f"({names.module}:{names.Class}Plugin).\n"
          f"Next (see {shown}/README.md):\n"
          f"  cd {shown}\n"
          "  pip install --find-links /path/to/torchplug/dist -e \".[test]\"   # the folder with the torchplug wheels\n"
          "  pytest\n"
          "  python -m build --wheel")
    return 0


def _relative(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register the ``new-plugin`` subcommand on the ``torchplug`` command's subparsers."""
    parser = subparsers.add_parser(
        "new-plugin",
        help="create a plugin project from the template: torchplug new-plugin NAME",
        description="Create a plugin project from the template shipped with torchplug: distribution "
                    "torchplug-NAME, entry point NAME, package torchplug_NAME with a NamePlugin class (a working "
                    "example hook to replace), tests that run the conformance suite, and a README with the "
                    "install, test and wheel-build commands.",
    )
    parser.add_argument("name", metavar="NAME", help="the plugin's entry-point name, e.g. input_noise")
    parser.add_argument("--dir", default=None, metavar="DIR",
                        help="the project folder to create (default: ./torchplug-NAME); it must not exist or be empty")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty DIR, overwriting the template's files there")
    parser.set_defaults(run=run)
    return parser
