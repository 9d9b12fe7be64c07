"""The availability matrix: which apex is importable decides whether the plugin can run, and
each unusable case fails in ``Trainer(...)`` (before any work) with its own message and fix.

The "wrong apex" packages are fakes (tests/fake_apex_variants): PyPI's 2013 Pyramid ``apex``
(its import raises ImportError) and NVIDIA apex 25.07+ (no ``apex.amp``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from apex_test_support import FAKE_APEX, VARIANTS, CPUApexPlugin, apex_trainer, drop_apex_modules

import torchplug
from torchplug import MisconfigurationError
from torchplug_apex import ApexPlugin, ApexUnavailableError, load_amp

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore::torchplug_apex.ApexAmpDeprecationWarning"),
]

BUILD_STEPS = ("git clone https://github.com/NVIDIA/apex", "git checkout 25.05", "PYTHONPATH",
               "pip install -v --disable-pip-version-check --no-cache-dir --no-build-isolation",
               'pip install "torchplug[native-amp]"', "Trainer(precision=16)")
REAL_APEX_SOURCE = Path(__file__).resolve().parents[3] / "third_party" / "apex-25.05"


@pytest.fixture
def apex_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """``apex_path(folder)`` makes ``folder/apex`` the only importable apex; ``apex_path(None)``
    makes apex not importable at all (also where a real apex is installed)."""
    drop_apex_modules()

    def use(folder: Path | None) -> None:
        drop_apex_modules()
        if folder is None:
            monkeypatch.setitem(sys.modules, "apex", None)  # import apex → ModuleNotFoundError(name="apex")
        else:
            monkeypatch.syspath_prepend(str(folder))

    yield use
    drop_apex_modules()


def _fake_apex_without_api(tmp_path: Path) -> Path:
    package = tmp_path / "apex"
    (package / "amp").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "amp" / "__init__.py").write_text("def initialize(*args, **kwargs):\n    pass\n")
    importlib.invalidate_caches()
    return tmp_path


CASES = {
    "not_installed": (None, ["NVIDIA apex is not installed (no module named 'apex')"]),
    "pyramid": (VARIANTS / "pyramid", [
        "a package named 'apex' is installed but importing it raised ImportError: cannot import name "
        "'UnencryptedCookieSessionFactoryConfig'",
        "PyPI's 'apex' 0.9.10.dev0 (2013), an unrelated Pyramid web toolkit", "pip uninstall apex"]),
    "apex_25_07": (VARIANTS / "apex_2507", [
        "has no apex.amp", "NVIDIA removed amp from apex after tag 25.05 (commit cb65b8e",
        "apex 25.07 and later cannot run amp"]),
}
#: What each case's first line names (the blocker) before its fix.
FIRST_LINES = {
    "not_installed": "NVIDIA apex is not installed (no module named 'apex'); fix: build NVIDIA apex 25.05",
    "pyramid": "importing it raised ImportError: cannot import name 'UnencryptedCookieSessionFactoryConfig' from "
               "'pyramid.session' (unknown location); fix: pip uninstall apex",
    "apex_25_07": "has no apex.amp (apex 25.07 and later cannot run amp O0-O3); fix: build NVIDIA apex 25.05",
}
REASONS = {"not_installed": "not_installed", "pyramid": "import_failed", "apex_25_07": "amp_removed"}


@pytest.mark.parametrize("case", list(CASES))
def test_each_unusable_apex_fails_in_the_trainer_with_its_message(
        case: str, apex_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, fragments = CASES[case]
    apex_path(folder)  # type: ignore[operator]
    with pytest.raises(ApexUnavailableError) as info:  # CPUApexPlugin: only the apex check speaks
        torchplug.Trainer(precision=16, amp_backend="apex", amp_level="O1", plugins=[CPUApexPlugin()],
                          autoload_plugins=False)
    message = str(info.value)
    assert info.value.reason == REASONS[case]
    assert isinstance(info.value, MisconfigurationError)
    assert message.startswith("ApexPlugin (torchplug-apex): ")
    for fragment in (*fragments, *BUILD_STEPS):
        assert fragment in message, f"{fragment!r} missing from:\n{message}"
    first_line, rest = message.split("\n", 1)
    assert FIRST_LINES[case] in first_line, first_line  # the blocker and its fix come first
    assert first_line == f"ApexPlugin (torchplug-apex): {info.value.blocker}."
    assert "git clone" not in first_line  # the build steps come last
    assert "git clone https://github.com/NVIDIA/apex" in rest
    assert "apex amp needs CUDA" not in message  # the CUDA requirement is off: no CUDA blocker


def test_apex_amp_without_the_api_is_not_nvidia_amp(apex_path: object, tmp_path: Path) -> None:
    apex_path(_fake_apex_without_api(tmp_path))  # type: ignore[operator]
    with pytest.raises(ApexUnavailableError, match="is not NVIDIA apex amp: it lacks scale_loss, master_params") \
            as info:
        load_amp()
    assert info.value.reason == "not_apex_amp"


def test_nvidia_apex_25_05_fake_is_usable(apex_path: object) -> None:
    apex_path(FAKE_APEX)  # type: ignore[operator]
    amp = load_amp()
    assert Path(str(amp.__file__)).is_relative_to(FAKE_APEX)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_the_trainer_refuses_apex_before_any_work(apex_path: object) -> None:
    apex_path(FAKE_APEX)  # type: ignore[operator]
    amp = importlib.import_module("apex.amp")
    with pytest.raises(MisconfigurationError) as info:
        torchplug.Trainer(precision=16, amp_backend="apex", autoload_plugins=False)
    first_line = str(info.value).split("\n")[0]
    assert "apex amp needs CUDA, but torch.cuda.is_available() is False" in first_line
    assert "fix: run on a CUDA machine with a CUDA build of torch" in first_line
    assert 'pip install "torchplug[native-amp]"' in str(info.value)
    assert amp._fake_calls == []  # nothing ran


def test_cuda_missing_or_refused_is_reported_on_any_machine(
        apex_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    apex_path(FAKE_APEX)  # type: ignore[operator]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MisconfigurationError, match=r"apex amp needs CUDA, but torch\.cuda\.is_available"):
        apex_trainer()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MisconfigurationError, match="apex amp needs CUDA, but accelerator='cpu' was asked for"):
        torchplug.Trainer(precision=16, amp_backend="apex", accelerator="cpu", autoload_plugins=False)


@pytest.mark.parametrize("case", list(CASES))
def test_no_apex_and_no_cuda_says_both_cuda_first_on_the_first_line(
        case: str, apex_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real blocker of a machine without CUDA (no CUDA) comes first, then the apex one, each
    with its fix, on the error's first line; apex's build instructions come after it."""
    folder, fragments = CASES[case]
    apex_path(folder)  # type: ignore[operator]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ApexUnavailableError) as info:
        apex_trainer()
    message = str(info.value)
    assert info.value.reason == REASONS[case]
    first_line, rest = message.split("\n", 1)
    assert first_line.startswith("ApexPlugin (torchplug-apex): apex amp cannot run here, for two reasons: "
                                 "(1) apex amp needs CUDA, but torch.cuda.is_available() is False"), first_line
    assert "fix: run on a CUDA machine with a CUDA build of torch; (2) " in first_line
    cuda, apex = first_line.index("needs CUDA"), first_line.index(FIRST_LINES[case])
    assert cuda < apex, first_line  # CUDA first, then apex, each with its fix
    assert 'pip install "torchplug[native-amp]"' in first_line  # the way round both
    for fragment in (*fragments, *BUILD_STEPS):
        assert fragment in message, f"{fragment!r} missing from:\n{message}"
    assert "git clone" not in first_line
    assert "git clone https://github.com/NVIDIA/apex" in rest


