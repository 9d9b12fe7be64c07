"""``torchplug new-plugin``: the packaged template, its renaming, and examples/plugin-template.

The slow end-to-end run (new-plugin, wheel, fresh venv without numpy, ``torchplug plugins``,
selection by name, the plugin's own conformance tests) is
``tests/test_template.py::test_new_plugin_to_an_installed_wheel_in_a_fresh_environment``: it
needs the core wheel that tests/conftest.py builds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchplug import cli, newplugin

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "plugin-template"
REGENERATE = "torchplug new-plugin input_noise --dir examples/plugin-template --force"
LEFTOVERS = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "build", "dist", ".venv")


def project_files(root: Path) -> dict[str, str]:
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part in LEFTOVERS or part.endswith(".egg-info") for part in relative.parts):
            files[relative.as_posix()] = path.read_text(encoding="utf-8")
    return files


def test_examples_plugin_template_is_the_rendered_template() -> None:
    """One source of truth: examples/plugin-template is the packaged template rendered for input_noise."""
    rendered = newplugin.render("input_noise")
    example = project_files(EXAMPLE)
    assert sorted(example) == sorted(rendered), f"file lists differ; regenerate with: {REGENERATE}"
    stale = [path for path in rendered if example[path] != rendered[path]]
    assert not stale, (f"examples/plugin-template differs from core/src/torchplug/templates/plugin in {stale}: "
                       f"edit the template (the source), then regenerate the example with: {REGENERATE}")


def test_names() -> None:
    names = newplugin.names_for("acme_scale2")
    assert names.mapping() == {"name": "acme_scale2", "dist": "torchplug-acme-scale2",
                               "module": "torchplug_acme_scale2", "Class": "AcmeScale2", "ENV": "TORCHPLUG_ACME_SCALE2"}
    assert newplugin.names_for("acme-scale") == newplugin.names_for("acme_scale")
    assert newplugin.names_for("torchplug_acme") == newplugin.names_for("acme")
    for bad in ("", "Acme", "2fast", "a__b", "with space", "class", "x.y", "acme_"):
        with pytest.raises(newplugin.TemplateError, match="lower-case letters"):
            newplugin.names_for(bad)
    with pytest.raises(newplugin.TemplateError, match="first-party plugin"):
        newplugin.names_for("ddp")


def test_every_name_is_renamed() -> None:
    """No placeholder and no spelling of the example's name survives in another plugin's project."""
    template = newplugin.template_files()
    placeholders = {key for path, text in template.items() for key in re.findall(r"\{\{(\w+)\}\}", path + text)}
    assert placeholders == {"name", "dist", "module", "Class", "ENV"}
    project = newplugin.render("acme_scale")
    assert "src/torchplug_acme_scale/plugin.py" in project
    assert "tests/test_acme_scale.py" in project
    for path, text in project.items():
        assert "{{" not in path + text, path
        for spelling in ("input_noise", "input-noise", "InputNoise", "INPUT_NOISE"):
            assert spelling not in path + text, (path, spelling)
    pyproject = project["pyproject.toml"]
    assert 'name = "torchplug-acme-scale"' in pyproject
    assert 'acme_scale = "torchplug_acme_scale:AcmeScalePlugin"' in pyproject
    assert "class AcmeScalePlugin(Plugin):" in project["src/torchplug_acme_scale/plugin.py"]
    assert 'plugin_name = "acme_scale"' in project["src/torchplug_acme_scale/plugin.py"]
    assert "class TestConformance(PluginContract):" in project["tests/test_acme_scale.py"]


def test_the_template_says_how_to_install_test_and_build() -> None:
    readme = newplugin.render("acme_scale")["README.md"]
    assert 'pip install --find-links /path/to/torchplug/dist -e ".[test]"' in readme
    assert "python -m build --wheel" in readme
    assert "torchplug_acme_scale-0.1.0-py3-none-any.whl" in readme
    # torch warns at import when numpy is absent; the template's warnings-as-errors must not choke on it
    assert '"ignore:Failed to initialize NumPy:UserWarning"' in newplugin.render("acme_scale")["pyproject.toml"]


def test_command_creates_the_project_and_refuses_to_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["new-plugin", "acme_scale"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Created torchplug-acme-scale/: distribution torchplug-acme-scale, entry point 'acme_scale'")
    assert project_files(tmp_path / "torchplug-acme-scale") == newplugin.render("acme_scale")
    assert cli.main(["new-plugin", "acme_scale"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    (tmp_path / "torchplug-acme-scale" / "NOTES.txt").write_text("mine")
    (tmp_path / "torchplug-acme-scale" / "README.md").write_text("changed")
    assert cli.main(["new-plugin", "acme_scale", "--force"]) == 0
    assert (tmp_path / "torchplug-acme-scale" / "NOTES.txt").read_text() == "mine"
    assert (tmp_path / "torchplug-acme-scale" / "README.md").read_text() == newplugin.render("acme_scale")["README.md"]
    assert cli.main(["new-plugin", "other", "--dir", str(tmp_path / "elsewhere" / "proj")]) == 0
    assert (tmp_path / "elsewhere" / "proj" / "src" / "torchplug_other" / "py.typed").is_file()
    assert cli.main(["new-plugin", "Bad Name"]) == 2
    assert "lower-case letters" in capsys.readouterr().err
