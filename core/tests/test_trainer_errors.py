"""Bad input: a clear error before any work, or at the failing step, and no partial files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchplug
import torchplug.discovery
from torchplug import MisconfigurationError, NonFiniteLossError, Trainer

# -- the module ------------------------------------------------------------------------------


class NoTrainingStep(torchplug.TrainingModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoOptimizers(torchplug.TrainingModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.lin(batch[0]).sum()


class PlainModule(nn.Module):  # not a TrainingModule and no hooks at all
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)


@pytest.mark.parametrize(("model", "message"), [
    (NoTrainingStep(), r"NoTrainingStep has no training_step\(\)"),
    (NoOptimizers(), r"NoOptimizers has no configure_optimizers\(\)"),
    (PlainModule(), r"PlainModule has no training_step\(\)"),
    ("not a model", "Expected a torch.nn.Module"),
])
def test_unusable_module_fails_before_work(tp: Any, make_trainer: Any, tmp_path: Path, model: Any,
                                           message: str) -> None:
    with pytest.raises(MisconfigurationError, match=message):
        make_trainer().fit(model, tp.loader())
    assert tp.files_under(tmp_path) == []


def _step_returning(value: Any) -> type[torchplug.TrainingModule]:
    class Returns(torchplug.TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = self.lin(batch[0])
            return value(out, batch_idx)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Returns


@pytest.mark.parametrize(("returns", "message"), [
    (lambda out, i: out, r"scalar loss tensor .* got a tensor of shape \(8, 4\) at epoch 0, batch 0"),
    (lambda out, i: out.sum().item(), "got float at epoch 0, batch 0"),
    (lambda out, i: None, "got NoneType"),
    (lambda out, i: {"logits": out}, r"a dict without 'loss' \(keys \['logits'\]\)"),
    (lambda out, i: out.sum() if i < 3 else out.mean(0), r"shape \(4,\) at epoch 0, batch 3"),
    (lambda out, i: out.sum().detach(), "does not require grad"),
])
@pytest.mark.parametrize("logger", [True, False])
def test_bad_loss_fails_at_its_step_and_leaves_no_files(tp: Any, make_trainer: Any, tmp_path: Path, returns: Any,
                                                        message: str, logger: bool) -> None:
    with pytest.raises(MisconfigurationError, match=message):
        make_trainer(max_epochs=1, logger=logger).fit(_step_returning(returns)(), tp.loader())
    assert tp.files_under(tmp_path) == []


def test_nan_loss_names_the_step(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    model = _step_returning(lambda out, i: out.sum() * (float("nan") if i == 3 else 1.0))()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 0, batch 3 \(global step 3") as e:
        make_trainer(max_epochs=1).fit(model, tp.loader())
    assert "on_nonfinite_loss='skip'" in str(e.value)
    assert tp.files_under(tmp_path) == []


def test_nan_loss_after_a_checkpoint_keeps_the_good_files(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    model = _step_returning(lambda out, i: out.sum() * (float("inf") if model.bad else 1.0))()
    model.bad = False

    class Flip(torchplug.Plugin):
        def on_train_epoch_end(self, epoch: int) -> None:
            model.bad = True

    trainer = make_trainer(max_epochs=2, plugins=[Flip()], log_every_n_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"\(-?inf\) at epoch 1, batch 0 \(global step 7"):
        trainer.fit(model, tp.loader())
    folder = tmp_path / "torchplug_logs" / "version_0"
    assert tp.files_under(folder) == ["checkpoints", "checkpoints/last.ckpt", "metrics.csv"]
    assert torchplug.checkpoint.load(folder / "checkpoints" / "last.ckpt")["global_step"] == 7


def test_nan_loss_ignore_option_backpropagates(tp: Any, make_trainer: Any) -> None:
    model = _step_returning(lambda out, i: out.sum() * (float("nan") if i == 3 else 1.0))()
    make_trainer(max_epochs=1, on_nonfinite_loss="ignore", logger=False, enable_checkpointing=False).fit(
        model, tp.loader())
    assert not all(torch.isfinite(p).all() for p in model.parameters())


# -- the data --------------------------------------------------------------------------------

def test_empty_dataloaders_fail_before_work(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(MisconfigurationError, match="train_dataloaders is empty"):
        make_trainer().fit(tp.fresh_net(), empty)
    dropped = DataLoader(TensorDataset(torch.zeros(3, 8), torch.zeros(3, dtype=torch.long)), batch_size=4,
                         drop_last=True)
    with pytest.raises(MisconfigurationError, match="train_dataloaders is empty"):
        make_trainer().fit(tp.fresh_net(), dropped)
    with pytest.raises(MisconfigurationError, match="val_dataloaders is empty"):
        make_trainer().fit(tp.fresh_net(), tp.loader(), empty)
    assert tp.files_under(tmp_path) == []


def test_missing_or_unusable_data(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationError, match=r"No training data: .*Net.train_dataloader\(\)"):
        make_trainer().fit(tp.fresh_net())
    with pytest.raises(MisconfigurationError, match="train_dataloaders must be iterable"):
        make_trainer().fit(tp.fresh_net(), 42)
    with pytest.raises(MisconfigurationError, match="has no validation_step"):
        make_trainer().fit(NoOptimizersButValid(), tp.loader(), tp.loader())
    assert tp.files_under(tmp_path) == []


class NoOptimizersButValid(torchplug.TrainingModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.lin(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("config", "message"), [
    (lambda m: "adam", "configure_optimizers\\(\\) returned str"),
    (lambda m: [], "returned no optimizer"),
    (lambda m: {"optimizer": torch.optim.SGD(m.parameters(), lr=0.1), "lr_scheduler": 3}, "LR scheduler 3"),
    (lambda m: {"optimizer": (o := torch.optim.SGD(m.parameters(), lr=0.1)),
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(o, 1), "interval": "batch"}},
     "interval must be 'step' or 'epoch'"),
    (lambda m: {"optimizer": (o := torch.optim.SGD(m.parameters(), lr=0.1)),
                "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o)}, "ReduceLROnPlateau needs a metric"),
])
def test_bad_configure_optimizers(tp: Any, make_trainer: Any, tmp_path: Path, config: Any, message: str) -> None:
    class Bad(NoOptimizersButValid):
        def configure_optimizers(self) -> Any:
            return config(self)

    with pytest.raises(MisconfigurationError, match=message):
        make_trainer().fit(Bad(), tp.loader())
    assert tp.files_under(tmp_path) == []


# -- Trainer arguments -----------------------------------------------------------------------

BAD_ARGUMENTS = [
    ({"max_epochs": 0}, "max_epochs must be >= 1, got 0"),
    ({"max_epochs": -1}, "max_epochs must be >= 1, got -1"),
    ({"max_epochs": 2.5}, "max_epochs must be an integer"),
    ({"max_epochs": "3"}, "max_epochs must be an integer"),
    ({"max_epochs": True}, "max_epochs must be an integer"),
    ({"max_steps": 0}, "max_steps must be positive, or -1"),
    ({"max_steps": -5}, "max_steps must be >= -1"),
    ({"max_steps": 1.0}, "max_steps must be an integer"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches must be >= 1, got 0"),
    ({"accumulate_grad_batches": -2}, "accumulate_grad_batches must be >= 1"),
    ({"accumulate_grad_batches": 2.0}, "accumulate_grad_batches must be an integer"),
    ({"gradient_clip_val": -1.0}, "gradient_clip_val must be >= 0"),
    ({"gradient_clip_val": "1"}, "gradient_clip_val must be a number"),
    ({"gradient_clip_val": float("nan")}, "gradient_clip_val must be a number"),
    ({"gradient_clip_norm_type": 0}, "gradient_clip_norm_type must be > 0"),
    ({"limit_train_batches": 0}, "limit_train_batches must be >= 1"),
    ({"limit_train_batches": 1.5}, "limit_train_batches as a float is a fraction of the loader's batches"),
    ({"limit_val_batches": -1}, "limit_val_batches must be >= 0"),
    ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch must be >= 1"),
    ({"log_every_n_steps": 0}, "log_every_n_steps must be >= 1"),
    ({"num_nodes": 0}, "num_nodes must be >= 1"),
    ({"devices": 0}, "devices must be a positive integer or 'auto'"),
    ({"devices": "two"}, "devices must be a positive integer or 'auto'"),
    ({"devices": True}, "devices must be a positive integer or 'auto'"),
    ({"precision": 64}, "precision must be 32, 16 or 'bf16'"),
    ({"precision": "fp8"}, "precision must be 32, 16 or 'bf16'"),
    ({"precision": [16]}, "precision must be 32, 16 or 'bf16'"),
    ({"amp_backend": "cuda"}, "amp_backend must be 'native' or 'apex'"),
    ({"amp_backend": "apex", "amp_level": "O4"}, "amp_level must be one of O0, O1, O2, O3"),
    ({"amp_level": "O1"}, "amp_level applies to amp_backend='apex' only"),
    ({"amp_backend": "apex", "precision": "bf16"}, "apex amp has no bf16 mode"),
    ({"accelerator": 3}, "accelerator must be a string"),
    ({"accelerator": ["cpu"]}, "accelerator must be a string"),
    ({"accelerator": "ddp", "strategy": "fsdp"}, "names a strategy and strategy='fsdp' another"),
    ({"strategy": 2}, "strategy must be str"),
    ({"enable_progress_bar": "yes"}, "enable_progress_bar must be bool"),
    ({"enable_checkpointing": 1}, "enable_checkpointing must be bool"),
    ({"logger": None}, "logger must be bool"),
    ({"deterministic": "true"}, "deterministic must be bool"),
    ({"default_root_dir": 5}, "default_root_dir must be a path"),
    ({"on_nonfinite_loss": "warn"}, "on_nonfinite_loss must be one of"),
    ({"checkpoint_weights_only": "no"}, "checkpoint_weights_only must be bool"),
    ({"devices": 2, "strategy": "single_device"}, "strategy='single_device' trains in one process"),
    ({"num_nodes": 2, "on_nonfinite_loss": "skip"}, "on_nonfinite_loss='skip' cannot run on several processes"),
    ({"plugins": [42]}, r"plugins= takes plugin names \(str\), plugin objects and modules; got 42"),
    ({"plugins": [None]}, "plugins= takes plugin names"),
    ({"blocked_plugins": "ddp"}, "blocked_plugins must be a list of plugin names"),
    ({"autoload_plugins": "yes"}, "autoload_plugins must be bool or NoneType"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS, ids=[str(k) for k, _ in BAD_ARGUMENTS])
def test_bad_trainer_argument(kwargs: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationError, match=message):
        Trainer(**{"default_root_dir": tmp_path, "autoload_plugins": False, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_cuda_accelerator_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(MisconfigurationError, match=r"torch\.cuda\.is_available\(\) is False"):
        Trainer(accelerator="gpu", autoload_plugins=False)


@pytest.mark.parametrize(("kwargs", "attrs"), [
    ({}, {"max_epochs": 1000, "max_steps": -1, "precision": "32", "accumulate_grad_batches": 1}),
    ({"max_steps": 10}, {"max_epochs": None, "max_steps": 10}),
    ({"max_steps": None}, {"max_steps": -1, "max_epochs": 1000}),  # Lightning 1.1's spelling
    ({"gradient_clip_val": None}, {"gradient_clip_val": 0.0}),
    ({"precision": "16-mixed", "plugins": []}, {"precision": "16"}),  # needs native_amp (see below)
    ({"accelerator": "cpu", "devices": "auto"}, {"accelerator": "cpu", "devices": None}),
    ({"limit_val_batches": 0}, {"limit_val_batches": 0}),
])
def test_good_trainer_arguments(kwargs: dict[str, Any], attrs: dict[str, Any], tmp_path: Path) -> None:
    if kwargs.get("precision") == "16-mixed" and torchplug.discovery.find("native_amp") is None:
        with pytest.raises(torchplug.PluginNotFoundError, match="pip install"):
            Trainer(default_root_dir=tmp_path, autoload_plugins=False, **kwargs)
        return
    trainer = Trainer(default_root_dir=tmp_path, autoload_plugins=False, **kwargs)
    for name, value in attrs.items():
        assert getattr(trainer, name) == value


def test_unwritable_root_dir_fails_before_training(tp: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    calls = []

    class Watch(torchplug.Plugin):
        def on_fit_start(self) -> None:
            calls.append("on_fit_start")

    trainer = Trainer(default_root_dir=blocker / "sub", plugins=[Watch()], autoload_plugins=False,
                      enable_progress_bar=False)
    with pytest.raises(MisconfigurationError, match="Cannot create the run folder"):
        trainer.fit(tp.fresh_net(), tp.loader())
    assert calls == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_an_exception_from_the_step_keeps_its_type_and_gets_a_note_saying_where(tp: Any, make_trainer: Any) -> None:
    class FailsAt(tp.Net):  # type: ignore[misc, name-defined]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.trainer_epoch == 1 and batch_idx == 3:
                raise ValueError("the model rejects this batch")
            return super().training_step(batch, batch_idx)

    model = FailsAt()
    model.trainer_epoch = 0

    class Epochs(torchplug.Plugin):
        def on_train_epoch_start(self, epoch: int) -> None:
            model.trainer_epoch = epoch

    with pytest.raises(ValueError, match="the model rejects this batch") as info:
        make_trainer(max_epochs=2, plugins=[Epochs()], logger=False).fit(model, tp.loader())
    assert info.value.__notes__ == ["torchplug: raised during train at epoch 1, batch 3 (global step 10)."]

    class FailsInValidation(tp.Net):  # type: ignore[misc, name-defined]
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 1:
                raise KeyError("val")

    with pytest.raises(KeyError) as info:
        make_trainer(max_epochs=1, logger=False).fit(FailsInValidation(), tp.loader(), tp.loader(n=24))
    assert info.value.__notes__ == ["torchplug: raised during validation at epoch 0, validation batch 1 "
                                    "(global step 7)."]
