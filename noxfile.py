"""nox sessions: each package's tests, the built wheels in a fresh environment, lint, types, demo.

    nox -s tests-core tests-ddp tests-native-amp tests-apex tests-tensorboard tests-fsdp tests-compile   # editable
    nox -s wheels       # build the 4 wheels into dist/, pip install "torchplug[all]" from there into
                        # a fresh venv, run tests/ against them (site-packages, never the source tree)
    nox -s lint typecheck demo
    nox -s wheels -- -k conformance    # arguments after -- go to pytest (to `torchplug demo` for demo)

One torch for all: run nox from an interpreter that has torch==2.13.0 (the dev venv, or the one
.ci/run builds). Every session venv sees that interpreter's torch (and numpy) through symlinks and
a .pth file (core/src/torchplug/testing/venv.py) instead of installing it again; plain
``--system-site-packages`` cannot do this when nox itself runs from a venv, as it exposes the
*base* interpreter's site-packages. pip never resolves torch: every install is constrained to
the shared torch's version, and the shared copy satisfies it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import nox

ROOT = Path(__file__).resolve().parent
PROJECTS = {
    "torchplug": ROOT / "core",
    "torchplug-ddp": ROOT / "plugins" / "ddp_plugin",
    "torchplug-native-amp": ROOT / "plugins" / "native_amp",
    "torchplug-apex": ROOT / "plugins" / "apex_plugin",
    "torchplug-tensorboard": ROOT / "plugins" / "tensorboard_plugin",
    "torchplug-fsdp": ROOT / "plugins" / "fsdp_plugin",
    "torchplug-compile": ROOT / "plugins" / "compile_plugin",
}
DIST = ROOT / "dist"
#: Shared from the interpreter running nox, with what they require. pip too: the venvs are made
#: without one, and tests run ``python -m pip`` (to build wheels and fill venvs of their own).
SHARED = ("torch", "numpy", "pip")
#: Shared when installed there (the demo's extra), else installed from the index.
SHARED_IF_PRESENT = ("scikit-learn", "matplotlib")
#: Test tools every test session installs (small; pip's cache makes it quick).
TEST_TOOLS = ("pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "setuptools>=77")
#: The long suites run on every core: whole files per worker, so a module-scoped multi-process
#: fixture starts once.
PARALLEL = ("-n", "auto", "--dist", "loadfile")
#: Same versions as the dev venv, so lint and types do not drift with new releases.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"

nox.options.sessions = ["lint", "typecheck", "tests-core", "tests-ddp", "tests-native-amp", "tests-apex",
                         "tests-tensorboard", "tests-fsdp", "tests-compile", "wheels"]
nox.options.default_venv_backend = "venv"
#: No ensurepip (~5 s a venv, and its old setuptools would shadow the shared one): installs run
#: the pip of the interpreter running nox with --python (see pip()).
VENV = {"venv_params": ["--without-pip"]}


def _venvtools() -> ModuleType:
    """torchplug/testing/venv.py, loaded by path: nox's interpreter need not have torchplug."""
    spec = importlib.util.spec_from_file_location("_torchplug_venvtools", ROOT / "core/src/torchplug/testing/venv.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_version() -> str:
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"nox runs on {sys.executable}, which has no torch; run nox from an interpreter with "
                         "torch==2.13.0 (e.g. the project venv: .venv/bin/nox)") from None
    return version.split("+")[0]


def share_torch(session: nox.Session, extra: tuple[str, ...] = ()) -> Path:
    """Make the session venv see this interpreter's torch; return a pip constraints file pinning it."""
    present = tuple(name for name in extra if _installed(name))
    linked = _venvtools().share_into(Path(session.bin) / "python", SHARED + present)
    session.log(f"shared from {sys.executable}: {', '.join(linked)}")
    constraints = Path(session.create_tmp()) / "constraints.txt"
    constraints.write_text(f"torch=={_torch_version()}\n", encoding="utf-8")
    return constraints


