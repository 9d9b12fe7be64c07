"""The resolved plan (``trainer.plan``, ``torchplug plan``) and plan provenance in checkpoints.

Each row of README's "Plugin selection" table is asserted: the winner of each role, the plugins
that lost and why, and where each setting came from. The CLI's JSON is compared with the plan
of the Trainer built from the same options, in another process and working directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from plugin_projects.support import make_fake_dist

import torchplug
from torchplug import PlanChangedError, PlanChangedWarning, Plugin, Trainer
from torchplug import checkpoint as ckpt
from torchplug.plan import Alternative

torchplug_ddp = pytest.importorskip("torchplug_ddp")
pytest.importorskip("torchplug_native_amp")

NATIVE = ("torchplug-native-amp", importlib.metadata.version("torchplug-native-amp"))
DDP = ("torchplug-ddp", importlib.metadata.version("torchplug-ddp"))


def plan_of(**kwargs: Any) -> torchplug.plan.Plan:
    kwargs.setdefault("autoload_plugins", False)
    kwargs.setdefault("logger", False)
    return Trainer(**kwargs).plan


class MyDDP(torchplug_ddp.DDPPlugin):
    """DESIGN.md's custom DDP plugin."""


class MyClip(Plugin):
    def clip_gradients(self, grad_clip_val: float, optimizer: Any, norm_type: float) -> None:
        return None  # defers: the next implementation answers


# -- README's "Plugin selection" rows ------------------------------------------------------------


def test_row_trainer_defaults() -> None:
    plan = plan_of()
    assert [p.name for p in plan.plugins] == ["torchplug.defaults"]
    assert plan.plugins[0].origin == "built-in"
    assert plan.plugins[0].distribution == "torchplug"
    for role, why in (("precision", "no precision plugin: the built-in fp32"),
                      ("strategy", "no strategy plugin: one process")):
        assert (plan.role(role).winner, plan.role(role).why, plan.role(role).alternatives) == (
            "torchplug.defaults", why, ())
    assert plan.owner("clip_gradients") == plan.owner("launch") == "torchplug.defaults"
    assert plan.hook("clip_gradients").duty == "clip"
    assert (plan.setting("precision").value, plan.setting("precision").source) == ("32", "default")
    assert plan.setting("logger").source == "Trainer argument"
    assert plan.setting("autoload (resolved)").value is False
    assert plan.setting("autoload (resolved)").source == "Trainer argument"


@pytest.mark.parametrize("precision", [16, "bf16"])
def test_row_precision_picks_native_amp(precision: Any) -> None:
    plan = plan_of(precision=precision)
    amp = plan.plugin("native_amp")
    assert (amp.distribution, amp.version) == NATIVE
    assert amp.origin == "entry point torchplug_native_amp:NativeAMPPlugin"
    assert amp.role == "precision"
    assert amp.selected_by == f"Trainer argument precision={precision!r} (precision shorthand)"
    assert plan.role("precision").winner == "native_amp"
    assert plan.role("strategy").winner == "torchplug.defaults"
    # firstresult order: native_amp answers, the built-in fp32 default only if it deferred
    for hook in ("forward_context", "backward", "clip_gradients", "optimizer_step", "connect_precision"):
        assert plan.hook(hook).calls == ("native_amp", "torchplug.defaults"), hook
    assert plan.setting("precision").source == "Trainer argument"


def test_row_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    apex = pytest.importorskip("torchplug_apex")
    # On a machine without CUDA (CI) apex refuses the Trainer in check_configuration, after the
    # plan is built; that refusal is tested in plugins/apex_plugin. Here: the plan.
    monkeypatch.setattr(apex.ApexPlugin, "check_configuration", lambda self, trainer: None)
    plan = plan_of(precision=16, amp_backend="apex", amp_level="O2")
    assert plan.role("precision").winner == "apex"
    assert plan.plugin("apex").selected_by == "Trainer argument precision=16, amp_backend='apex' (precision shorthand)"
    assert plan.plugin("apex").distribution == "torchplug-apex"
    assert "native_amp" not in [p.name for p in plan.plugins]
    assert plan.owner("clip_gradients") == "apex"
    assert (plan.setting("amp_level").value, plan.setting("amp_level").source) == ("O2", "Trainer argument")


