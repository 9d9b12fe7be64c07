"""``torchplug plugins``: listing from metadata only, ``--json``, ``--check``, ``--requirements``.

The ``slow`` tests run the installed ``torchplug`` command of a fresh venv holding the test
plugin wheels (plugin_projects/); the others run the same code in-process on fake
``*.dist-info`` trees.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plugin_projects import support
from plugin_projects.support import IMPORT_MARKER, PluginEnv, make_fake_dist

from torchplug import __version__, listing

TEST_PLUGINS = {
    # name: (group, distribution, version)
    "autolog": ("torchplug.autoload", "torchplug-test-autolog", "1.0.0"),
    "zz_late": ("torchplug.autoload", "torchplug-test-autolog", "1.0.0"),
    "broken_autoload": ("torchplug.autoload", "torchplug-test-broken", "0.3.0"),
    "broken": ("torchplug.plugins", "torchplug-test-broken", "0.3.0"),
    "freeze": ("torchplug.plugins", "torchplug-test-named", "2.1.0"),
    "precise": ("torchplug.plugins", "torchplug-test-named", "2.1.0"),
    "oldplug": ("torchplug.plugins", "torchplug-test-old", "0.0.1"),
    "rival_precision": ("torchplug.plugins", "torchplug-test-rival", "1.5.0"),
}
INCOMPATIBLE = f"requires torchplug<0.1, installed is torchplug {__version__}"


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> PluginEnv:
    return support.plugin_env(tmp_path_factory.mktemp("plugin-env"))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    for name in ("TORCHPLUG_BLOCK_PLUGINS", "TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(name, raising=False)
    yield site
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(site)):
            del sys.modules[name]


def by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in data["plugins"] if p["name"] in TEST_PLUGINS}


# --------------------------------------------------------------------------------------------
# The installed command, in a fresh venv with real wheels
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_table_lists_every_plugin_without_importing_any(plugin_env: PluginEnv, tmp_path: Path) -> None:
    imports = tmp_path / "imports.txt"
    proc = plugin_env.run([*plugin_env.torchplug_cmd, "plugins"], {"TP_TEST_IMPORT_LOG": str(imports)})
    assert proc.returncode == 0, proc.stderr
    assert not imports.exists(), imports.read_text()  # no plugin module was imported
    assert "imported" not in proc.stdout  # tp_named.freeze prints when imported
    lines = proc.stdout.splitlines()
    assert f"python {plugin_env.python}" in lines[0]
    header = next(line for line in lines if line.startswith("NAME"))
    assert header.split() == ["NAME", "GROUP", "DISTRIBUTION", "VERSION", "STATUS"]
    rows = {line.split()[0]: line for line in lines[lines.index(header) + 1:]}
    assert set(rows) == set(TEST_PLUGINS)  # the venv holds exactly the test plugins
    for name, (group, dist, version) in TEST_PLUGINS.items():
        assert rows[name].split()[:4] == [name, group, dist, version]
        expected = f"incompatible ({INCOMPATIBLE})" if name == "oldplug" else "ok"
        assert rows[name].split(None, 4)[4] == expected


@pytest.mark.slow
def test_json_has_interpreter_prefix_and_statuses(plugin_env: PluginEnv, tmp_path: Path) -> None:
    imports = tmp_path / "imports.txt"
    env = {"TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "1", "TORCHPLUG_BLOCK_PLUGINS": "broken_autoload,freeze",
           "TP_TEST_IMPORT_LOG": str(imports)}
    proc = plugin_env.run([*plugin_env.torchplug_cmd, "plugins", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert not imports.exists()
    data = json.loads(proc.stdout)
    assert data["python"] == str(plugin_env.python)
    assert data["prefix"] == str(plugin_env.python.parent.parent)
    assert data["torchplug"] == __version__
    assert data["autoload_disabled"] is True
    assert data["blocked"] == ["broken_autoload", "freeze"]
    plugins = by_name(data)
    assert {name: (p["status"], p["reason"]) for name, p in plugins.items()} == {
        "autolog": ("autoload-disabled", "TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1"),
        "zz_late": ("autoload-disabled", "TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1"),
        "broken_autoload": ("blocked", "TORCHPLUG_BLOCK_PLUGINS"),
        "freeze": ("blocked", "TORCHPLUG_BLOCK_PLUGINS"),
        "broken": ("ok", None),
        "precise": ("ok", None),
        "oldplug": ("incompatible", INCOMPATIBLE),
        "rival_precision": ("ok", None),  # its extra's torchplug[testing]>=99 does not count
    }
    assert plugins["precise"]["value"] == "tp_named.precision:NamedPrecision"
    assert plugins["precise"]["distribution"] == "torchplug-test-named"
    assert plugins["precise"]["version"] == "2.1.0"
    assert plugins["precise"]["requires"] == "torchplug<1,>=0.1"
    assert Path(plugins["precise"]["metadata_path"]).is_relative_to(plugin_env.site_packages)


@pytest.mark.slow
def test_check_imports_each_plugin_and_survives_broken_ones(plugin_env: PluginEnv) -> None:
    proc = plugin_env.run([*plugin_env.torchplug_cmd, "plugins", "--check", "--json"],
                          {"TORCHPLUG_BLOCK_PLUGINS": "broken_autoload"})
    assert proc.returncode == 1, proc.stderr  # some failed
    data = json.loads(proc.stdout)  # freeze's print on import went to stderr, not into the JSON
    assert "tp_named.freeze: imported" in proc.stderr
    plugins = by_name(data)
    checks = {name: p.get("check") for name, p in plugins.items()}
    assert checks["broken_autoload"] is None  # blocked: not imported
    for name, hooks, role in [("autolog", ["on_fit_end", "on_fit_start", "on_train_batch_end"], None),
                              ("zz_late", ["on_fit_start"], None),
                              ("freeze", ["optimizer_step"], None),
                              ("precise", ["forward_context"], "precision"),
                              ("rival_precision", ["forward_context"], "precision")]:
        assert checks[name] == {"ok": True, "hooks": hooks, "role": role, "error": None, "traceback": None,
                                "refused": None}, name
    broken = checks["broken"]
    assert broken is not None
    assert broken["ok"] is False
    assert broken["error"].startswith("PluginLoadError: Could not load plugin 'broken'")
    assert "caused by ModuleNotFoundError: No module named 'tp_missing_dependency'" in broken["error"]
    assert "tp_broken/plugin.py" in broken["traceback"]
    old = checks["oldplug"]
    assert old is not None
    assert old["ok"] is False
    assert old["error"].startswith("PluginIncompatibleError")
    assert INCOMPATIBLE in old["error"]


@pytest.mark.slow
def test_requirements_json_is_the_same_list(plugin_env: PluginEnv) -> None:
    proc = plugin_env.run([*plugin_env.torchplug_cmd, "plugins", "--requirements", "--json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["prefix"] == str(plugin_env.python.parent.parent)
    assert data["requirements"] == [
        "torchplug-test-autolog==1.0.0",
        "torchplug-test-broken==0.3.0",
        "torchplug-test-named==2.1.0",
        "torchplug-test-old==0.0.1",
        "torchplug-test-rival==1.5.0",
    ]


@pytest.mark.slow
def test_requirements_pins_the_plugin_set(plugin_env: PluginEnv) -> None:
    proc = plugin_env.run([str(plugin_env.python), "-m", "torchplug", "plugins", "--requirements"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# torchplug plugins in ")
    assert lines[1:] == [
        "torchplug-test-autolog==1.0.0",
        "torchplug-test-broken==0.3.0",
        "torchplug-test-named==2.1.0",
        "torchplug-test-old==0.0.1",
        "torchplug-test-rival==1.5.0",
    ]


# --------------------------------------------------------------------------------------------
# In-process, on fake distributions
# --------------------------------------------------------------------------------------------


def test_listing_1000_distributions_imports_nothing(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    imports = tmp_path / "imports.txt"
    monkeypatch.setenv("TP_TEST_IMPORT_LOG", str(imports))
    for i in range(1000):
        group = "torchplug.plugins" if i % 10 == 0 else "other.group"
        make_fake_dist(site, f"fakepkg{i}", "1.0", {group: {f"plug{i}": f"fakepkg{i}.plugin:Plugin"}},
                       modules={f"fakepkg{i}.plugin": IMPORT_MARKER + "class Plugin: pass\n"} if i % 10 == 0 else None)
    assert listing.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    fake = [p for p in data["plugins"] if p["name"].startswith("plug")]
    assert len(fake) == 100
    assert {p["status"] for p in fake} == {"ok"}
    assert not imports.exists()
    assert not [m for m in sys.modules if m.startswith("fakepkg")]


def test_statuses(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_dist(site, "st-ok", "1.0", {"torchplug.plugins": {"st_ok": "m"}}, requires=["torchplug>=0.1"])
    make_fake_dist(site, "st-old", "1.0", {"torchplug.plugins": {"st_old": "m"}}, requires=["torchplug<0.1"])
    make_fake_dist(site, "st-auto", "1.0", {"torchplug.autoload": {"st_auto": "m"}})
    make_fake_dist(site, "st-twin-a", "1.0", {"torchplug.plugins": {"st_twin": "a"}})
    make_fake_dist(site, "st-twin-b", "2.0", {"torchplug.plugins": {"st_twin": "b"}})
    make_fake_dist(site, "st-blocked", "1.0", {"torchplug.plugins": {"st_blocked": "m"}}, requires=["torchplug<0.1"])

    def statuses(env: dict[str, str]) -> dict[tuple[str, str], str]:
        return {(s.entry_point.name, s.entry_point.dist_name): s.label for s in listing.collect(env)
                if s.entry_point.name.startswith("st_")}

    assert statuses({"TORCHPLUG_BLOCK_PLUGINS": "st_blocked"}) == {
        ("st_auto", "st-auto"): "ok",
        ("st_blocked", "st-blocked"): "blocked (TORCHPLUG_BLOCK_PLUGINS)",  # blocked wins over incompatible
        ("st_ok", "st-ok"): "ok",
        ("st_old", "st-old"): f"incompatible ({INCOMPATIBLE})",
        ("st_twin", "st-twin-a"): "conflict (also provided by st-twin-b)",
        ("st_twin", "st-twin-b"): "conflict (also provided by st-twin-a)",
    }
    assert statuses({"TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"})[("st_auto", "st-auto")] == (
        "autoload-disabled (TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1)")
    pins = listing.requirements([s for s in listing.collect({}) if s.entry_point.name.startswith("st_")])
    assert pins == ["st-auto==1.0", "st-blocked==1.0", "st-ok==1.0", "st-old==1.0", "st-twin-a==1.0",
                    "st-twin-b==2.0"]


def test_check_never_crashes(site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    good = "from torchplug import hookimpl\n\n@hookimpl\ndef world_size():\n    return 1\n"
    plugins = {
        "ck_good": good,
        "ck_raises": "raise KeyError('boom')\n",
        "ck_exits": "import sys\nsys.exit(3)\n",
        "ck_invalid": "from torchplug import hookimpl\n\n@hookimpl\ndef clip_gradient(optimizer):\n    pass\n",
        "ck_prints": "print('hello from ck_prints')\n" + good,
    }
    for name, source in plugins.items():
        make_fake_dist(site, name.replace("_", "-"), "1.0", {"torchplug.plugins": {name: f"{name}_mod"}},
                       modules={f"{name}_mod": source})
    make_fake_dist(site, "ck-blocked", "1.0", {"torchplug.plugins": {"ck_blocked": "ck_blocked_mod"}},
                   modules={"ck_blocked_mod": "raise RuntimeError('blocked plugins are not imported')\n"})
    monkeypatch.setenv("TORCHPLUG_BLOCK_PLUGINS", "ck_blocked")

    statuses = [s for s in listing.collect() if s.entry_point.name.startswith("ck_")]
    for item in statuses:
        if item.status != "blocked":
            listing.check(item)
    results = {s.entry_point.name: s for s in statuses}
    assert results["ck_good"].ok
    assert results["ck_good"].hooks == ["world_size"]
    assert results["ck_prints"].ok
    assert results["ck_raises"].error == (
        "PluginLoadError: Could not load plugin 'ck_raises' (torchplug.plugins = 'ck_raises_mod') from distribution "
        "ck-raises 1.0: KeyError: 'boom'\n"
        "Fix or reinstall ck-raises (pip install --force-reinstall ck-raises), uninstall it (pip uninstall ck-raises), "
        "or run without it: do not select 'ck_raises'.\ncaused by KeyError: 'boom'")
    assert results["ck_exits"].ok is False
    assert "SystemExit: 3" in (results["ck_exits"].error or "")
    assert results["ck_invalid"].ok is False
    assert "unknown hook 'clip_gradient'" in (results["ck_invalid"].error or "")
    assert not results["ck_blocked"].checked
    assert "ck_blocked_mod" not in sys.modules

    text = listing.format_check(statuses)
    assert "ck_good (torchplug.plugins, ck-good 1.0): ok, hooks: world_size" in text
    assert "ck_blocked (torchplug.plugins, ck-blocked 1.0): not imported (blocked (TORCHPLUG_BLOCK_PLUGINS))" in text
    assert "ck_raises (torchplug.plugins, ck-raises 1.0): FAILED\n    PluginLoadError" in text
    assert "hello from ck_prints" in capsys.readouterr().err  # a plugin's print never lands on stdout


def only(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``site`` the only folder with distributions (the standard library stays)."""
    monkeypatch.setattr(sys, "path", [str(site)] + [p for p in sys.path if p.startswith(sys.base_prefix)])


