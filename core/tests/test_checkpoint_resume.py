"""Resume parity: stopped after step k, resumed with fit(ckpt_path=...), the run ends with
exactly the weights (and optimizer state) of an uninterrupted run.

The model has dropout and the loader shuffles, so the global RNG, the position inside the
epoch and the epoch's shuffle order must all be restored. The resumed process starts from a
different model initialisation and a scrambled RNG, so nothing carries over by accident.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from torchplug import checkpoint as ckpt


def _run(tp: Any, make_trainer: Any, root: Path, max_steps: int, accumulate: int, make_loader: Any,
         ckpt_path: str | None = None, scramble: bool = False) -> tuple[Any, Any]:
    if scramble:
        torch.manual_seed(999)
        random.seed(999)
        model = tp.Net(sched="both")  # different initial weights: the checkpoint must replace them
    else:
        torch.manual_seed(1234)
        model = tp.fresh_net(sched="both")
    trainer = make_trainer(default_root_dir=root, max_steps=max_steps, accumulate_grad_batches=accumulate,
                           gradient_clip_val=0.5)
    trainer.fit(model, make_loader(), tp.loader(n=24, shuffle=True, seed=1), ckpt_path=ckpt_path)
    return model, trainer


def _assert_same_state(tp: Any, a: Any, ta: Any, b: Any, tb: Any) -> None:
    assert tb.global_step == ta.global_step
    assert tb.current_epoch == ta.current_epoch
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{name} differs by {(pa - pb).abs().max().item():.3g}"
    oa, ob = ta.optimizers[0], tb.optimizers[0]
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(oa.state[pa]["momentum_buffer"], ob.state[pb]["momentum_buffer"])
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]
    assert [s.state_dict() for s in ta.lr_schedulers] == [s.state_dict() for s in tb.lr_schedulers]


# 56 samples / 8 = 7 batches per epoch; with accumulate 2 the windows are 2, 2, 2, 1 (4 steps).
@pytest.mark.parametrize(("stop", "total", "accumulate"), [
    pytest.param(3, 17, 1, id="mid-epoch"),
    pytest.param(7, 17, 1, id="epoch-boundary"),
    pytest.param(10, 17, 1, id="mid-second-epoch"),
    pytest.param(5, 11, 2, id="accumulate2-mid-epoch"),
    pytest.param(4, 11, 2, id="accumulate2-epoch-boundary"),
])
def test_resume_matches_uninterrupted_run(tp: Any, make_trainer: Any, tmp_path: Path, stop: int, total: int,
                                          accumulate: int) -> None:
    def make_loader() -> Any:
        return tp.loader()

    full, t_full = _run(tp, make_trainer, tmp_path / "full", total, accumulate, make_loader)
    _, t_stop = _run(tp, make_trainer, tmp_path / "stop", stop, accumulate, make_loader)
    data = ckpt.load(t_stop.checkpoint_path)
    assert data["global_step"] == stop
    resumed, t_res = _run(tp, make_trainer, tmp_path / "resume", total, accumulate, make_loader,
                          ckpt_path=t_stop.checkpoint_path, scramble=True)
    _assert_same_state(tp, full, t_full, resumed, t_res)


def test_resume_restores_an_explicit_loader_generator(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    """DataLoader(generator=g) shuffles with g, not the global RNG: its state is resumed too."""

    def make_loader() -> Any:
        return tp.loader(generator=torch.Generator().manual_seed(7))

    full, t_full = _run(tp, make_trainer, tmp_path / "full", 12, 1, make_loader)
    _, t_stop = _run(tp, make_trainer, tmp_path / "stop", 9, 1, make_loader)
    resumed, t_res = _run(tp, make_trainer, tmp_path / "resume", 12, 1, make_loader,
                          ckpt_path=t_stop.checkpoint_path, scramble=True)
    _assert_same_state(tp, full, t_full, resumed, t_res)


def test_resume_twice_in_a_chain(tp: Any, make_trainer: Any, tmp_path: Path) -> None:
    def make_loader() -> Any:
        return tp.loader()

    full, t_full = _run(tp, make_trainer, tmp_path / "full", 16, 1, make_loader)
    _, t1 = _run(tp, make_trainer, tmp_path / "a", 4, 1, make_loader)
    _, t2 = _run(tp, make_trainer, tmp_path / "b", 9, 1, make_loader, ckpt_path=t1.checkpoint_path, scramble=True)
    resumed, t3 = _run(tp, make_trainer, tmp_path / "c", 16, 1, make_loader, ckpt_path=t2.checkpoint_path,
                       scramble=True)
    _assert_same_state(tp, full, t_full, resumed, t3)


def test_resume_with_max_epochs_continues_counting_epochs(tp: Any, make_trainer: Any) -> None:
    first = make_trainer(max_epochs=2, logger=False)
    first.fit(tp.fresh_net(), tp.loader())
    assert (first.current_epoch, first.global_step) == (2, 14)
    second = make_trainer(max_epochs=3, logger=False)
    second.fit(tp.fresh_net(), tp.loader(), ckpt_path=first.checkpoint_path)
    assert (second.current_epoch, second.global_step) == (3, 21)
    # Resuming a run that already reached its limits trains nothing more.
    third = make_trainer(max_epochs=3, logger=False)
    model = tp.fresh_net()
    third.fit(model, tp.loader(), ckpt_path=second.checkpoint_path)
    assert (third.current_epoch, third.global_step) == (3, 21)
    assert tp.params_equal(model, _model_from(tp, second.checkpoint_path))


def _model_from(tp: Any, path: str) -> Any:
    model = tp.Net()
    model.load_state_dict(ckpt.load(path)["state_dict"])
    return model
