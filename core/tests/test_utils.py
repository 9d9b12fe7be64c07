"""The per-step helpers (torchplug.utils, the RNG capture at each window start): what they
return, and that their shortcuts (a batch already in place, the remembered first parameter,
numpy's unchanged RNG state) never give a stale answer."""

from __future__ import annotations

import gc
import weakref
from collections import namedtuple

import torch
from torch import nn

from torchplug.utils import first_parameter, move_to_device

CPU, META = torch.device("cpu"), torch.device("meta")
Pair = namedtuple("Pair", "x y")


def test_a_batch_in_place_comes_back_as_the_same_object() -> None:
    batch = ((torch.ones(2), {"mask": [torch.zeros(1)]}), 3)
    assert move_to_device(batch, CPU) is batch


def test_every_tensor_of_a_nested_batch_is_moved_and_containers_keep_their_types() -> None:
    batch = (Pair(torch.ones(2), [torch.zeros(1), "label"]), {"w": torch.ones(1)}, 7)
    moved = move_to_device(batch, META)
    assert isinstance(moved, tuple)
    assert isinstance(moved[0], Pair)
    assert isinstance(moved[0].y, list)
    assert moved[0].x.device == META
    assert moved[0].y[0].device == META
    assert moved[1]["w"].device == META
    assert moved[0].y[1] == "label"
    assert moved[2] == 7
    assert batch[0].x.device == CPU  # the input is untouched


def test_one_tensor_out_of_place_deep_in_the_batch_is_found() -> None:
    batch = (torch.ones(1, device="meta"), [[{"deep": torch.ones(1)}]], 0)
    moved = move_to_device(batch, META)
    assert moved is not batch
    assert moved[1][0][0]["deep"].device == META


def test_first_parameter_follows_the_model_through_moves_replacements_and_deletions() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 1))
    assert first_parameter(model) is model[1][0].weight
    assert first_parameter(model) is model[1][0].weight  # the remembered place
    model.to("meta")  # same Parameter objects, new device: read live
    assert first_parameter(model).device == META  # type: ignore[union-attr]
    model[1][0].weight = nn.Parameter(torch.zeros(2, 2))  # replaced: the new one
    assert first_parameter(model) is model[1][0].weight
    del model[1][0].weight  # deleted: the search goes on to the next parameter
    assert first_parameter(model) is model[1][0].bias
    other = nn.Linear(1, 1)
    assert first_parameter(other) is other.weight  # another model is searched, not taken from memory
    assert first_parameter(nn.ReLU()) is None


def test_first_parameter_keeps_nothing_alive() -> None:
    model = nn.Linear(3, 3)
    first_parameter(model)
    model_ref, weight_ref = weakref.ref(model), weakref.ref(model.weight)
    del model
    gc.collect()
    assert model_ref() is None
    assert weight_ref() is None


def test_the_rng_capture_of_numpy_is_always_numpys_state() -> None:
    """capture_rng reuses numpy's last state while the generator has not moved: after every kind
    of change (a draw, a cached Gaussian made and consumed, a seed, a restore) it equals get_state()."""
    import numpy as np

    from torchplug import checkpoint

    def same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
        return a[0] == b[0] and bool(np.array_equal(a[1], b[1])) and a[2:] == b[2:]  # type: ignore[arg-type]

    np.random.seed(3)
    first = checkpoint.capture_rng()[3]
    assert checkpoint.capture_rng()[3] is first  # nothing drew: the same state, not read again
    changes = [lambda: np.random.rand(3), lambda: np.random.standard_normal(),  # makes a cached Gaussian
               lambda: np.random.standard_normal(),  # consumes it: the raw state does not move
               lambda: np.random.seed(3),
               lambda: checkpoint.set_rng_states(checkpoint.rng_states(checkpoint.capture_rng()))]
    for change in changes:
        change()
        assert same(checkpoint.capture_rng()[3], np.random.get_state())
