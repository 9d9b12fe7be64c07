"""Entry-point discovery.

The ``slow`` tests use REAL distributions: the projects in plugin_projects/ are built as
wheels and pip-installed into a fresh venv (see plugin_projects/support.py), and every
scenario runs in a subprocess of that venv's python. The fast tests check the metadata
scanner against ``importlib.metadata`` on fake ``*.dist-info`` trees on ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Any

import pytest
from plugin_projects import support
from plugin_projects.support import PluginEnv, make_fake_dist

from torchplug import discovery
from torchplug.errors import PluginConflictError

BLOCK_BROKEN = {"TORCHPLUG_BLOCK_PLUGINS": "broken_autoload"}


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> PluginEnv:
    return support.plugin_env(tmp_path_factory.mktemp("plugin-env"))


@pytest.fixture(scope="module")
def errors(plugin_env: PluginEnv) -> dict[str, Any]:
    return plugin_env.scenario("errors")


# --------------------------------------------------------------------------------------------
# Real wheels in a fresh venv
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_venv_runs_the_installed_wheels(plugin_env: PluginEnv) -> None:
    code = ("import json, torch, torchplug, tp_named; print(json.dumps([torchplug.__file__, tp_named.__file__, "
            "torch.__file__]))")
    proc = plugin_env.run([str(plugin_env.python), "-c", code])
    assert proc.returncode == 0, proc.stderr
    core, plugin, torch_file = (Path(p) for p in __import__("json").loads(proc.stdout.splitlines()[-1]))
    assert core.is_relative_to(plugin_env.site_packages), core  # the core wheel, not the source tree
    assert plugin.is_relative_to(plugin_env.site_packages), plugin
    assert not torch_file.is_relative_to(plugin_env.site_packages)  # torch is shared, not installed


@pytest.mark.slow
def test_autoload_plugins_change_training_in_documented_order(plugin_env: PluginEnv, tmp_path: Path) -> None:
    result = plugin_env.scenario("autoload", {**BLOCK_BROKEN, "TP_AUTOLOG_FILE": str(tmp_path / "calls.txt")})
    # autoload entry points register sorted by name; pluggy calls the later registration first
    assert result["plugin_names"] == ["autolog", "zz_late"]
    assert result["records"] == [
        "zz_late on_fit_start",
        "autolog on_fit_start",
        "autolog on_train_batch_end 0",
        "autolog on_train_batch_end 1",
        "autolog on_train_batch_end 2",
        "autolog on_fit_end",
    ]
    assert result["fit"]["weights_changed"]
    # blocked by TORCHPLUG_BLOCK_PLUGINS: never imported; named plugins: not selected, not imported
    assert result["modules"] == ["tp_autolog", "tp_autolog.late"]


@pytest.mark.slow
def test_autoload_disabled_and_plugins_selected_by_name(plugin_env: PluginEnv, tmp_path: Path) -> None:
    result = plugin_env.scenario("selection", {"TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "1",
                                               "TP_AUTOLOG_FILE": str(tmp_path / "calls.txt")})
    disabled = result["disabled"]
    assert disabled["plugin_names"] == []
    assert disabled["modules"] == []  # not even the broken autoload plugin was imported
    assert disabled["records"] == []
    assert disabled["fit"]["weights_changed"]

    by_argument = result["by_argument"]  # Trainer(plugins=["freeze"])
    assert by_argument["plugin_names"] == ["freeze"]
    assert not by_argument["fit"]["weights_changed"]  # freeze's optimizer_step never steps
    assert by_argument["fit"]["metrics"].get("skipped_steps") == 3
    assert by_argument["modules"] == ["tp_named", "tp_named.freeze"]

    by_env = result["by_env"]  # TORCHPLUG_PLUGINS="freeze, autolog" with autoload still off
    assert by_env["plugin_names"] == ["freeze", "autolog"]
    assert not by_env["fit"]["weights_changed"]
    assert by_env["records"][0] == "autolog on_fit_start"
    assert "tp_autolog.late" not in by_env["modules"]  # zz_late was not named


@pytest.mark.slow
def test_blocking_by_trainer_argument_skips_the_import(errors: dict[str, Any]) -> None:
    blocked = errors["blocked_by_argument"]
    assert blocked["plugin_names"] == ["autolog", "zz_late"]
    assert "tp_broken.autoplugin" not in blocked["modules"]
    assert "tp_broken" not in blocked["modules"]


@pytest.mark.slow
def test_broken_autoload_plugin_error_names_entry_point_distribution_and_fix(errors: dict[str, Any]) -> None:
    err = errors["broken_autoload"]
    assert err["type"] == "PluginLoadError"
    assert "ImportError" in err["mro"]
    message = err["message"]
    assert "'broken_autoload'" in message
    assert "tp_broken.autoplugin" in message
    assert "torchplug-test-broken 0.3.0" in message
    assert "Don't hide me" in message
    assert "TORCHPLUG_BLOCK_PLUGINS=broken_autoload" in message
    assert "blocked_plugins=['broken_autoload']" in message
    # the original traceback is kept, down to the plugin's own line
    assert err["cause"] == "RuntimeError"
    assert "tp_broken/autoplugin.py" in err["cause_traceback"]
    assert "_fail()" in err["cause_traceback"]


@pytest.mark.slow
def test_broken_named_plugin_keeps_the_missing_module(errors: dict[str, Any]) -> None:
    err = errors["broken_selected"]
    assert err["type"] == "PluginLoadError"
    assert err["cause"] == "ModuleNotFoundError"
    assert "tp_missing_dependency" in err["message"]
    assert "'broken' (torchplug.plugins = 'tp_broken.plugin') from distribution torchplug-test-broken 0.3.0" in (
        err["message"])
    assert "pip uninstall torchplug-test-broken" in err["message"]


@pytest.mark.slow
def test_incompatible_plugin_is_refused_with_the_reason_without_import(errors: dict[str, Any]) -> None:
    err = errors["incompatible"]
    assert err["type"] == "PluginIncompatibleError"
    assert "requires torchplug<0.1, installed is torchplug 0.1.0" in err["message"]
    assert "torchplug-test-old 0.0.1" in err["message"]
    assert "tp_old" not in err["modules"]


@pytest.mark.slow
def test_two_precision_plugins_conflict_naming_both_distributions(errors: dict[str, Any]) -> None:
    err = errors["conflict"]
    assert err["type"] == "PluginConflictError"
    message = err["message"]
    assert "Two precision plugins" in message
    assert "'precise' (entry point tp_named.precision:NamedPrecision, distribution torchplug-test-named 2.1.0)" in (
        message)
    assert "'rival_precision' (entry point tp_rival:RivalPrecision, distribution torchplug-test-rival 1.5.0)" in (
        message)
    assert "Choose one" in message


@pytest.mark.slow
def test_unknown_names_suggest_the_closest_and_the_pip_line(errors: dict[str, Any]) -> None:
    typo = errors["typo"]
    assert typo["type"] == "PluginNotFoundError"
    assert "Did you mean 'freeze'?" in typo["message"]
    installed = "autolog, broken, broken_autoload, freeze, oldplug, precise, rival_precision, zz_late"
    assert f"Installed plugins: {installed}." in typo["message"]
    first_party = errors["first_party"]
    assert first_party["type"] == "PluginNotFoundError"
    assert 'pip install "torchplug[ddp]"' in first_party["message"]
    shorthand = errors["shorthand"]  # precision=16 → native_amp, not installed in this venv
    assert shorthand["type"] == "PluginNotFoundError"
    assert 'pip install "torchplug[native-amp]"' in shorthand["message"]
    assert "precision shorthand" in shorthand["message"]


@pytest.mark.slow
def test_selecting_a_blocked_plugin_is_an_error(errors: dict[str, Any]) -> None:
    err = errors["blocked_selected"]
    assert err["type"] == "PluginBlockedError"
    assert "'freeze'" in err["message"]


# --------------------------------------------------------------------------------------------
# The metadata scanner (fast, fake dist-info trees)
# --------------------------------------------------------------------------------------------


def _stdlib_view(group: str) -> set[tuple[str, str, str]]:
    return {(ep.name, ep.value, ep.dist.name if ep.dist else "") for ep in importlib.metadata.entry_points(group=group)}


def _our_view(group: str) -> set[tuple[str, str, str]]:
    return {(ep.name, ep.value, ep.dist_name) for ep in discovery.installed_plugins() if ep.group == group}


def test_scanner_agrees_with_importlib_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_fake_dist(first, "alpha-plugin", "1.0", {"torchplug.plugins": {"alpha": "alpha_mod:Alpha"}})
    make_fake_dist(first, "beta", "2.0", {"torchplug.autoload": {"beta": "beta_mod"},
                                          "console_scripts": {"beta": "beta_mod:main"}})
    make_fake_dist(first, "gamma", "3.0", {"other.group": {"gamma": "gamma_mod"}})
    make_fake_dist(first, "delta", "0.1")  # no entry_points.txt at all
    # shadowed by the first alpha_plugin on sys.path, as in importlib.metadata
    make_fake_dist(second, "alpha_plugin", "0.5", {"torchplug.plugins": {"alpha_old": "alpha_old:Alpha"}})
    egg = second / "epsilon.egg-info"  # legacy (setup.py develop) metadata
    egg.mkdir(parents=True)
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.2\nName: epsilon\nVersion: 0.9\n")
    (egg / "entry_points.txt").write_text("[torchplug.plugins]\nepsilon = epsilon_mod:Plugin\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    for group in discovery.GROUPS:
        assert _our_view(group) == _stdlib_view(group)
    names = {ep.name: ep for ep in discovery.installed_plugins()}
    assert "alpha_old" not in names
    assert names["alpha"].dist_version == "1.0"
    assert names["epsilon"].dist_name == "epsilon"
    assert names["epsilon"].dist_version == "0.9"


def test_listing_is_sorted_and_cached_per_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("zeta", "eta", "theta"):
        make_fake_dist(tmp_path, f"dist-{name}", "1.0", {"torchplug.plugins": {name: f"{name}_mod"}})
    make_fake_dist(tmp_path, "auto", "1.0", {"torchplug.autoload": {"auto": "auto_mod"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    ours = [(ep.group, ep.name) for ep in discovery.installed_plugins() if ep.dist_name.startswith(("dist-", "auto"))]
    assert ours == [("torchplug.autoload", "auto"), ("torchplug.plugins", "eta"),
                    ("torchplug.plugins", "theta"), ("torchplug.plugins", "zeta")]
    make_fake_dist(tmp_path, "late", "1.0", {"torchplug.plugins": {"late": "late_mod"}})
    assert discovery.find("late") is None  # cached for this sys.path ...
    found = [ep for ep in discovery.installed_plugins(refresh=True) if ep.name == "late"]  # ... until refreshed
    assert found
    assert found[0].dist_name == "late"


def test_core_requirement_ignores_optional_extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_dist(tmp_path, "needs-old", "1.0", {"torchplug.plugins": {"needs_old": "m"}},
                   requires=['torchplug[testing]>=99; extra == "test"', "torchplug<0.1,>=0.0.1", "numpy"])
    make_fake_dist(tmp_path, "needs-any", "1.0", {"torchplug.plugins": {"needs_any": "m"}},
                   requires=["numpy>=1", 'torchplug>=0.1; python_version >= "3.8"'])
    make_fake_dist(tmp_path, "needs-none", "1.0", {"torchplug.plugins": {"needs_none": "m"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = {ep.name: ep for ep in discovery.installed_plugins()}
    assert eps["needs_old"].core_requirement == "torchplug<0.1,>=0.0.1"
    assert eps["needs_old"].incompatibility() == "requires torchplug<0.1,>=0.0.1, installed is torchplug 0.1.0"
    assert eps["needs_any"].incompatibility() is None
    assert eps["needs_none"].core_requirement is None
    assert eps["needs_none"].incompatibility() is None


def test_same_name_from_two_distributions_is_a_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_dist(tmp_path, "one-dist", "1.0", {"torchplug.plugins": {"twin": "one_mod"}})
    make_fake_dist(tmp_path, "two-dist", "2.0", {"torchplug.plugins": {"twin": "two_mod"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginConflictError, match=r"'twin'.*one-dist 1\.0.*two-dist 2\.0"):
        discovery.find("twin")


def test_find_prefers_named_group_then_autoload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_dist(tmp_path, "both", "1.0", {"torchplug.plugins": {"dual": "named_mod"},
                                              "torchplug.autoload": {"dual": "auto_mod", "only_auto": "auto_mod"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    dual, only_auto = discovery.find("dual"), discovery.find("only_auto")
    assert dual is not None
    assert dual.group == "torchplug.plugins"
    assert only_auto is not None
    assert only_auto.group == "torchplug.autoload"
    assert discovery.find("nope") is None


def test_environment_switches() -> None:
    assert discovery.autoload_disabled({"TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert discovery.autoload_disabled({"TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "true"})
    assert not discovery.autoload_disabled({"TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "0"})
    assert not discovery.autoload_disabled({})
    assert discovery.blocked_names({"TORCHPLUG_BLOCK_PLUGINS": " a, b,,c "}) == {"a", "b", "c"}
    assert discovery.install_hint("native_amp") == 'pip install "torchplug[native-amp]"'
    assert discovery.install_hint("apex") == 'pip install "torchplug[apex]"'
    assert discovery.install_hint("other") is None


def test_discovery_reads_metadata_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported.txt"
    make_fake_dist(tmp_path, "loud", "1.0", {"torchplug.plugins": {"loud": "loud_mod:Plugin"}},
                   modules={"loud_mod": f"with open({str(marker)!r}, 'w') as f:\n    f.write('imported')\n"
                                   "class Plugin: pass\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = discovery.find("loud")
    assert ep is not None
    assert ep.module == "loud_mod"
    assert not marker.exists()
    assert "loud_mod" not in sys.modules
    plugin = ep.load()  # a module:Class target is instantiated with no arguments
    assert type(plugin).__name__ == "Plugin"
    assert marker.exists()
    monkeypatch.delitem(sys.modules, "loud_mod")


def test_fast_specifier_check_agrees_with_packaging() -> None:
    """Compatibility is decided without importing packaging (~0.2 s) for plain release numbers;
    it must agree with packaging's PEP 440 answer, and defer to it for everything else."""
    import itertools

    from packaging.specifiers import SpecifierSet

    versions = ["0", "0.0", "0.0.1", "0.1", "0.1.0", "0.1.1", "0.2", "1.0", "1.4", "1.4.5", "1.10", "2.0.0", "10"]
    specs = [f"{op}{v}" for op in ("==", "!=", "<", "<=", ">", ">=", "~=") for v in versions]
    specs += [f">={a},<{b}" for a, b in itertools.product(versions[::3], versions[1::3])]
    checked = 0
    for spec, version in itertools.product(specs, versions):
        fast = discovery._plain_contains(spec, version)
        if spec in ("~=0", "~=10"):  # ~= needs two components: not a valid specifier
            assert fast is None
            continue
        assert fast == SpecifierSet(spec).contains(version, prereleases=True), (spec, version)
        checked += 1
    assert checked > 1000
    for other in ("==0.1.*", ">=0.2.dev0", "===0.1.0", "<1.0rc1"):
        assert discovery._plain_contains(other, "0.1.0") is None
    assert discovery.incompatibility("torchplug>=0.2.dev0") == (
        "requires torchplug>=0.2.dev0, installed is torchplug 0.1.0")
    assert discovery.incompatibility("torchplug (>=0.1, <0.2)") is None
    assert discovery.incompatibility("torchplug>>1") == "unreadable requirement 'torchplug>>1'"
