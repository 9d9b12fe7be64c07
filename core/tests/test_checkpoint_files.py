"""Checkpoint files: atomic writes (a failure or a SIGKILL mid-write leaves the previous file
intact), weights_only loading, and clear errors for corrupt, truncated or foreign files."""

from __future__ import annotations

import fractions
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from torchplug import CheckpointError, Trainer
from torchplug import checkpoint as ckpt


@pytest.fixture
def good_checkpoint(tp: Any, make_trainer: Any) -> tuple[Path, Trainer]:
    trainer = make_trainer(max_epochs=1, logger=False)
    trainer.fit(tp.fresh_net(), tp.loader())
    assert trainer.checkpoint_path is not None
    return Path(trainer.checkpoint_path), trainer


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{ckpt.TMP_SUFFIX}"))


# -- atomic writes ---------------------------------------------------------------------------

def test_failed_write_leaves_previous_checkpoint_intact(good_checkpoint: Any, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    path, trainer = good_checkpoint
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ckpt.load(path)["global_step"] == 7
    assert _temporaries(path.parent) == []


def test_failure_while_checkpointing_during_fit_keeps_last_good_one(tp: Any, make_trainer: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    calls = []

    def fail_second(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(obj["global_step"])
        if len(calls) == 2:
            f.write(b"PK\x03\x04 partial")
            raise OSError(5, "Input/output error")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_second)
    trainer = make_trainer(max_epochs=3, logger=False)
    with pytest.raises(OSError, match="Input/output error"):
        trainer.fit(tp.fresh_net(), tp.loader())
    monkeypatch.undo()
    (folder,) = (Path(trainer.default_root_dir) / "torchplug_logs").iterdir()
    last = folder / "checkpoints" / "last.ckpt"
    assert ckpt.load(last)["global_step"] == 7  # epoch 0's checkpoint; epoch 1's write failed
    assert _temporaries(last.parent) == []


SAVER = textwrap.dedent("""
    import sys, torch
    from torchplug import checkpoint as ckpt
    big = torch.arange(24_000_000, dtype=torch.float32)  # 96 MB: each write takes a while
    step = 0
    while True:
        step += 1
        ckpt.save({"torchplug_checkpoint": 1, "state_dict": {"w": big}, "optimizer_states": [],
                   "global_step": step, "epoch": 0}, sys.argv[1])
""")


@pytest.mark.timeout(120)
def test_sigkill_mid_write_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    ckpt.save({"torchplug_checkpoint": 1, "state_dict": {"w": torch.zeros(3)}, "optimizer_states": [],
               "global_step": 0, "epoch": 0}, path)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # kill while a temporary is being written
            if any(t.stat().st_size > 1_000_000 for t in _temporaries(tmp_path) if t.exists()):
                break
            assert proc.poll() is None, "the saver died on its own"
            time.sleep(0.002)
        else:
            pytest.fail("the saver never started writing")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    data = ckpt.load(path)  # the previous or a complete newer checkpoint, never a torn one
    w = data["state_dict"]["w"]
    assert (data["global_step"] == 0 and w.numel() == 3) or torch.equal(w, torch.arange(24_000_000.0))
    stale = _temporaries(tmp_path)
    assert stale, "the kill should have left the writer's temporary behind"
    # The next save removes temporaries of writers that no longer exist.
    ckpt.save(data, path)
    assert _temporaries(tmp_path) == []


def test_checkpoint_file_gets_normal_permissions(tmp_path: Path) -> None:
    path = ckpt.save({"torchplug_checkpoint": 1, "state_dict": {}, "optimizer_states": [], "global_step": 0,
                      "epoch": 0}, tmp_path / "sub" / "x.ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- weights_only ----------------------------------------------------------------------------

class RunsCode:
    """Unpickling this runs a shell command: what weights_only=True exists to refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tp: Any, good_checkpoint: Any, make_trainer: Any,
                                                 tmp_path: Path) -> None:
    path, _ = good_checkpoint
    data = ckpt.load(path)
    marker = tmp_path / "code-ran"
    data["evil"] = RunsCode(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(data, evil)
    root = tmp_path / "resume"
    with pytest.raises(CheckpointError, match=r"checkpoint_weights_only=False") as info:
        make_trainer(default_root_dir=root).fit(tp.fresh_net(), tp.loader(), ckpt_path=evil)
    assert "system" in str(info.value)
    assert not marker.exists()
    assert not root.exists()  # refused before any work


def test_weights_only_false_loads_a_trusted_checkpoint(tp: Any, good_checkpoint: Any, make_trainer: Any,
                                                       tmp_path: Path) -> None:
    path, _ = good_checkpoint
    data = ckpt.load(path)
    data["note"] = fractions.Fraction(1, 3)  # an arbitrary pickled object
    trusted = tmp_path / "trusted.ckpt"
    torch.save(data, trusted)
    with pytest.raises(CheckpointError, match="weights_only"):
        make_trainer(max_epochs=2).fit(tp.fresh_net(), tp.loader(), ckpt_path=trusted)
    trainer = make_trainer(max_epochs=2, checkpoint_weights_only=False)
    trainer.fit(tp.fresh_net(), tp.loader(), ckpt_path=trusted)
    assert trainer.global_step == 14


# -- corrupt, truncated, foreign -------------------------------------------------------------

def _corrupt(kind: str, good: bytes, path: Path, tp: Any) -> None:
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "truncated-tail":
        path.write_bytes(good[:-10])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "bit-flip":  # a damaged tensor record: only its CRC tells
        import zipfile

        with zipfile.ZipFile(path) as archive:
            info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64)
        data = bytearray(good)
        # the local header's name and extra-field lengths (torch pads the extra field to align data)
        name_len, extra_len = struct.unpack("<HH", good[info.header_offset + 26: info.header_offset + 30])
        offset = info.header_offset + 30 + name_len + extra_len + 8
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "not-a-dict":
        torch.save(torch.zeros(3), path)
    elif kind == "missing-keys":
        torch.save({"state_dict": {}}, path)
    elif kind == "other-model":
        other = tp.Net()
        other.net[0] = torch.nn.Linear(tp.IN, 5)
        data = ckpt.load(path)
        data["state_dict"] = other.state_dict()
        torch.save(data, path)
    elif kind == "newer-format":
        data = ckpt.load(path)
        data["torchplug_checkpoint"] = 99
        torch.save(data, path)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(("kind", "message"), [
    ("truncated", "corrupt or truncated"),
    ("truncated-tail", "corrupt or truncated"),
    ("empty", "corrupt or truncated"),
    ("garbage", "corrupt or truncated"),
    ("text", "corrupt or truncated"),
    ("bit-flip", "CRC"),
    ("not-a-dict", "not a torchplug checkpoint"),
    ("missing-keys", "not a torchplug checkpoint"),
    ("other-model", r"does not match Net: .*shape mismatch net\.0\.weight"),
    ("newer-format", "newer than this torchplug"),
])
def test_bad_checkpoint_fails_before_work_and_stays_untouched(tp: Any, good_checkpoint: Any, make_trainer: Any,
                                                              tmp_path: Path, kind: str, message: str) -> None:
    path, _ = good_checkpoint
    good = path.read_bytes()
    _corrupt(kind, good, path, tp)
    damaged = path.read_bytes()
    folder_before = sorted(p.name for p in path.parent.iterdir())
    root = tmp_path / "resume"
    model = tp.fresh_net()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        make_trainer(default_root_dir=root, max_epochs=2).fit(model, tp.loader(), ckpt_path=path)
    assert not root.exists()  # nothing written
    assert path.read_bytes() == damaged  # nothing "repaired" or overwritten
    assert sorted(p.name for p in path.parent.iterdir()) == folder_before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_missing_checkpoint_path(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        make_trainer().fit(tp.fresh_net(), tp.loader(), ckpt_path=tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="not a file"):
        make_trainer().fit(tp.fresh_net(), tp.loader(), ckpt_path=tmp_path)


# -- save_checkpoint ---------------------------------------------------------------------------

def test_save_checkpoint_after_fit_and_resume_from_it(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="call fit first"):
        make_trainer().save_checkpoint(tmp_path / "early.ckpt")
    trainer = make_trainer(max_steps=5, logger=False, enable_checkpointing=False)
    model = tp.fresh_net()
    trainer.fit(model, tp.loader())
    assert trainer.checkpoint_path is None  # checkpointing off: no automatic file
    manual = tmp_path / "manual" / "step5.ckpt"
    trainer.save_checkpoint(manual)
    data = ckpt.load(manual)
    assert (data["global_step"], data["epoch"], data["batch_in_epoch"]) == (5, 0, 5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in data["state_dict"].items())
    resumed = make_trainer(max_steps=7, logger=False, enable_checkpointing=False)
    resumed.fit(tp.fresh_net(), tp.loader(), ckpt_path=manual)
    assert (resumed.global_step, resumed.current_epoch) == (7, 1)
