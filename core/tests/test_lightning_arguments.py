"""The Trainer arguments a Lightning 1.1 user passes (issue 14, item 7): each with Lightning's
semantics, measured on real runs. The bad values are in test_reliability's table.

The data: 56 samples in batches of 8 (7 training batches per epoch, shuffled), 24 validation
samples (3 batches); ``Net`` has dropout, so the global RNG matters (resume and sanity checks
must leave it as an uninterrupted run has it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from torchplug import LightningSpellingWarning, MisconfigurationError, Plugin
from torchplug import checkpoint as ckpt
from torchplug.callbacks import ModelCheckpoint
from torchplug.lightning_args import map_spellings
from torchplug.metrics import read_csv


class Events(Plugin):
    """Records (event, global step, batch_in_epoch-ish data) of the validation and training hooks."""

    plugin_name = "events"

    def __init__(self) -> None:
        self.trainer: Any = None
        self.log: list[tuple[str, int]] = []
        self.val_batches = 0

    def on_fit_start(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_start(self, trainer: Any) -> None:
        self.log.append(("train_start", trainer.global_step))

    def on_validation_start(self, trainer: Any) -> None:
        self.log.append(("sanity_start" if trainer.sanity_checking else "validation_start", trainer.global_step))

    def on_validation_batch_start(self) -> None:
        self.val_batches += 1

    def on_validation_end(self, trainer: Any) -> None:
        self.log.append(("validation_end", trainer.global_step))

    def validations(self) -> list[int]:
        return [step for event, step in self.log if event == "validation_start"]


def same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs by up to {(p - q).abs().max().item():.3g}"


# -- gpus, num_processes, accelerator spellings -----------------------------------------------
def spelled(**kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    args = {"accelerator": None, "strategy": None, "devices": None, "gpus": None, "num_processes": None, **kwargs}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = map_spellings(args, cuda_available=lambda: True)
    return mapped, [str(w.message) for w in caught if issubclass(w.category, LightningSpellingWarning)]


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"gpus": 2}, {"accelerator": "gpu", "strategy": None, "devices": 2}),
    ({"gpus": "2"}, {"accelerator": "gpu", "strategy": None, "devices": 2}),
    ({"gpus": "0,1"}, {"accelerator": "gpu", "strategy": None, "devices": 2}),
    ({"gpus": [0]}, {"accelerator": "gpu", "strategy": None, "devices": 1}),
    ({"gpus": 2, "accelerator": "ddp"}, {"accelerator": "gpu", "strategy": "ddp", "devices": 2}),
    ({"gpus": 0}, {"accelerator": "cpu", "strategy": None, "devices": None}),
    ({"accelerator": "ddp_cpu", "num_processes": 2}, {"accelerator": "cpu", "strategy": "ddp", "devices": 2}),
    ({"num_processes": 3}, {"accelerator": "cpu", "strategy": None, "devices": 3}),
    ({"accelerator": "ddp_spawn", "gpus": 2}, {"accelerator": "gpu", "strategy": "ddp", "devices": 2}),
], ids=lambda v: ",".join(f"{k}={v!r}" for k, v in v.items()) if isinstance(v, dict) else str(v))
def test_lightning_device_spellings_map_to_todays_with_one_warning_each(kwargs: dict[str, Any],
                                                                       expected: dict[str, Any]) -> None:
    mapped, messages = spelled(**kwargs)
    assert mapped == expected
    given = [k for k in ("gpus", "num_processes") if k in kwargs] + \
        (["accelerator"] if kwargs.get("accelerator") in ("ddp_cpu", "ddp_spawn") else [])
    assert len(messages) == len(given), messages
    for name, message in zip(sorted(given), sorted(messages)):
        assert f"Trainer({name}=" in message
        assert "Lightning 1.1's spelling" in message
    if kwargs.get("accelerator") == "ddp_spawn":
        assert "spawn" in messages[0]
        assert "torchrun" in messages[0]


def test_ddp_cpu_with_num_processes_selects_the_ddp_plugin_on_the_cpu(make_trainer: Any) -> None:
    with pytest.warns(LightningSpellingWarning) as caught:
        trainer = make_trainer(accelerator="ddp_cpu", num_processes=2)
    assert (trainer.accelerator, trainer.strategy, trainer.devices) == ("cpu", "ddp", 2)
    assert trainer.plugin_names == ["ddp"]
    assert len(caught) == 2
    # Workers rebuild the Trainer from its arguments: the mapped ones, so they do not warn again.
    assert trainer.arguments["num_processes"] is None
    assert trainer.arguments["devices"] == 2
    with pytest.warns(LightningSpellingWarning, match=r"gpus=0.*accelerator='cpu'"):
        assert make_trainer(gpus=0).accelerator == "cpu"


@pytest.mark.parametrize(("old", "value", "new", "expected"), [
    ("distributed_backend", "ddp", "strategy", "ddp"),
    ("checkpoint_callback", False, "enable_checkpointing", False),
    ("progress_bar_refresh_rate", 0, "enable_progress_bar", False),
    ("progress_bar_refresh_rate", 20, "enable_progress_bar", True),
    ("terminate_on_nan", True, "on_nonfinite_loss", "error"),
    ("terminate_on_nan", False, "on_nonfinite_loss", "ignore"),
])
def test_renamed_lightning_arguments_run_as_todays_with_a_warning(tmp_path: Path, old: str, value: Any, new: str,
                                                                  expected: Any) -> None:
    from torchplug import Trainer

    with pytest.warns(LightningSpellingWarning, match=rf"Trainer\({old}=.*runs it as Trainer\({new}="):
        trainer = Trainer(default_root_dir=tmp_path, autoload_plugins=False, **{old: value})
    assert getattr(trainer, new) == expected
    assert trainer.arguments[new] == expected
    assert old not in trainer.arguments  # workers rebuild it from today's spelling: no second warning


def test_an_unknown_keyword_is_a_type_error_naming_it_and_the_closest_argument(make_trainer: Any) -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'max_epoch'; did you mean 'max_epochs'\?"):
        make_trainer(max_epoch=3)


# -- fast_dev_run ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", [True, 2])
def test_fast_dev_run_runs_n_batches_of_one_epoch_and_writes_nothing(tp: Any, make_trainer: Any, tmp_path: Path,
                                                                     capsys: Any, value: bool | int) -> None:
    n = int(value)
    events = Events()
    trainer = make_trainer(fast_dev_run=value, max_epochs=5, max_steps=100, limit_train_batches=6,
                           num_sanity_val_steps=2, callbacks=[events, ModelCheckpoint(save_top_k=-1)])
    trainer.fit(tp.fresh_net(), tp.loader(), tp.loader(n=24, shuffle=False, seed=1))
    assert (trainer.global_step, trainer.current_epoch) == (n, 1)
    assert events.val_batches == n  # no sanity batches, n validation batches
    assert events.log == [("train_start", 0), ("validation_start", n), ("validation_end", n)]
    assert list(tmp_path.iterdir()) == []  # no run folder: no metrics.csv, no checkpoint
    assert f"fast_dev_run={n}: {n} training and {n} validation batch(es)" in capsys.readouterr().err


# -- fractional limits ----------------------------------------------------------------------
def test_fractional_limits_are_that_share_of_the_loader_at_least_one_batch(tp: Any, make_trainer: Any) -> None:
    events = Events()
    trainer = make_trainer(max_epochs=2, limit_train_batches=0.5, limit_val_batches=0.25, callbacks=[events],
                           logger=False, enable_checkpointing=False)
    trainer.fit(tp.fresh_net(), tp.loader(), tp.loader(n=24, shuffle=False, seed=1))
    assert trainer.global_step == 2 * 3  # int(7 * 0.5) batches per epoch
    assert events.val_batches == 2 * 1  # int(3 * 0.25) = 0, at least 1 batch
    off = Events()
    make_trainer(max_epochs=1, limit_val_batches=0.0, callbacks=[off], logger=False,
                 enable_checkpointing=False).fit(tp.fresh_net(), tp.loader(), tp.loader(n=24, seed=1))
    assert off.validations() == []


class Stream(IterableDataset[Any]):
    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            yield torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_a_fraction_of_a_loader_without_len_is_refused_before_any_work(tp: Any, make_trainer: Any,
                                                                        tmp_path: Path) -> None:
    stream = DataLoader(Stream(), batch_size=None)
    with pytest.raises(MisconfigurationError, match=r"limit_train_batches=0.5 is a fraction.*no len\(\).*int"):
        make_trainer(limit_train_batches=0.5).fit(tp.fresh_net(), stream)
    with pytest.raises(MisconfigurationError, match=r"val_check_interval=0.5 is a fraction.*no len\(\)"):
        make_trainer(val_check_interval=0.5).fit(tp.fresh_net(), stream, tp.loader(n=24))
    with pytest.raises(MisconfigurationError, match=r"val_check_interval=9 training batches is more than.*7"):
        make_trainer(val_check_interval=9).fit(tp.fresh_net(), tp.loader(), tp.loader(n=24))
    assert list(tmp_path.iterdir()) == []
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, logger=False, enable_checkpointing=False)
    trainer.fit(tp.fresh_net(), stream)  # an int count works on any loader
    assert trainer.global_step == 3


# -- val_check_interval ---------------------------------------------------------------------
@pytest.mark.parametrize(("interval", "accumulate", "expected"), [
    (2, 1, [2, 4, 6, 7, 9, 11, 13, 14]),  # after batches 2, 4, 6 and the epoch's end (7)
    (0.5, 1, [3, 6, 7, 10, 13, 14]),  # int(7 * 0.5) = 3 batches
    (2, 3, [1, 2, 3, 4, 5, 6]),  # windows 3, 3, 1: after each window's step that passes a multiple of 2
    (1.0, 1, [7, 14]),  # the epoch's end only
])
def test_val_check_interval_validates_mid_epoch_after_optimizer_steps(tp: Any, make_trainer: Any,
                                                                      interval: int | float, accumulate: int,
                                                                      expected: list[int]) -> None:
    events = Events()
    trainer = make_trainer(max_epochs=2, val_check_interval=interval, accumulate_grad_batches=accumulate,
                           callbacks=[events], logger=False, enable_checkpointing=False)
    trainer.fit(tp.fresh_net(), tp.loader(), tp.loader(n=24, shuffle=False, seed=1))
    assert events.validations() == expected


def fit_with_checkpoints(tp: Any, root: Path, max_epochs: int, ckpt_path: Path | None = None) -> Any:
    from torchplug import Trainer

    torch.manual_seed(1234)
    model = tp.fresh_net()
    trainer = Trainer(default_root_dir=root, max_epochs=max_epochs, val_check_interval=2, enable_progress_bar=False,
                      autoload_plugins=False, callbacks=[ModelCheckpoint(dirpath=root / "saved", save_top_k=-1)])
    trainer.fit(model, tp.loader(), tp.loader(n=24, shuffle=False, seed=1), ckpt_path=ckpt_path)
    return model


def test_a_checkpoint_from_mid_epoch_validation_resumes_bit_identically(tp: Any, tmp_path: Path) -> None:
    uninterrupted = fit_with_checkpoints(tp, tmp_path / "a", max_epochs=2)
    mid = tmp_path / "a" / "saved" / "epoch=0-step=4.ckpt"  # written by the validation after batch 4 of 7
    data = ckpt.load(mid)
    assert (data["epoch"], data["batch_in_epoch"], data["global_step"]) == (0, 4, 4)
    torch.manual_seed(999)  # the resume must not depend on the RNG it starts with
    resumed = fit_with_checkpoints(tp, tmp_path / "b", max_epochs=2, ckpt_path=mid)
    same_weights(resumed, uninterrupted)


# -- num_sanity_val_steps --------------------------------------------------------------------
@pytest.mark.parametrize(("steps", "batches"), [(2, 2), (-1, 3)])
def test_sanity_validation_runs_before_training_discards_metrics_and_leaves_training_unchanged(
        tp: Any, make_trainer: Any, tmp_path: Path, steps: int, batches: int) -> None:
    models = []
    for sanity in (0, steps):
        events = Events()
        torch.manual_seed(1234)
        model = tp.fresh_net()
        trainer = make_trainer(max_epochs=2, num_sanity_val_steps=sanity, check_val_every_n_epoch=3,
                               callbacks=[events], default_root_dir=tmp_path / str(sanity),
                               enable_checkpointing=False)
        trainer.fit(model, tp.loader(), tp.loader(n=24, shuffle=True, seed=1))
        models.append(model)
    # The sanity run: `batches` validation batches, before on_train_start, and no on_validation_end.
    assert events.val_batches == batches
    assert events.log == [("sanity_start", 0), ("train_start", 0)]  # trainer.sanity_checking during it
    assert "val_loss" not in trainer.callback_metrics
    assert "val_loss" not in read_csv(Path(trainer.log_dir or "") / "metrics.csv")
    same_weights(models[0], models[1])  # shuffled val loader and dropout: the RNG was restored


# -- resume_from_checkpoint ------------------------------------------------------------------
def test_resume_from_checkpoint_is_fit_ckpt_path_with_a_warning(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    torch.manual_seed(1234)
    straight = tp.fresh_net()
    make_trainer(max_epochs=2, default_root_dir=tmp_path / "a").fit(straight, tp.loader())
    torch.manual_seed(1234)
    first = make_trainer(max_epochs=1, default_root_dir=tmp_path / "b")
    first.fit(tp.fresh_net(), tp.loader())
    with pytest.warns(LightningSpellingWarning, match=r"resume_from_checkpoint=.*fit\(model, ckpt_path="):
        second = make_trainer(max_epochs=2, default_root_dir=tmp_path / "c",
                              resume_from_checkpoint=first.checkpoint_path)
    resumed = tp.fresh_net()
    second.fit(resumed, tp.loader())
    assert (second.global_step, second.current_epoch) == (14, 2)
    same_weights(resumed, straight)
    with pytest.raises(MisconfigurationError, match=r"resume_from_checkpoint=.*and fit\(ckpt_path=.*pass fit"):
        second.fit(tp.fresh_net(), tp.loader(), ckpt_path=first.checkpoint_path)


# -- accumulate_grad_batches as a schedule ---------------------------------------------------
def hand_schedule(model: nn.Module, epochs: int, schedule: dict[int, int], make_loader: Any) -> None:
    """The documented algorithm with Lightning's GradientAccumulationScheduler: epoch e accumulates
    the entry of the last key <= e (1 before the first key), a short last window averaged over its length."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=0.9)  # type: ignore[arg-type]
    model.train()
    for epoch in range(epochs):
        keys = [k for k in schedule if k <= epoch]
        accumulate = schedule[max(keys)] if keys else 1
        train = make_loader()
        n = len(train)
        for i, (x, y) in enumerate(train):
            start = i - i % accumulate
            window = min(accumulate, n - start)
            (nn.functional.cross_entropy(model(x), y) / window).backward()
            if i + 1 == start + window:
                opt.step()
                opt.zero_grad(set_to_none=True)