@pytest.mark.parametrize(("kwargs", "via"), [
    ({"accelerator": "ddp"}, "accelerator='ddp'"),
    ({"strategy": "ddp"}, "strategy='ddp'"),
    ({"devices": 2}, "devices=2"),
    ({"num_nodes": 2}, "num_nodes=2"),
], ids=["accelerator", "strategy", "devices", "num_nodes"])
def test_row_ddp(kwargs: dict[str, Any], via: str) -> None:
    plan = plan_of(accelerator="cpu", **kwargs) if "accelerator" not in kwargs else plan_of(**kwargs)
    ddp = plan.plugin("ddp")
    assert (ddp.distribution, ddp.version, ddp.role) == (*DDP, "strategy")
    assert ddp.selected_by == f"Trainer argument {via} (strategy shorthand)"
    assert plan.role("strategy").winner == "ddp"
    assert plan.owner("configure_ddp") == plan.owner("all_gather_object") == "ddp"
    if "accelerator" in kwargs:  # Lightning 1.1's spelling of the strategy
        assert plan.setting("strategy").source == "Trainer argument accelerator='ddp'"


def test_row_plugin_by_name_and_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_of(plugins=["native_amp"])
    assert plan.plugin("native_amp").selected_by == "Trainer argument plugins="
    assert plan.plugin("native_amp").origin == "entry point torchplug_native_amp:NativeAMPPlugin"
    assert plan.setting("plugins").value == ["native_amp"]

    monkeypatch.setenv("TORCHPLUG_PLUGINS", "native_amp")
    plan = plan_of()
    assert plan.plugin("native_amp").selected_by == "environment variable TORCHPLUG_PLUGINS"
    setting = plan.setting("TORCHPLUG_PLUGINS")
    assert (setting.value, setting.source) == ("native_amp", "environment variable")
    # selected twice: registered once, at its first position; the second selection lost
    plan = plan_of(plugins=["native_amp"])
    assert [p.name for p in plan.plugins] == ["torchplug.defaults", "native_amp"]
    assert plan.skipped == (Alternative("native_amp", "duplicate selection: registered once, at its first position",
                                        "Trainer argument plugins=", *NATIVE),)


def test_row_passed_object_and_module() -> None:
    plan = plan_of(plugins=[MyDDP()])
    mine = plan.plugin("MyDDP")
    assert (mine.origin, mine.object, mine.role) == ("passed object", f"{__name__}.MyDDP", "strategy")
    assert mine.distribution is None  # defined in this test module, not by an installed distribution
    assert plan.role("strategy").why == "passed object, selected by Trainer argument plugins="
    assert plan.setting("plugins").value == ["MyDDP object"]

    plan = plan_of(plugins=[torchplug_ddp.DDPPlugin()])  # a first-party class passed as an object
    assert (plan.plugin("DDPPlugin").origin, plan.plugin("DDPPlugin").distribution) == ("passed object", DDP[0])

    module = types.ModuleType("my_policy")
    exec("from torchplug import hookimpl\n@hookimpl\ndef on_fit_start(trainer):\n    pass\n", module.__dict__)
    plan = plan_of(plugins=[module])
    assert (plan.plugin("my_policy").origin, plan.plugin("my_policy").object) == ("passed module", "my_policy")
    assert plan.hook("on_fit_start").calls == ("my_policy",)
    assert plan.hook("on_fit_start").duty == "events (loggers, callbacks)"


def test_row_passed_object_fills_the_role_the_shorthand_would_default() -> None:
    plan = plan_of(accelerator="ddp", plugins=[MyDDP()])
    assert [p.name for p in plan.plugins] == ["torchplug.defaults", "MyDDP"]
    strategy = plan.role("strategy")
    assert strategy.winner == "MyDDP"
    assert strategy.alternatives == (Alternative(
        "ddp", "role strategy filled by 'MyDDP' (selected by plugins=)",
        "Trainer argument accelerator='ddp' (strategy shorthand)"),)
    assert plan.skipped == strategy.alternatives


