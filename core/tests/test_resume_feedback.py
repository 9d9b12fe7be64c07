"""What a user sees when resuming: where the run resumed, and that a finished run trains nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def test_resume_says_where_it_resumed(tp: Any, make_trainer: Any, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    first = make_trainer(max_steps=3, logger=False)
    first.fit(tp.fresh_net(), tp.loader(n=56))  # 7 batches per epoch: stops inside epoch 0
    path = first.checkpoint_path
    assert path is not None
    capsys.readouterr()
    resumed = make_trainer(max_epochs=1, logger=False)
    resumed.fit(tp.fresh_net(), tp.loader(n=56), ckpt_path=path)
    err = capsys.readouterr().err
    assert f"torchplug: resuming from {path} at epoch 0, batch 3, global step 3" in err
    assert resumed.global_step == 7


def test_resuming_a_finished_run_says_so_and_writes_nothing(tp: Any, make_trainer: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    first = make_trainer(max_epochs=2)
    trained = tp.fresh_net()
    first.fit(trained, tp.loader(n=16))
    path = first.checkpoint_path
    assert path is not None
    before = tp.files_under(tmp_path)
    capsys.readouterr()

    again = make_trainer(max_epochs=2)
    model = tp.Net()  # other initial weights: they must become the checkpoint's
    again.fit(model, tp.loader(n=16), ckpt_path=path)
    err = capsys.readouterr().err
    assert f"torchplug: {path} is at epoch 2, batch 0, global step 4, where this run ends (max_epochs=2): " \
           "nothing to train, nothing written." in err
    assert tp.files_under(tmp_path) == before  # no new version folder, metrics.csv or plot
    assert tp.params_equal(model, trained)
    assert (again.global_step, again.current_epoch) == (4, 2)
    assert again.checkpoint_path == path
    assert again.log_dir is None
    assert again.callback_metrics == first.callback_metrics
