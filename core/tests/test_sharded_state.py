"""The core's side of sharded checkpoints (``save_sharded_state``/``load_sharded_state``), with a
one-process strategy that keeps its state in a folder next to the checkpoint (real files): the
hook order, what the checkpoint file holds, a bit-identical resume, and the checks before any work.
The FSDP2 strategy's DCP shards on 2 ranks: plugins/fsdp_plugin/tests/test_sharded.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import Optimizer

import torchplug
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader
from torchplug.testing.recorder import HookRecorder


class FolderState(torchplug.Plugin):
    """Writes the model and optimizer state to ``<checkpoint>.state/`` instead of the file."""

    def save_sharded_state(self, model: nn.Module, optimizers: list[Optimizer],
                           checkpoint_path: str | None) -> dict[str, Any] | None:
        assert checkpoint_path is not None  # one process: rank 0
        folder = Path(f"{checkpoint_path}.state")
        folder.mkdir(exist_ok=True)
        torch.save({"model": model.state_dict(), "optim": [o.state_dict() for o in optimizers]}, folder / "all.pt")
        return {"folder": folder.name, "format": "torch.save", "plugin": "FolderState (tests)"}

    def load_sharded_state(self, model: nn.Module, optimizers: list[Optimizer], folder: str,
                           reference: dict[str, Any]) -> bool:
        assert reference["format"] == "torch.save"
        saved = torch.load(Path(folder) / "all.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        for optimizer, state in zip(optimizers, saved["optim"]):
            optimizer.load_state_dict(state)
        return True


def fit(make_trainer: Any, epochs: int, plugins: list[Any], ckpt_path: str | None = None,
        model: nn.Module | None = None) -> tuple[nn.Module, torchplug.Trainer]:
    model = model if model is not None else TinyMLP()
    trainer = make_trainer(max_epochs=epochs, logger=False, plugins=plugins)
    trainer.fit(model, tiny_loader(n=32, batch_size=8), ckpt_path=ckpt_path)
    return model, trainer


def test_sharded_state_is_saved_and_loaded_by_its_hooks_only(make_trainer: Any, tmp_path: Path) -> None:
    recorder = HookRecorder()
    _, first = fit(make_trainer, 1, [FolderState(), recorder])
    names = recorder.names()
    at = names.index("save_sharded_state")
    assert names[at:at + 3] == ["save_sharded_state", "collect_state", "on_save_checkpoint"]
    assert "get_state_dicts" not in names  # the state is in the folder: nothing is gathered for the file
    saved = torchplug.checkpoint.load(first.checkpoint_path)
    assert saved["state_dict"] == {}
    assert saved["optimizer_states"] == []
    assert saved["sharded_state"]["folder"] == "last.ckpt.state"
    assert saved["state_dict_shapes"] == {"net.0.weight": [16, 8], "net.0.bias": [16], "net.2.weight": [3, 16],
                                          "net.2.bias": [3]}
    assert (Path(first.checkpoint_path).parent / "last.ckpt.state" / "all.pt").is_file()

    recorder = HookRecorder()
    resumed, _ = fit(make_trainer, 2, [FolderState(), recorder], ckpt_path=first.checkpoint_path)
    assert recorder.counts()["load_sharded_state"] == 1
    assert recorder.counts()["load_state_dicts"] == 0
    names = recorder.names()
    assert names.index("load_sharded_state") < names.index("on_load_checkpoint")
    uninterrupted, _ = fit(make_trainer, 2, [])
    assert torch.equal(parameters_vector(resumed), parameters_vector(uninterrupted))


def test_sharded_checkpoints_are_checked_before_any_work(make_trainer: Any) -> None:
    _, first = fit(make_trainer, 1, [FolderState()])
    path = first.checkpoint_path
    with pytest.raises(torchplug.CheckpointError, match=r"does not match TinyMLP: shape mismatch net\.0\.weight"):
        fit(make_trainer, 2, [FolderState()], ckpt_path=path, model=TinyMLP(hidden=8))
    with pytest.raises(torchplug.CheckpointError, match="no plugin of this run reads sharded state"):
        fit(make_trainer, 2, [], ckpt_path=path)
    folder = Path(path).parent / "last.ckpt.state"
    folder.rename(folder.with_name("elsewhere"))
    with pytest.raises(torchplug.CheckpointError, match=f"sharded folder {folder} .*which does not exist"):
        fit(make_trainer, 2, [FolderState()], ckpt_path=path)
