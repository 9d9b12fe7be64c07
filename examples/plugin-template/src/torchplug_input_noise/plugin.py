"""``InputNoisePlugin``: adds Gaussian noise to the floating-point inputs of training batches.

One hook does it: ``on_before_forward`` is *chained*, so each plugin receives the step
arguments the previous one returned, ``(batch, batch_idx)``, and returns new ones (or ``None``
for "unchanged"). Validation batches pass through untouched.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from torchplug import MisconfigurationError, Plugin

#: Entry points are instantiated without arguments: the default std comes from here.
STD_ENV = "TORCHPLUG_INPUT_NOISE_STD"


class InputNoisePlugin(Plugin):
    """Add ``N(0, std**2)`` noise to every floating-point tensor of a training batch.

    :param std: the noise's standard deviation; ``None`` reads ``TORCHPLUG_INPUT_NOISE_STD``
        (default 0.1). 0 turns the plugin into a no-op.
    :param seed: seed of the plugin's own generator (rank ``r`` uses ``seed + r``): runs are
        reproducible, and the global RNG that shuffles data is left alone.
    """

    plugin_name = "input_noise"

    def __init__(self, std: float | None = None, seed: int = 0) -> None:
        if std is None:
            text = os.environ.get(STD_ENV, "0.1")
            try:
                std = float(text)
            except ValueError:
                raise MisconfigurationError(
                    f"InputNoisePlugin (torchplug-input-noise): {STD_ENV}={text!r} is not a number"
                ) from None
        if not std >= 0:
            raise MisconfigurationError(f"InputNoisePlugin (torchplug-input-noise): std must be >= 0, got {std!r}")
        self.std = float(std)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def __repr__(self) -> str:
        return f"InputNoisePlugin(std={self.std:g}, seed={self.seed})"

    # A Trainer pickles its plugins into worker processes; the generator is per process.
    def __getstate__(self) -> dict[str, Any]:
        return {"std": self.std, "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    # -- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any) -> None:
        self._generator = torch.Generator().manual_seed(self.seed + trainer.global_rank)

    def on_before_forward(self, model: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not model.training or self.std == 0:
            return None
        batch, *rest = args
        return (self._noisy(batch), *rest)

    def _noisy(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            if not batch.is_floating_point():
                return batch  # labels, token ids
            if self._generator is None:  # driven outside a fit
                self._generator = torch.Generator().manual_seed(self.seed)
            noise = torch.randn(batch.shape, generator=self._generator)
            return batch + noise.to(batch.device, batch.dtype) * self.std
        if isinstance(batch, (list, tuple)):
            items = [self._noisy(item) for item in batch]
            return items if isinstance(batch, list) else tuple(items)
        if isinstance(batch, dict):
            return {key: self._noisy(value) for key, value in batch.items()}
        return batch