def test_firstresult_order_of_several_implementations() -> None:
    plan = plan_of(precision=16, plugins=[MyClip()])
    # registered last, asked first: the user's plugin, then the precision plugin, then the default
    assert plan.hook("clip_gradients").calls == ("MyClip", "native_amp", "torchplug.defaults")
    assert plan.owner("clip_gradients") == "MyClip"
    assert "MyClip, native_amp, torchplug.defaults" in plan.table()


def test_autoload_loaded_blocked_and_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_dist(tmp_path, "org-policy", "3.1", {"torchplug.autoload": {"org_policy": "org_policy_mod"}},
                   modules={"org_policy_mod": "from torchplug import hookimpl\n\n@hookimpl\n"
                                               "def on_fit_start(trainer):\n    pass\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = plan_of(autoload_plugins=True)
    policy = plan.plugin("org_policy")
    assert (policy.distribution, policy.version, policy.selected_by) == ("org-policy", "3.1", "entry-point autoload")
    assert plan.setting("autoload (resolved)").value is True

    monkeypatch.setenv("TORCHPLUG_BLOCK_PLUGINS", "org_policy")
    plan = plan_of(autoload_plugins=True)
    assert "org_policy" not in [p.name for p in plan.plugins]
    assert plan.skipped == (Alternative("org_policy", "blocked (TORCHPLUG_BLOCK_PLUGINS)", "entry-point autoload",
                                        "org-policy", "3.1"),)
    assert plan.setting("TORCHPLUG_BLOCK_PLUGINS").source == "environment variable"
    monkeypatch.delenv("TORCHPLUG_BLOCK_PLUGINS")

    plan = plan_of(autoload_plugins=False)
    assert plan.skipped == (Alternative("org_policy", "autoload disabled (autoload_plugins=False)",
                                        "entry-point autoload", "org-policy", "3.1"),)
    monkeypatch.setenv("TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD", "1")
    plan = plan_of(autoload_plugins=None)
    assert plan.skipped[0].reason == "autoload disabled (TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1)"
    resolved = plan.setting("autoload (resolved)")
    assert (resolved.value, resolved.source) == (False, "environment variable")


# -- determinism, JSON and the CLI ---------------------------------------------------------------


def test_plan_is_deterministic_and_the_fingerprint_covers_what_ranks_must_share(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = plan_of(precision="bf16", plugins=[MyClip()], default_root_dir=tmp_path / "a")
    b = plan_of(precision="bf16", plugins=[MyClip()], default_root_dir=tmp_path / "b", enable_progress_bar=False)
    assert a.to_dict()["hooks"] == b.to_dict()["hooks"]
    assert a.plugins == b.plugins
    assert a.fingerprint == b.fingerprint  # paths and the progress bar are not part of it
    assert a.fingerprint != plan_of(precision=16, plugins=[MyClip()]).fingerprint
    assert a.fingerprint != plan_of(precision="bf16").fingerprint
    # how a plugin was selected is not part of it: by the argument or by the environment
    by_argument = plan_of(plugins=["native_amp"])
    monkeypatch.setenv("TORCHPLUG_PLUGINS", "native_amp")
    by_environment = plan_of()
    assert by_argument.plugin("native_amp").selected_by != by_environment.plugin("native_amp").selected_by
    assert by_argument.fingerprint == by_environment.fingerprint
    text = json.dumps(a.to_dict())
    assert "0x" not in text
    assert str(tmp_path) not in text


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHPLUG_") and k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torchplug", "plan", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.mark.timeout(120)
def test_plan_json_on_the_command_line_equals_trainer_plan(tmp_path: Path) -> None:
    from torchplug import cli, plancli

    argv = ["--json", "--precision", "bf16", "--accumulate", "2", "--gradient-clip-val", "0.5", "--plugins", "ddp"]
    proc = _cli(*argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1  # stdout holds the JSON alone
    printed = json.loads(proc.stdout)
    args = cli.build_parser().parse_args(["plan", *argv])
    trainer = Trainer(**plancli.trainer_arguments(args))
    assert printed == trainer.plan.to_dict()
    assert printed["fingerprint"] == trainer.plan.fingerprint
    assert [p["name"] for p in printed["plugins"]] == ["torchplug.defaults", "native_amp", "ddp"]
    assert os.listdir(tmp_path) == []  # nothing ran, nothing was written

    table = _cli("--precision", "16", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "native_amp" in table.stdout
    assert "selected by Trainer argument precision='16'" in table.stdout
    refused = _cli("--json", "--plugins", "no_such_plugin", cwd=tmp_path)
    assert refused.returncode == 2
    assert json.loads(refused.stdout)["error_type"] == "PluginNotFoundError"


# -- provenance: the plan in checkpoints, and resume -----------------------------------------------


@pytest.mark.timeout(120)
def test_resume_across_a_precision_change_warns_by_default_and_fails_under_strict(make_trainer: Any, tp: Any,
                                                                                   tmp_path: Path) -> None:
    first = make_trainer(max_steps=2, logger=False)
    first.fit(tp.fresh_net(), tp.loader(n=32))
    saved = ckpt.load(first.checkpoint_path)
    assert saved["plan"] == first.plan.to_dict()  # read back from the file
    assert saved["world_size"] == 1

    # the same plan: no warning (warnings are errors in this suite)
    make_trainer(max_steps=3, logger=False, enable_checkpointing=False).fit(
        tp.fresh_net(), tp.loader(n=32), ckpt_path=first.checkpoint_path)

    before = tp.files_under(tmp_path)
    strict = make_trainer(max_steps=3, precision="bf16", resume_plan="strict", logger=False)
    with pytest.raises(PlanChangedError) as info:
        strict.fit(tp.fresh_net(), tp.loader(n=32), ckpt_path=first.checkpoint_path)
    message = str(info.value)
    assert "setting precision: 32 -> bf16 [numerics]" in message
    assert "precision role: torchplug.defaults -> native_amp [numerics]" in message
    assert "plugin 'native_amp': (none) -> torchplug-native-amp" in message
    assert "resume_plan='strict'" in message
    assert tp.files_under(tmp_path) == before  # refused before any work

    resumed = make_trainer(max_steps=3, precision="bf16", logger=False)
    with pytest.warns(PlanChangedWarning, match=r"setting precision: 32 -> bf16 \[numerics\]") as caught:
        resumed.fit(tp.fresh_net(), tp.loader(n=32), ckpt_path=first.checkpoint_path)
    assert "resume_plan='strict'" in str(caught[0].message)
    assert resumed.global_step == 3
    # a change that leaves the numerics alone (an event plugin) only warns, even under strict
    with pytest.warns(PlanChangedWarning, match="plugin 'MyClip'"):
        make_trainer(max_steps=3, plugins=[MyClip()], resume_plan="strict", logger=False).fit(
            tp.fresh_net(), tp.loader(n=32), ckpt_path=first.checkpoint_path)


def test_a_checkpoint_without_a_plan_is_noted_not_refused(make_trainer: Any, tp: Any, tmp_path: Path) -> None:
    first = make_trainer(max_steps=1, logger=False)
    first.fit(tp.fresh_net(), tp.loader(n=16))
    old = ckpt.load(first.checkpoint_path)
    del old["plan"], old["world_size"]
    ckpt.save(old, tmp_path / "old.ckpt")
    trainer = make_trainer(max_steps=2, logger=False, enable_checkpointing=False, resume_plan="strict")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(tp.fresh_net(), tp.loader(n=16), ckpt_path=tmp_path / "old.ckpt")
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'old.ckpt'} holds no plan (written by torchplug {torchplug.__version__}, before checkpoints "
        "recorded one): the plugins that wrote it cannot be compared with this run's."]
    assert trainer.global_step == 2
    assert isinstance(torch.load(first.checkpoint_path, weights_only=True)["plan"], dict)
