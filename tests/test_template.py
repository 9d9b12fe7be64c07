"""examples/plugin-template is a working third-party plugin project, and hookimpls in a user
package outside this repository change training once installed and selected by name.

Both are built as wheels and installed into a fresh venv that shares only torch, pytest and the
core's dependencies with this interpreter (no resolution, no index), next to the torchplug wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from installtools import REPO, build_wheel, copy_project

from torchplug.testing import venv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TEMPLATE = REPO / "examples" / "plugin-template"
SHARED = ("torch", "numpy", "pluggy", "packaging", "tqdm", "pytest")

USER_PROJECT = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=77"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "acme-freeze-bias"
        version = "1.0"
        dependencies = ["torchplug>=0.1,<0.2"]

        [project.entry-points."torchplug.plugins"]
        freeze_bias = "acme_freeze_bias.hooks"

        [tool.setuptools]
        packages = ["acme_freeze_bias"]
    """,
    # A module plugin: plain functions with @hookimpl, no class.
    "acme_freeze_bias/__init__.py": "",
    "acme_freeze_bias/hooks.py": '''
        """Org policy: biases are never trained (their gradients are dropped before each step)."""
        from torchplug import hookimpl


        @hookimpl
        def on_before_optimizer_step(optimizer):
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.ndim == 1:
                        param.grad = None
    ''',
}

TRAIN_SCRIPT = """
import json, os, sys
import torch
import torchplug
from torchplug import Trainer
from torchplug.testing.models import TinyMLP, tiny_loader, parameters_vector

results = {}
for name, run in json.loads(sys.argv[1]).items():
    os.environ.update(run["env"])
    module = TinyMLP()
    before = {key: p.detach().clone() for key, p in module.named_parameters()}
    trainer = Trainer(plugins=run["plugins"], max_epochs=2, enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, autoload_plugins=False)
    trainer.fit(module, tiny_loader())
    for key in run["env"]:
        del os.environ[key]
    results[name] = {"changed": {key: not torch.equal(before[key], p) for key, p in module.named_parameters()},
                     "plugins": trainer.plugin_names, "params": parameters_vector(module).tolist()}
print(json.dumps({"torchplug": torchplug.__file__, "runs": results}))
"""

RUNS = {
    "plain": {"plugins": [], "env": {}},
    "freeze_bias by argument": {"plugins": ["freeze_bias"], "env": {}},
    "freeze_bias by TORCHPLUG_PLUGINS": {"plugins": [], "env": {"TORCHPLUG_PLUGINS": "freeze_bias"}},
    "input_noise by argument": {"plugins": ["input_noise"], "env": {"TORCHPLUG_INPUT_NOISE_STD": "0.5"}},
}


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory, core_wheel: Path) -> dict[str, Path]:
    """A fresh venv with the torchplug, template and user-package wheels installed."""
    root = tmp_path_factory.mktemp("template")
    wheels = root / "wheels"
    wheels.mkdir()
    template_wheel = build_wheel(TEMPLATE, wheels)
    user = root / "acme-freeze-bias"
    for name, text in USER_PROJECT.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    user_wheel = build_wheel(user, wheels)
    python = venv.create(root / "env", share=SHARED)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(core_wheel), str(template_wheel), str(user_wheel)], check=True, capture_output=True)
    return {"python": python, "root": root, "site": venv.venv_paths(python)[1]}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHPLUG_", "PYTEST_", "PYTHONPATH"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def trained(fresh_env: dict[str, Path]) -> dict[str, dict[str, object]]:
    """RUNS, each a fit of TinyMLP in the fresh venv (one process for all)."""
    proc = subprocess.run([str(fresh_env["python"]), "-c", TRAIN_SCRIPT, json.dumps(RUNS)], env=_env(),
                          cwd=fresh_env["root"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["torchplug"]).is_relative_to(fresh_env["site"]), result["torchplug"]
    return result["runs"]  # type: ignore[no-any-return]


def test_template_tests_pass_in_a_fresh_environment(fresh_env: dict[str, Path]) -> None:
    project = copy_project(TEMPLATE, fresh_env["root"] / "template-src")
    # The installed wheel, not the copy's src/, must be what the tests import.
    proc = subprocess.run(
        [str(fresh_env["python"]), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x"],
        cwd=project, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-3000:]
    assert " failed" not in proc.stdout, proc.stdout[-3000:]
    where = subprocess.run([str(fresh_env["python"]), "-c", "import torchplug_input_noise as m; print(m.__file__)"],
                           cwd=project, env=_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(fresh_env["site"]), where


def test_user_package_changes_training_when_selected_by_name(trained: dict[str, dict[str, Any]]) -> None:
    plain = trained["plain"]
    assert plain["plugins"] == []
    assert all(plain["changed"].values())
    frozen = {"net.0.weight": True, "net.0.bias": False, "net.2.weight": True, "net.2.bias": False}
    for name in ("freeze_bias by argument", "freeze_bias by TORCHPLUG_PLUGINS"):
        assert trained[name]["plugins"] == ["freeze_bias"], name
        assert trained[name]["changed"] == frozen, name
    assert trained["freeze_bias by argument"]["params"] == trained["freeze_bias by TORCHPLUG_PLUGINS"]["params"]


def test_template_plugin_changes_training_when_selected_by_name(trained: dict[str, dict[str, Any]]) -> None:
    noisy = trained["input_noise by argument"]
    assert noisy["plugins"] == ["input_noise"]
    assert noisy["params"] != trained["plain"]["params"]
