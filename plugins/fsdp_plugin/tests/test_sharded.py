"""FSDPPlugin(checkpoint="sharded") on 2 real gloo ranks, fp32, CPU: every rank writes its shards
with torch.distributed.checkpoint next to last.ckpt; a 2-rank checkpoint resumes in one process
and a one-process one on 2 ranks, both continuing to an uninterrupted run's weights; a missing
or foreign shard folder is refused naming it. The 2-rank run also checks that clip_gradients
returns the global gradient norm and clips like one process.

Two spawned 2-rank fits (a module fixture) serve every check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_support import ClipProbe
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torchplug_fsdp import FSDPPlugin

from torchplug import CheckpointError, Plugin, PluginHookError, Trainer
from torchplug.callbacks import ModelCheckpoint
from torchplug.errors import PlanChangedWarning
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader

N, MICRO, CLIP = 64, 4, 0.1  # 64 samples: 8 micro-batches of 4 per rank, 8 of 8 in one process


def quiet(root: Path, **kwargs: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                            "enable_checkpointing": True, "default_root_dir": str(root), "max_epochs": 1,
                            "autoload_plugins": False, "gradient_clip_val": CLIP}
    base.update(kwargs)
    return base


def one_process(root: Path, epochs: int, accumulate: int, ckpt_path: str | None = None,
                plugins: list[Any] | None = None, model: TinyMLP | None = None) -> tuple[TinyMLP, Trainer]:
    """One process on the concatenated batches; with FSDPPlugin(checkpoint="sharded") its checkpoints are DCP."""
    model = model if model is not None else TinyMLP()
    trainer = Trainer(**quiet(root, max_epochs=epochs, accumulate_grad_batches=accumulate, plugins=plugins or []))
    trainer.fit(model, tiny_loader(n=N, batch_size=2 * MICRO), ckpt_path=ckpt_path)
    return model, trainer


def sharded() -> FSDPPlugin:
    return FSDPPlugin(timeout=60, checkpoint="sharded")


def folder_of(ckpt_path: str | None) -> Path:
    assert ckpt_path is not None
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    return Path(ckpt_path).parent / saved["sharded_state"]["folder"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sharded")
    # A: 2 ranks, accumulation 2, 1 epoch, sharded checkpoints; clip_gradients observed.
    two = TinyMLP()
    trainer_a = Trainer(**quiet(out / "a", devices=2, accumulate_grad_batches=2,
                                plugins=[sharded(), ClipProbe(str(out))]))
    trainer_a.fit(two, tiny_loader(n=N, batch_size=MICRO))
    # B: a one-process sharded checkpoint (epoch 1) resumed on 2 ranks for epoch 2.
    _, one = one_process(out / "b1", epochs=1, accumulate=1, plugins=[sharded()])
    resumed = TinyMLP()
    # (the same plan: the world size change is warned about in the spawned rank 0)
    Trainer(**quiet(out / "b2", devices=2, max_epochs=2, plugins=[sharded()])).fit(
        resumed, tiny_loader(n=N, batch_size=MICRO), ckpt_path=one.checkpoint_path)
    clips = [json.loads(p.read_text()) for p in sorted(out.glob("clip-rank*.json"))]
    return {"two": two, "trainer_a": trainer_a, "one": one, "resumed": resumed, "clips": clips}


@pytest.mark.timeout(240)
def test_every_rank_writes_its_shards_and_the_file_keeps_the_run_state(runs: dict[str, Any]) -> None:
    path = runs["trainer_a"].checkpoint_path
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["state_dict"] == {}
    assert saved["optimizer_states"] == []
    assert saved["state_dict_shapes"] == {k: list(v.shape) for k, v in TinyMLP().state_dict().items()}
    assert saved["global_step"] == N // (2 * MICRO) // 2
    assert saved["world_size"] == 2
    assert saved["sharded_state"]["format"] == "torch.distributed.checkpoint"
    folder = folder_of(path)
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (folder / ".metadata").is_file()
    # two folders at most per checkpoint file: the one it names and the one before
    assert len(list(folder.parent.glob("last.ckpt.*.dcp"))) <= 2


@pytest.mark.timeout(240)
def test_two_rank_shards_resume_in_one_process_like_an_uninterrupted_run(runs: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    path = runs["trainer_a"].checkpoint_path
    reference, _ = one_process(tmp_path / "ref", epochs=1, accumulate=2)
    two = parameters_vector(runs["two"])  # the weights handed back: gathered after the sharded checkpoint
    assert float((two - parameters_vector(reference)).abs().max()) < 1e-5
    # a full-state export of the shards loads into a plain module
    dcp_to_torch_save(folder_of(path), tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", map_location="cpu", weights_only=True)
    plain = TinyMLP(seed=1)
    plain.load_state_dict(full["model"])
    assert torch.equal(parameters_vector(plain), two)
    with pytest.warns(PlanChangedWarning):  # 2 ranks -> 1 process
        continued, _ = one_process(tmp_path / "continued", epochs=2, accumulate=2, ckpt_path=path,
                                   plugins=[sharded()])
    uninterrupted, _ = one_process(tmp_path / "uninterrupted", epochs=2, accumulate=2)
    assert float((parameters_vector(continued) - parameters_vector(uninterrupted)).abs().max()) < 1e-5


@pytest.mark.timeout(240)
def test_one_process_shards_resume_on_two_ranks_like_an_uninterrupted_run(runs: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    assert sorted(p.name for p in folder_of(runs["one"].checkpoint_path).glob("*.distcp")) == ["__0_0.distcp"]
    uninterrupted, _ = one_process(tmp_path, epochs=2, accumulate=1)
    diff = float((parameters_vector(runs["resumed"]) - parameters_vector(uninterrupted)).abs().max())
    assert diff < 1e-5


@pytest.mark.timeout(240)
def test_clip_gradients_returns_the_global_norm_and_clips_like_one_process(runs: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    probe = ClipProbe(str(tmp_path))
    one_process(tmp_path / "ref", epochs=1, accumulate=2, plugins=[probe])
    reference = probe.windows
    assert len(runs["clips"]) == 2
    for windows in runs["clips"]:  # both ranks answer the same, global, norm
        assert len(windows) == len(reference) == N // (2 * MICRO) // 2
        assert all(w["norm"] > CLIP for w in reference)  # clipping bites in every window
        first, ref = windows[0], reference[0]  # the same weights: one process's numbers to 1e-6
        assert abs(first["norm"] - ref["norm"]) < 1e-6
        for name, grad in ref["grads"].items():
            assert float((torch.tensor(first["grads"][name]) - torch.tensor(grad)).abs().max()) < 1e-6
        assert all(abs(w["norm"] - r["norm"]) < 1e-5 for w, r in zip(windows, reference))


def test_missing_or_foreign_shards_are_refused_naming_the_folder(tmp_path: Path) -> None:
    _, mine = one_process(tmp_path / "mine", epochs=1, accumulate=1, plugins=[sharded()])
    _, other = one_process(tmp_path / "other", epochs=1, accumulate=1, plugins=[sharded()], model=TinyMLP(hidden=8))
    folder = folder_of(mine.checkpoint_path)
    moved = folder.with_name("moved.dcp")
    folder.rename(moved)
    with pytest.raises(CheckpointError, match=f"sharded folder {folder}.* does not exist"):
        Trainer(**quiet(tmp_path / "r1", max_epochs=2, plugins=[sharded()])).fit(
            TinyMLP(), tiny_loader(n=N, batch_size=2 * MICRO), ckpt_path=mine.checkpoint_path)
    shutil.copytree(folder_of(other.checkpoint_path), folder)  # another model's shards under this file's name
    with pytest.raises(PluginHookError, match="'FSDPPlugin' raised in hook 'load_sharded_state'") as caught:
        Trainer(**quiet(tmp_path / "r2", max_epochs=2, plugins=[sharded()])).fit(
            TinyMLP(), tiny_loader(n=N, batch_size=2 * MICRO), ckpt_path=mine.checkpoint_path)
    assert isinstance(caught.value.__cause__, CheckpointError)
    assert f"sharded folder {folder} holds another model's state: shape mismatch net.0.weight" in str(caught.value)
    with pytest.raises(CheckpointError, match="no plugin of this run reads sharded state"):
        Trainer(**quiet(tmp_path / "r3", max_epochs=2)).fit(
            TinyMLP(), tiny_loader(n=N, batch_size=2 * MICRO), ckpt_path=mine.checkpoint_path)


def test_model_checkpoint_deletes_a_dropped_checkpoint_with_its_shards(tmp_path: Path) -> None:
    keep = ModelCheckpoint(dirpath=str(tmp_path / "top"), save_top_k=1)  # no monitor: the latest
    Trainer(**quiet(tmp_path, max_epochs=3, plugins=[sharded()], callbacks=[keep])).fit(
        TinyMLP(), tiny_loader(n=N, batch_size=2 * MICRO))
    files = sorted(p.name for p in (tmp_path / "top").glob("*.ckpt"))
    assert files == [Path(keep.best_model_path).name]
    assert [p for p in (tmp_path / "top").iterdir() if p.is_dir()] == [folder_of(keep.best_model_path)]


class AdamMLP(TinyMLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class SaveAtStart(Plugin):
    """``trainer.save_checkpoint`` before the first step, when the optimizer has no state yet."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, trainer: Any) -> None:
        trainer.save_checkpoint(self.path)


