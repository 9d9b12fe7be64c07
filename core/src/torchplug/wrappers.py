"""``TrainingStepModule``: the thin module a DDP wrapper holds (Lightning >= 1.3's pattern)."""

from __future__ import annotations

from typing import Any

from torch import nn


class TrainingStepModule(nn.Module):
    """Calling it runs ``module.training_step``, so DDP's own unmodified ``forward`` (which
    prepares the gradient reducer) wraps the user's step::

        DistributedDataParallel(TrainingStepModule(model), device_ids=device_ids)

    ``.module`` is the user's module.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        return self.module.training_step(*args)  # type: ignore[operator]
