"""README.md runs as written.

* Every ```python block is saved as a script and run in a subprocess (``OMP_NUM_THREADS=1``,
  a timeout, a fresh working directory); a block that defines ``Test*`` classes runs under
  pytest, as it would in a plugin's tests. ```toml blocks parse.
* Every shell command in README (lines of ```bash blocks, and lines of indented code blocks
  that start with a command) is either run here (``RUN_HERE``) or mapped to the test, nox
  session or CI script that runs it (``RUN_BY``). A new command in README without an entry
  fails :func:`test_every_readme_command_is_run_by_a_test`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

from torchplug import discovery

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TEMPLATE_SRC = REPO / "examples" / "plugin-template" / "src"

#: The first word of a shell command (after VAR=value assignments).
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\S*/)?(pip|pip3|python|python3|torchrun|torchplug|nox|pytest|cd|git|"
                     r"bash|sh|export|uv|conda|make|run)\b")


@dataclass(frozen=True)
class Block:
    lang: str  # "python", "bash", "toml", ... ; "" for an indented block
    line: int  # where the block starts in README.md
    text: str


def blocks(text: str | None = None) -> list[Block]:
    """The fenced and indented code blocks of README.md (list-item fences dedented)."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    prev_blank = True
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if fence:
            indent, lang = len(fence.group(1)), fence.group(2)
            body = []
            i += 1
            while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
                body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
                i += 1
            found.append(Block(lang, i - len(body), "\n".join(body) + "\n"))
            i += 1
            prev_blank = False
            continue
        if prev_blank and line.startswith("    ") and line.strip():
            start = i
            body = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            found.append(Block("", start + 1, "\n".join(body).rstrip() + "\n"))
            prev_blank = True
            continue
        prev_blank = not line.strip()
        i += 1
    return found


def commands() -> list[tuple[int, str]]:
    """``(README line, command)`` for every shell command, its trailing comment removed."""
    found = []
    for block in blocks():
        if block.lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for offset, raw in enumerate(block.text.splitlines()):
            line = raw.strip().removeprefix("$ ")
            if not line or line.startswith("#"):
                continue
            command = re.sub(r"\s+#.*$", "", line)
            if COMMAND.match(command):
                found.append((block.line + offset, command))
            elif block.lang:
                raise AssertionError(f"README.md:{block.line + offset}: {line!r} in a ```{block.lang} block is not a "
                                     f"command this test knows; extend COMMAND in {__file__}")
    return found


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHPLUG_", "PYTEST_")) and k != "PYTHONPATH"}
    bin_dir = str(Path(sys.executable).parent)
    env.update(OMP_NUM_THREADS="1", PATH=bin_dir + os.pathsep + env.get("PATH", ""), **extra)
    return env


# --------------------------------------------------------------------------------------------
# Python and TOML blocks
# --------------------------------------------------------------------------------------------