def pip(session: nox.Session, *args: str) -> None:
    """``pip <args>`` for the session venv, run by nox's own pip (the venv has none)."""
    session.run(sys.executable, "-m", "pip", "--python", str(Path(session.bin) / "python"), *args, external=True)


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def package_tests(session: nox.Session, *projects: str, tests: list[str], parallel: bool = False) -> None:
    """Editable installs of the core (with its demo extra) and ``projects``, torch shared, then
    pytest on ``tests``."""
    constraints = share_torch(session, extra=SHARED_IF_PRESENT)
    editable = ["-e", f"{PROJECTS['torchplug']}[demo]"]
    editable += [arg for name in projects for arg in ("-e", str(PROJECTS[name]))]
    pip(session, "install", "--quiet", "-c", str(constraints), *TEST_TOOLS)
    pip(session, "install", "--quiet", "-c", str(constraints), "--no-build-isolation", *editable)
    session.run("pytest", *(PARALLEL if parallel else ()), *tests, *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session(name="tests-core", **VENV)
def tests_core(session: nox.Session) -> None:
    """The core's own tests (core/tests); the plugins come along for the tests that combine the
    core with them (roles, DDP signals, conflicts), which skip without them."""
    package_tests(session, "torchplug-ddp", "torchplug-native-amp", "torchplug-apex", tests=["core/tests"],
                  parallel=True)


@nox.session(name="tests-ddp", **VENV)
def tests_ddp(session: nox.Session) -> None:
    """torchplug-ddp's tests (real gloo processes)."""
    package_tests(session, "torchplug-ddp", tests=["plugins/ddp_plugin/tests"])


# The precision plugins' tests include runs combined with DDP: the ddp plugin comes along.
@nox.session(name="tests-fsdp", **VENV)
def tests_fsdp(session: nox.Session) -> None:
    """torchplug-fsdp's tests (real gloo processes; the ddp plugin provides them)."""
    package_tests(session, "torchplug-ddp", "torchplug-fsdp", tests=["plugins/fsdp_plugin/tests"])


@nox.session(name="tests-compile", **VENV)
def tests_compile(session: nox.Session) -> None:
    """torchplug-compile's tests (composed with native_amp and ddp, and with fsdp, on 2 gloo ranks)."""
    package_tests(session, "torchplug-ddp", "torchplug-native-amp", "torchplug-fsdp", "torchplug-compile",
                  tests=["plugins/compile_plugin/tests"])


@nox.session(name="tests-native-amp", **VENV)
def tests_native_amp(session: nox.Session) -> None:
    """torchplug-native-amp's tests."""
    package_tests(session, "torchplug-native-amp", "torchplug-ddp", tests=["plugins/native_amp/tests"])


@nox.session(name="tests-apex", **VENV)
def tests_apex(session: nox.Session) -> None:
    """torchplug-apex's tests, against the fake apex 25.05 in plugins/apex_plugin/tests/fake_apex."""
    package_tests(session, "torchplug-apex", "torchplug-ddp", tests=["plugins/apex_plugin/tests"])


@nox.session(name="tests-tensorboard", **VENV)
def tests_tensorboard(session: nox.Session) -> None:
    """torchplug-tensorboard's tests (event files read back with tensorboard; one 2-rank run)."""
    package_tests(session, "torchplug-tensorboard", "torchplug-ddp", tests=["plugins/tensorboard_plugin/tests"])


@nox.session(**VENV)
def wheels(session: nox.Session) -> None:
    """Build the wheels into dist/, install "torchplug[all]" from that folder into this fresh
    venv, and run tests/ against the installed wheels (conftest refuses the source tree)."""
    constraints = share_torch(session)
    pip(session, "install", "--quiet", "-c", str(constraints), *TEST_TOOLS)
    build_wheels(session)
    check_apex_extra(session, constraints)
    # A reused venv (nox -r) may hold older builds of the same version: start from none.
    pip(session, "uninstall", "--yes", "--quiet", *PROJECTS)
    pip(session, "install", "--quiet", "--find-links", str(DIST), "-c", str(constraints), "torchplug[all]")
    session.run("python", "-c", CHECK_INSTALLED)
    session.run("pytest", *PARALLEL, "tests", *session.posargs, env={
        "TORCHPLUG_TEST_INSTALLED": "1", "TORCHPLUG_WHEELHOUSE": str(DIST), "OMP_NUM_THREADS": "1"})


def check_apex_extra(session: nox.Session, constraints: Path) -> None:
    """`pip install "torchplug[apex]"` from dist/ into a fresh venv pulls torchplug-apex and
    never a distribution named `apex` (PyPI's is an unrelated 2013 Pyramid toolkit)."""
    env_dir = Path(session.create_tmp()) / "apex-extra"
    shutil.rmtree(env_dir, ignore_errors=True)
    python = _venvtools().create(env_dir, share=SHARED)
    session.run(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--find-links",
                str(DIST), "-c", str(constraints), "torchplug[apex]", external=True)
    session.run(str(python), "-c", CHECK_APEX_EXTRA, external=True)


CHECK_APEX_EXTRA = """
import importlib.metadata as md
names = sorted(d.metadata["Name"].lower() for d in md.distributions())
print('pip install "torchplug[apex]" installed:', ", ".join(n for n in names if n.startswith("torchplug")))
assert "torchplug-apex" in names, names
assert "apex" not in names, f"a distribution named apex was installed: {names}"
import torchplug_apex
print("no distribution named apex; torchplug_apex imports from", torchplug_apex.__file__)
"""

CHECK_INSTALLED = """
import importlib.metadata as md, json, subprocess, sys
names = {d.metadata["Name"].lower() for d in md.distributions()}
assert "apex" not in names, "a distribution named apex is installed"
listed = {p["name"].lower() for p in json.loads(subprocess.run(
    [sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True).stdout)}
assert "apex" not in listed, "pip list shows apex"
expected = {"torchplug", "torchplug-ddp", "torchplug-native-amp", "torchplug-apex", "torchplug-tensorboard"}
assert expected <= names, sorted(expected - names)
for name in sorted(expected):
    direct = md.distribution(name).read_text("direct_url.json")
    assert not direct or "editable" not in direct, f"{name} is an editable install"
    print(f"{name} {md.version(name)} from the wheel folder")
print("no distribution named apex installed")
"""


def build_wheels(session: nox.Session) -> None:
    """Wheels of the projects into dist/, built from copies (no build/ or egg-info in the tree)."""
    DIST.mkdir(exist_ok=True)
    for old in DIST.glob("torchplug*.whl"):
        old.unlink()
    work = Path(session.create_tmp()) / "build"
    shutil.rmtree(work, ignore_errors=True)
    for project in PROJECTS.values():
        copy = work / project.name
        shutil.copytree(project, copy, ignore=_ignore_in_build_copy(project))
        pip(session, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(DIST),
            str(copy))
    built = sorted(p.name for p in DIST.glob("torchplug*.whl"))
    session.log(f"dist/: {', '.join(built)}")
    if len(built) != len(PROJECTS):
        session.error(f"expected {len(PROJECTS)} wheels in dist/, got {built}")


def _ignore_in_build_copy(project: Path) -> Callable[[str, list[str]], set[str]]:
    """What a wheel build copy leaves out: build outputs anywhere, and the project's own tests/
    (only at its root: the core ships a templates/plugin/tests/ folder as package data)."""
    outputs = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")

    def ignore(folder: str, names: list[str]) -> set[str]:
        ignored = set(outputs(folder, names))
        if Path(folder) == project:
            ignored |= {"tests"} & set(names)
        return ignored

    return ignore


@nox.session(**VENV)
def lint(session: nox.Session) -> None:
    """ruff over the whole repository."""
    pip(session, "install", "--quiet", RUFF)
    session.run("ruff", "check", ".", *session.posargs)


@nox.session(**VENV)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the core; mypy on the plugins' and the template's sources."""
    constraints = share_torch(session)
    pip(session, "install", "--quiet", "-c", str(constraints), MYPY, "pytest>=8", "setuptools>=77")
    editable = [arg for project in PROJECTS.values() for arg in ("-e", str(project))]
    pip(session, "install", "--quiet", "-c", str(constraints), "--no-build-isolation", *editable)
    session.run("mypy", "--strict", "core/src/torchplug")
    plugin_sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "plugins").glob("*/src"))]
    session.run("mypy", *plugin_sources, "examples/plugin-template/src")


@nox.session(**VENV)
def demo(session: nox.Session) -> None:
    """`torchplug demo`: trains the built-in example (scikit-learn's digits) on the CPU."""
    constraints = share_torch(session, extra=SHARED_IF_PRESENT)
    pip(session, "install", "--quiet", "-c", str(constraints), "setuptools>=77")
    pip(session, "install", "--quiet", "-c", str(constraints), "--no-build-isolation", "-e",
        f"{PROJECTS['torchplug']}[demo]")
    root = Path(session.create_tmp()) / "demo"
    session.run("torchplug", "demo", "--no-progress-bar", "--root-dir", str(root), *session.posargs)
