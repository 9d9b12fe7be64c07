"""Fresh virtual environments that reuse this interpreter's torch instead of installing it again.

A torch wheel is ~900 MB unpacked and takes ~20 s to install; tests that build wheels and install
them into a fresh environment (and CI sessions) only need *a* torch. :func:`create` makes a venv
that sees the running interpreter's copies of a few distributions (``torch`` and what it
requires, plus any others named) and nothing else of it::

    from torchplug.testing.venv import create

    python = create(tmp_path / "env", share=("torch", "pytest"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", wheel])

How: ``python -m venv --without-pip``, then a folder ``shared-site/`` inside the venv holding
symlinks to the shared distributions' top-level files (packages, modules, ``.dist-info``), put
on ``sys.path`` by a ``.pth`` file. ``--system-site-packages`` cannot do this when the running
interpreter is itself a venv: it exposes the *base* interpreter's site-packages, which has no
torch. Only the named distributions are visible, so editable installs of the running
environment (``torchplug`` itself) never leak in; pip sees the shared ones as installed and
does not resolve them again.

Standard library only, plus ``packaging`` (a torchplug dependency, and nox's): ``noxfile.py``
loads this file by path, without importing torchplug or torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

PTH_NAME = "_torchplug_shared_site.pth"
SHARED_DIR = "shared-site"


def requirement_closure(names: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` and, recursively, what they require (markers
    evaluated for this interpreter, extras not followed)."""
    from packaging.requirements import Requirement

    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = _normalize(name)
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(
                f"Cannot share {name!r}: it is not installed for {sys.executable}. Install it there "
                f"(for torch: pip install torch==2.13.0), or run from an interpreter that has it."
            ) from None
        found[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return sorted(found.values(), key=lambda d: _normalize(d.metadata["Name"]))


def link_shared(target: Path, names: Iterable[str]) -> list[str]:
    """Symlink the top-level files of ``names`` (with their requirement closure) from the
    running interpreter into ``target``. Returns the distribution names linked."""
    target.mkdir(parents=True, exist_ok=True)
    linked = []
    for dist in requirement_closure(names):
        for top in _top_level_entries(dist):
            source = Path(str(dist.locate_file(top)))
            link = target / top
            if link.is_symlink() or link.exists():
                continue
            if source.exists():
                link.symlink_to(source, target_is_directory=source.is_dir())
        linked.append(dist.metadata["Name"])
    return linked


def venv_paths(python: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(prefix, purelib site-packages)`` of the interpreter ``python``."""
    out = subprocess.run(
        [os.fspath(python), "-c", "import sys, sysconfig; print(sys.prefix); print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )
    prefix, site = out.stdout.split("\n")[:2]
    return Path(prefix), Path(site)


def share_into(python: str | os.PathLike[str], names: Iterable[str]) -> list[str]:
    """Make ``names`` (and their requirements) of the running interpreter visible to the venv
    of ``python``, after its own packages on ``sys.path``. Returns the distributions shared."""
    prefix, site = venv_paths(python)
    shared = prefix / SHARED_DIR
    linked = link_shared(shared, names)
    site.mkdir(parents=True, exist_ok=True)
    (site / PTH_NAME).write_text(f"{shared}\n", encoding="utf-8")
    return linked


def create(path: str | os.PathLike[str], share: Iterable[str] = ("torch",), *, with_pip: bool = False) -> Path:
    """Create a venv at ``path`` that shares ``share`` with the running interpreter.

    :param path: the venv folder (created).
    :param share: distributions to share (their requirements come along).
    :param with_pip: run ensurepip in the venv; without it, install with the running
        interpreter's pip: ``python -m pip --python <venv python> install ...``.
    :returns: the venv's python executable.
    """
    path = Path(path)
    cmd = [sys.executable, "-m", "venv", os.fspath(path)]
    if not with_pip:
        cmd.insert(3, "--without-pip")
    subprocess.run(cmd, check=True)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    share_into(python, share)
    return python


def _top_level_entries(dist: importlib.metadata.Distribution) -> set[str]:
    entries: set[str] = set()
    for file in dist.files or []:
        top = file.parts[0]
        if top in ("..", "__pycache__") or top.endswith(".pth"):
            continue  # scripts outside site-packages; .pth files would do nothing here
        entries.add(top)
    if not entries:  # no RECORD: the metadata folder and top_level.txt
        meta = Path(str(dist._path))  # type: ignore[attr-defined]
        entries.add(meta.name)
        entries.update(line.strip() for line in (dist.read_text("top_level.txt") or "").splitlines() if line.strip())
    return entries


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