def test_apex_missing_and_cpu_asked_for_names_the_accelerator_first(
        apex_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    apex_path(None)  # type: ignore[operator]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ApexUnavailableError) as info:
        apex_trainer(accelerator="cpu")
    first_line = str(info.value).split("\n")[0]
    assert "(1) apex amp needs CUDA, but accelerator='cpu' was asked for; fix: pass accelerator='cuda'; " \
           "(2) NVIDIA apex is not installed" in first_line, first_line


@pytest.mark.parametrize(("plugin_class", "allowed"), [(ApexPlugin, False), (CPUApexPlugin, True)])
def test_only_the_test_subclass_runs_without_cuda(
        apex_path: object, monkeypatch: pytest.MonkeyPatch, plugin_class: type[ApexPlugin], allowed: bool) -> None:
    """The shipped plugin always needs CUDA (it has no switch: no argument, no environment
    variable); only the tests' CPUApexPlugin subclass runs without it (against a CPU fake of apex)."""
    apex_path(FAKE_APEX)  # type: ignore[operator]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # trainer: Lightning 1.1's constructor argument, accepted with a warning and unused (no CUDA switch)
    assert list(inspect.signature(ApexPlugin).parameters) == ["amp_level", "trainer"]
    plugin = plugin_class()
    assert plugin.plugin_name == "apex"
    if allowed:
        assert apex_trainer(plugins=[plugin]).plugin_names == ["apex"]
    else:
        with pytest.raises(MisconfigurationError, match="needs CUDA"):
            apex_trainer(plugins=[plugin])


def test_a_model_left_on_the_cpu_of_a_cuda_machine_is_refused_at_setup(
        apex_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from apex_test_support import Net, batches

    apex_path(FAKE_APEX)  # type: ignore[operator]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trainer = apex_trainer(max_steps=1)  # accelerator=None: the model's own device (CPU here)
    with pytest.raises(torchplug.PluginHookError) as info:
        trainer.fit(Net(), train_dataloaders=batches())
    assert "apex amp needs the model on CUDA, but parameters are on cpu" in str(info.value.__cause__)
    assert "Trainer(accelerator='cuda')" in str(info.value.__cause__)


@pytest.mark.slow  # compiles all of apex (~7-14 s here)
@pytest.mark.skipif(not (REAL_APEX_SOURCE / "apex" / "amp").is_dir(),
                    reason="needs NVIDIA apex 25.05's source in third_party/apex-25.05 (git-ignored)")
def test_real_apex_25_05_source_is_detected_even_with_warnings_as_errors(tmp_path: Path) -> None:
    """Real apex 25.05 imported from source on first use compiles docstrings with invalid escape
    sequences; under ``-W error`` that would be a SyntaxError. Detection must still find amp."""
    code = ("import torchplug_apex; amp = torchplug_apex.load_amp(); "
            "print(amp.__file__, amp.initialize.__module__, amp.scale_loss.__module__)")
    env = {**os.environ, "PYTHONPATH": str(REAL_APEX_SOURCE), "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    file, init_module, scale_module = proc.stdout.split()
    assert Path(file).is_relative_to(REAL_APEX_SOURCE)
    assert (init_module, scale_module) == ("apex.amp.frontend", "apex.amp.handle")