PYTHON = [b for b in blocks() if b.lang == "python"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b.line}" for b in PYTHON])
def test_python_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    needs = {"torchplug_ddp": "ddp", "torchplug_native_amp": "native_amp"}
    if "devices=" in block.text and discovery.find("ddp") is None:
        pytest.skip("needs torchplug-ddp")
    if ("precision=" in block.text) and discovery.find("native_amp") is None:
        pytest.skip("needs torchplug-native-amp")
    for module, name in needs.items():
        if module in block.text and discovery.find(name) is None:
            pytest.skip(f"needs {module}")
    script = tmp_path / "readme_block.py"
    script.write_text(block.text, encoding="utf-8")
    env = _env()
    if "torchplug_input_noise" in block.text:
        env["PYTHONPATH"] = str(TEMPLATE_SRC)  # a snippet of the template's tests: its package is importable
    if re.search(r"^class Test\w*", block.text, re.MULTILINE):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, f"README.md:{block.line} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    if "print(trainer.callback_metrics" in block.text:
        value = float(proc.stdout.strip().splitlines()[-1])
        assert 0.0 <= value <= 1.0
        assert list((tmp_path / "torchplug_logs").glob("version_*/checkpoints/last.ckpt"))


def test_readme_has_the_python_blocks_this_test_runs() -> None:
    texts = [b.text for b in PYTHON]
    assert any("devices=2" in t and 'if __name__ == "__main__":' in t for t in texts)  # "Using it"
    assert any("class TestConformance(PluginContract)" in t for t in texts)


@pytest.mark.parametrize("block", [b for b in blocks() if b.lang == "toml"], ids=lambda b: f"README.md:{b.line}")
def test_toml_block_parses(block: Block) -> None:
    tomllib.loads(block.text)


# --------------------------------------------------------------------------------------------
# Shell commands
# --------------------------------------------------------------------------------------------

E2E = "tests/test_template.py::test_new_plugin_to_an_installed_wheel_in_a_fresh_environment"
BENCH = "core/tests/test_bench_smoke.py::test_run_py_writes_json_and_prints_the_table"

#: Commands this file runs itself (test_commands_run_here), exactly as README writes them.
RUN_HERE = {
    "torchplug plugins",
    "torchplug plugins --check",
    "torchplug plugins --requirements",
    "torchplug new-plugin my_plugin",
    "torchplug plan --precision bf16 --devices 2",
}

#: Every other README command, and what runs it: a test, a nox session or the CI script.
RUN_BY = {
    'pip install --find-links dist "torchplug[all]"': "noxfile.py::wheels",
    'pip install --find-links dist "torchplug[native-amp]"': "noxfile.py::check_apex_extra",  # the same, [apex]
    'pip install torch==2.13.0 -e "./core[demo]" -e plugins/ddp_plugin -e plugins/native_amp -e '
    "plugins/apex_plugin": ".ci/run",  # requirements-dev.txt holds these editable installs
    "python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && .venv/bin/torchplug demo":
        "noxfile.py::demo",
    "python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && .venv/bin/nox": ".ci/run",
    "torchplug demo --plugins ddp --devices 2 --precision bf16":
        "core/tests/test_cli_json.py::test_demo_json_on_two_processes_writes_only_json",  # 1 epoch there
    "torchplug fit mymodel:Classifier --max-epochs 3":
        "core/tests/test_demo.py::test_fit_trains_a_user_module_from_the_current_directory",
    "torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=host0:29400 train.py":
        "plugins/ddp_plugin/tests/test_ddp_plugin.py::test_torchrun_two_nodes_matches_devices_2",
    "cd torchplug-my-plugin": E2E,
    'pip install --find-links /path/to/torchplug/dist -e ".[test]"': E2E,  # there: the built wheel, [test]
    "pytest": E2E,
    "pip install build && python -m build --wheel": E2E,
    "python bench/loop_overhead.py --sizes tiny --reps 11": BENCH,
    "python bench/loop_overhead.py --sizes compute --reps 9": BENCH,
    "python bench/module_hooks_overhead.py --reps 101":
        "core/tests/test_bench_smoke.py::test_module_hooks_overhead_quick",
    "python bench/instructions.py --aa": "core/tests/test_bench_smoke.py::test_instruction_counts_are_exact",
    "python bench/amp_overhead.py --reps 7": BENCH,
    "python bench/ddp_no_sync.py --reps 9": BENCH,
    "python bench/sharded_step.py --reps 5": "core/tests/test_bench_smoke.py::test_sharded_step_quick",
    "python bench/discovery_import.py --reps 5": BENCH,
    "python bench/run.py": BENCH,
}


def test_every_readme_command_is_run_by_a_test() -> None:
    found = commands()
    unmapped = [f"README.md:{line}: {cmd}" for line, cmd in found if cmd not in RUN_HERE and cmd not in RUN_BY]
    assert not unmapped, ("README commands that no test runs; run them in a test and add them to RUN_HERE or "
                          "RUN_BY in core/tests/test_readme.py:\n  " + "\n  ".join(unmapped))
    listed = {cmd for _, cmd in found}
    stale = sorted((RUN_HERE | set(RUN_BY)) - listed)
    assert not stale, f"RUN_HERE/RUN_BY name commands README no longer has: {stale}"


def test_every_mapped_target_exists() -> None:
    missing = []
    for command, target in RUN_BY.items():
        path, _, name = target.partition("::")
        file = REPO / path
        if not file.is_file():
            missing.append(f"{command}: {path} does not exist")
        elif name and not re.search(rf"^def {re.escape(name)}\(", file.read_text(encoding="utf-8"), re.MULTILINE):
            missing.append(f"{command}: {target} does not exist")
    assert not missing, "\n".join(missing)


def test_commands_are_found_in_every_kind_of_block() -> None:
    sample = ("Text\n\n    pip install x   # comment\n    not a command\n\nmore\n\n```bash\ntorchplug plugins\n```\n\n"
              "1. item\n\n   ```python\n   print(1)\n   ```\n")
    kinds = [(b.lang, b.text) for b in blocks(sample)]
    assert kinds == [("", "pip install x   # comment\nnot a command\n"), ("bash", "torchplug plugins\n"),
                     ("python", "print(1)\n")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", sorted(RUN_HERE))
def test_commands_run_here(command: str, tmp_path: Path) -> None:
    proc = subprocess.run(shlex.split(command), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=110)
    assert "Traceback" not in proc.stderr, proc.stderr
    if command == "torchplug plugins --check":
        assert proc.returncode in (0, 1), proc.stderr  # 1: a plugin is refused on this machine (apex, say)
        refused = "REFUSED" in proc.stdout or "FAILED" in proc.stdout
        assert (proc.returncode == 1) == refused, proc.stdout
    else:
        assert proc.returncode == 0, proc.stderr
    if command == "torchplug plugins --requirements":
        assert proc.stdout.startswith("# torchplug plugins in ")
    if command.startswith("torchplug plan"):
        assert "ddp " in proc.stdout
        assert "selected by Trainer argument devices=2 (strategy shorthand)" in proc.stdout
        assert os.listdir(tmp_path) == []  # nothing ran
    if command.startswith("torchplug new-plugin"):
        project = tmp_path / "torchplug-my-plugin"
        assert (project / "src" / "torchplug_my_plugin" / "plugin.py").is_file()
        assert 'my_plugin = "torchplug_my_plugin:MyPluginPlugin"' in (project / "pyproject.toml").read_text()