def test_a_checkpoint_before_the_first_step_changes_nothing_and_resumes(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    early = tmp_path / "early.ckpt"
    saving = AdamMLP()
    trainer = Trainer(**quiet(tmp_path / "a", plugins=[sharded(), SaveAtStart(early)]))
    trainer.fit(saving, tiny_loader(n=N, batch_size=2 * MICRO))
    plain = AdamMLP()
    Trainer(**quiet(tmp_path / "b")).fit(plain, tiny_loader(n=N, batch_size=2 * MICRO))
    # Adam's step count is not started by the save (a zero-gradient step would have)
    assert torch.equal(parameters_vector(saving), parameters_vector(plain))
    resumed = AdamMLP()
    with pytest.warns(PlanChangedWarning):  # written with SaveAtStart registered
        Trainer(**quiet(tmp_path / "c", plugins=[sharded()])).fit(
            resumed, tiny_loader(n=N, batch_size=2 * MICRO), ckpt_path=early)
    assert torch.equal(parameters_vector(resumed), parameters_vector(plain))
    capsys.readouterr()
    untouched = AdamMLP(seed=3)
    with pytest.warns(PlanChangedWarning):
        Trainer(**quiet(tmp_path / "d", plugins=[sharded()])).fit(
            untouched, tiny_loader(n=N, batch_size=2 * MICRO), ckpt_path=trainer.checkpoint_path)
    said = capsys.readouterr().err
    assert "nothing to train" in said
    assert f"sharded in {folder_of(trainer.checkpoint_path)}; the model is left as given" in said
    assert torch.equal(parameters_vector(untouched), parameters_vector(AdamMLP(seed=3)))