def test_an_accumulation_schedule_matches_a_hand_loop_and_resumes_mid_schedule(tp: Any, make_trainer: Any,
                                                                               tmp_path: Path) -> None:
    schedule = {1: 2, 2: 3}  # no entry for epoch 0: 1, as in Lightning
    torch.manual_seed(1234)
    trained = tp.fresh_net()
    trainer = make_trainer(max_epochs=3, accumulate_grad_batches=schedule, default_root_dir=tmp_path / "a")
    trainer.fit(trained, tp.loader())
    torch.manual_seed(1234)
    reference = tp.fresh_net()
    hand_schedule(reference, 3, schedule, tp.loader)
    same_weights(trained, reference)
    assert trainer.global_step == 7 + 4 + 3  # windows of 1, 2 (2, 2, 2, 1) and 3 (3, 3, 1)
    assert trainer.accumulate_grad_batches == 3
    # Resumed after epoch 1 (accumulating 2), epoch 2 accumulates 3.
    torch.manual_seed(1234)
    first = make_trainer(max_epochs=2, accumulate_grad_batches=schedule, default_root_dir=tmp_path / "b")
    first.fit(tp.fresh_net(), tp.loader())
    resumed = tp.fresh_net()
    again = make_trainer(max_epochs=3, accumulate_grad_batches=schedule, default_root_dir=tmp_path / "c")
    again.fit(resumed, tp.loader(), ckpt_path=first.checkpoint_path)
    assert again.global_step == 14
    same_weights(resumed, trained)


def test_the_accumulation_schedule_is_in_the_plan_and_its_fingerprint(make_trainer: Any) -> None:
    first, second = (make_trainer(accumulate_grad_batches={1: n}).plan for n in (2, 3))
    assert first.setting("accumulate_grad_batches").value == {"1": 2}
    assert first.fingerprint != second.fingerprint  # ranks with different schedules are told apart