def test_check_exit_code(site: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_dist(site, "ex-bad", "1.0", {"torchplug.plugins": {"ex_bad": "ex_bad_mod"}},
                   modules={"ex_bad_mod": "raise ImportError('nope')\n"})
    only(site, monkeypatch)
    assert listing.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "ex_bad (torchplug.plugins, ex-bad 1.0): FAILED" in out
    monkeypatch.setenv("TORCHPLUG_BLOCK_PLUGINS", "ex_bad")
    assert listing.main(["--check"]) == 0


def test_empty_listing_says_how_to_install(site: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    only(site, monkeypatch)
    assert listing.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No torchplug plugins installed for python ")
    assert 'pip install "torchplug[native-amp]"' in out


REFUSING = """
from torchplug import MisconfigurationError, Plugin


class Picky(Plugin):
    role = "precision"

    def check_configuration(self, trainer):
        raise MisconfigurationError("Picky (torchplug-test-picky): needs a machine with a flux capacitor")
"""


def test_check_reports_what_a_trainer_refuses(site: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--check builds Trainer(plugins=[plugin]): the plugin's check_configuration decides, with its reason."""
    make_fake_dist(site, "rf-picky", "1.0", {"torchplug.plugins": {"rf_picky": "rf_picky_mod:Picky"}},
                   modules={"rf_picky_mod": REFUSING})
    make_fake_dist(site, "rf-fine", "1.0", {"torchplug.plugins": {"rf_fine": "rf_fine_mod"}},
                   modules={"rf_fine_mod": "from torchplug import hookimpl\n\n@hookimpl\ndef world_size():\n"
                                           "    return 1\n"})
    only(site, monkeypatch)
    monkeypatch.setenv("TORCHPLUG_PLUGINS", "rf_fine")  # --check judges each plugin alone
    assert listing.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert ("rf_picky (torchplug.plugins, rf-picky 1.0): REFUSED by a Trainer on this machine\n"
            "    MisconfigurationError: Picky (torchplug-test-picky): needs a machine with a flux capacitor") in out
    assert "rf_fine (torchplug.plugins, rf-fine 1.0): ok, hooks: world_size" in out
    assert listing.main(["--check", "--json"]) == 1
    data = {p["name"]: p["check"] for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert data["rf_picky"]["ok"] is False
    assert data["rf_picky"]["role"] == "precision"
    assert data["rf_picky"]["refused"] == (
        "MisconfigurationError: Picky (torchplug-test-picky): needs a machine with a flux capacitor")
    assert data["rf_picky"]["error"] is None
    assert data["rf_fine"] == {"ok": True, "hooks": ["world_size"], "role": None, "error": None, "traceback": None,
                               "refused": None}


def test_check_reports_apex_refused_without_cuda_or_nvidia_apex(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The first-party apex plugin: without NVIDIA apex or CUDA a Trainer refuses it, and so does --check."""
    import torch

    from torchplug import discovery

    ep = discovery.find("apex")
    if ep is None:
        pytest.skip("torchplug-apex is not installed")
    try:
        import apex  # noqa: F401
    except ImportError:
        nvidia_apex = False
    else:
        nvidia_apex = True
    if nvidia_apex and torch.cuda.is_available():
        pytest.skip("NVIDIA apex and CUDA are both here: a Trainer accepts apex")
    monkeypatch.delenv("TORCHPLUG_APEX_ALLOW_CPU", raising=False)
    item = next(s for s in listing.collect() if s.entry_point.name == "apex")
    listing.check(item)
    assert item.ok is False
    assert item.refused is not None
    assert item.refused.startswith(("ApexUnavailableError: ", "MisconfigurationError: "))
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in item.refused
    if not nvidia_apex:
        assert "NVIDIA apex is not installed" in item.refused
