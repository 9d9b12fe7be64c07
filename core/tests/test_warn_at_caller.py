"""Warnings about what the user passed point at the user's line, not at torchplug or pluggy."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchplug import PlanChangedWarning, Trainer, TrainingModule, discovery
from torchplug.utils import caller_stacklevel, warn_at_caller

PLUGIN_SOURCE = """
from torchplug.utils import warn_at_caller

def hook():
    helper()

def helper():
    warn_at_caller("about your input", RuntimeWarning)
"""


def test_warning_points_at_the_first_frame_outside_torchplug() -> None:
    plugin = types.ModuleType("torchplug_fake_plugin")
    exec(compile(PLUGIN_SOURCE, "/site/torchplug_fake_plugin.py", "exec"), plugin.__dict__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin.hook()  # the user's line
        line = _lineno() - 1
    assert [(w.category, w.filename, w.lineno) for w in caught] == [(RuntimeWarning, __file__, line)]


def test_from_user_code_it_is_the_line_itself() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_at_caller("direct")
        line = _lineno() - 1
    assert (caught[0].filename, caught[0].lineno, caught[0].category) == (__file__, line, UserWarning)
    assert caller_stacklevel() == 1


def _lineno() -> int:
    import sys

    return sys._getframe(1).f_lineno


class Tiny(TrainingModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_native_amp_checkpoint_warning_points_at_the_fit_call(tmp_path: Path) -> None:
    if discovery.find("native_amp") is None:
        pytest.skip("needs torchplug-native-amp")
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    quiet = {"default_root_dir": tmp_path, "enable_progress_bar": False, "autoload_plugins": False}
    first = Trainer(max_steps=1, **quiet)
    first.fit(Tiny(), data)
    resumed = Trainer(precision=16, max_steps=2, **quiet)
    line = _lineno() + 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(Tiny(), data, ckpt_path=first.checkpoint_path)
    (warning,) = [w for w in caught if "GradScaler state" in str(w.message)]
    assert (warning.filename, warning.lineno) == (__file__, line)
    # the plan changed too (fp32 -> fp16): that warning also points at the fit call
    (changed,) = [w for w in caught if w.category is PlanChangedWarning]
    assert "setting precision: 32 -> 16 [numerics]" in str(changed.message)
    assert (changed.filename, changed.lineno) == (__file__, line)
