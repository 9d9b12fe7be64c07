"""The installed distributions as a user gets them from ``pip install "torchplug[all]"``:
metadata (extras, core ranges, entry points, never the PyPI ``apex``), the listing CLI, and
the first-party plugins selected by the names users type."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement

import torchplug
from torchplug import MisconfigurationError, Trainer
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader

FIRST_PARTY = {  # distribution: (entry-point name, import, extra)
    "torchplug-ddp": ("ddp", "torchplug_ddp", "ddp"),
    "torchplug-native-amp": ("native_amp", "torchplug_native_amp", "native-amp"),
    "torchplug-apex": ("apex", "torchplug_apex", "apex"),
    "torchplug-tensorboard": ("tensorboard", "torchplug_tensorboard", "tensorboard"),
    "torchplug-fsdp": ("fsdp", "torchplug_fsdp", "fsdp"),
    "torchplug-compile": ("compile", "torchplug_compile", "compile"),
}
QUIET: dict[str, Any] = {"max_epochs": 1, "enable_progress_bar": False, "logger": False,
                         "enable_checkpointing": False, "autoload_plugins": False}


def _dist(name: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed (pip install 'torchplug[all]', or nox -s wheels)")


def _requirements(dist: importlib.metadata.Distribution) -> list[Requirement]:
    return [Requirement(text) for text in dist.requires or []]


def test_core_extras_pull_exactly_the_plugin_distributions() -> None:
    extras: dict[str, set[str]] = {}
    for req in _requirements(_dist("torchplug")):
        for extra in ("ddp", "native-amp", "apex", "tensorboard", "fsdp", "compile", "all"):
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                extras.setdefault(extra, set()).add(req.name)
    assert extras["ddp"] == {"torchplug-ddp"}
    assert extras["native-amp"] == {"torchplug-native-amp"}
    assert extras["apex"] == {"torchplug-apex"}
    assert extras["tensorboard"] == {"torchplug-tensorboard"}
    assert extras["fsdp"] == {"torchplug-fsdp"}
    assert extras["compile"] == {"torchplug-compile"}
    assert extras["all"] == set(FIRST_PARTY)


@pytest.mark.parametrize("name", ["torchplug", *FIRST_PARTY])
def test_no_distribution_depends_on_pypi_apex(name: str) -> None:
    """PyPI's ``apex`` is an unrelated 2013 Pyramid toolkit: no requirement, extra or not, names it."""
    names = {req.name.lower() for req in _requirements(_dist(name))}
    assert "apex" not in names, f"{name} requires {sorted(names)}"


@pytest.mark.parametrize("name", list(FIRST_PARTY))
def test_plugin_declares_a_core_range_that_contains_this_core(name: str) -> None:
    dist = _dist(name)
    core = [req for req in _requirements(dist) if req.name == "torchplug"]
    assert len(core) == 1, f"{name} must require torchplug with a compatible range"
    assert core[0].specifier, f"{name}: torchplug requirement without a version range"
    assert core[0].specifier.contains(torchplug.__version__), (core[0], torchplug.__version__)
    entry_name, module, _ = FIRST_PARTY[name]
    entry_points = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert entry_points.get(("torchplug.plugins", entry_name), "").startswith(module), entry_points


def test_listing_cli_shows_every_first_party_plugin_without_importing_them() -> None:
    installed = [name for name in FIRST_PARTY if _installed(name)]
    if not installed:
        pytest.skip("no first-party plugin installed")
    code = ("import sys, json; from torchplug.cli import main; rc = main(['plugins', '--json']); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('torchplug_'))), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = {item["name"]: item for item in _plugins_of(json.loads(proc.stdout))}
    for name in installed:
        entry_name, _, _ = FIRST_PARTY[name]
        assert listed[entry_name]["distribution"] == name
        assert listed[entry_name]["status"] == "ok", listed[entry_name]
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == [], "listing imported a plugin module"


def _plugins_of(data: Any) -> list[dict[str, Any]]:
    return data["plugins"] if isinstance(data, dict) else data  # type: ignore[no-any-return]


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_precision_bf16_selects_native_amp_by_name(tmp_path: Path) -> None:
    _dist("torchplug-native-amp")
    module = TinyMLP()
    trainer = Trainer(precision="bf16", default_root_dir=tmp_path, **QUIET)
    assert trainer.plugin_names == ["native_amp"]
    trainer.fit(module, tiny_loader())
    assert torch.isfinite(parameters_vector(module)).all()


def test_apex_by_name_refuses_a_machine_without_cuda() -> None:
    _dist("torchplug-apex")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MisconfigurationError, match="apex amp needs CUDA"):
        Trainer(precision=16, amp_backend="apex", **QUIET)


@pytest.mark.timeout(300)
def test_devices_2_selects_ddp_by_name_and_trains_in_two_processes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _dist("torchplug-ddp")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    module, single = TinyMLP(), TinyMLP()
    trainer = Trainer(devices=2, accelerator="cpu", default_root_dir=tmp_path, **QUIET)
    assert trainer.plugin_names == ["ddp"]
    trainer.fit(module, tiny_loader(n=64, batch_size=8))
    # Unshuffled, rank r gets samples r, r+2, ...: each step averages the two ranks' batches of 8,
    # i.e. the mean over the same 16 samples one process sees with batches of 16.
    Trainer(default_root_dir=tmp_path, **QUIET).fit(single, tiny_loader(n=64, batch_size=16))
    trained, reference = parameters_vector(module), parameters_vector(single)
    assert not torch.equal(trained, parameters_vector(TinyMLP())), "the parent's model was not trained"
    assert torch.allclose(trained, reference, atol=1e-5), float((trained - reference).abs().max())
