"""The training batches of an epoch, as a sequence of accumulation windows.

An epoch is a sequence of windows; a window is its micro-batches, read lazily one at a time (a
random transform in the loader must draw from the RNG in the same order as a hand-written
loop). A resumed epoch replays its shuffle from the RNG states saved at the epoch's start and
skips the batches already trained; a loader without ``len`` is read one batch ahead, so the
loop knows which batch is the epoch's last.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from torchplug import checkpoint as ckpt
from torchplug.state import Position, RunState

Item = tuple[int, Any, bool]  # (index in the epoch, batch, last batch of the epoch)


def num_batches(loader: Any, limit: int | None) -> int | None:
    """Batches per epoch, or ``None`` for a loader without ``len``."""
    try:
        n = len(loader)
    except TypeError:
        return None
    return min(n, limit) if limit is not None else n


class Window:
    """One accumulation window: iterating gives ``(batch_idx, batch, is_last)``, where
    ``is_last`` marks the micro-batch after which the optimizer steps."""

    def __init__(self, first: Item, rest: Iterator[Item], length: int) -> None:
        #: micro-batches the window is averaged over (the loss of each is divided by it)
        self.length = length
        #: micro-batches that ran backward (a skipped non-finite loss does not)
        self.backwards = 0
        #: True while the window has not reached its last micro-batch (the loader ran dry)
        self.open = True
        self._first: Item | None = first
        self._rest = rest

    def __iter__(self) -> Iterator[Item]:
        item, count = self._first, 0
        self._first = None
        while item is not None:
            index, batch, last_of_epoch = item
            count += 1
            is_last = last_of_epoch or count >= self.length
            self.open = not is_last
            yield index, batch, is_last
            if is_last:
                return
            item = next(self._rest, None)


class EpochBatches:
    """The train loader's batches, epoch by epoch, resumable at any window boundary.

    :param loader: the train loader (sharded already under DDP).
    :param limit: ``limit_train_batches``.
    :param state: the run's state: ``batch_in_epoch`` is where the epoch resumes, ``epoch_rng``
        the RNG states at the epoch's start.
    :param position: updated with the batch being fetched, for error notes.
    """

    def __init__(self, loader: Any, limit: int | None, state: RunState, position: Position) -> None:
        self.loader = loader
        self.limit = limit
        self.state = state
        self.position = position

    def length(self) -> int | None:
        return num_batches(self.loader, self.limit)

    def windows(self, epoch: int, accumulate: int, capture: bool = False) -> Iterator[Window]:
        """The epoch's windows from ``state.batch_in_epoch`` on, each started when the previous
        one has been trained. Ends early when the loader runs dry inside a window (it is then
        ``open``). ``capture``: keep the RNG states at each window's start in ``state.resume_rng``."""
        n = self.length()
        items = self._items(epoch, n)
        while True:
            if capture:
                # Before the window's first fetch (which may draw): a checkpoint written inside the window
                # (or on an interrupt inside it) resumes at its start from these states.
                self.state.resume_rng = self.rng_capture()
            if (first := next(items, None)) is None:
                break
            window = Window(first, items, accumulate if n is None else min(accumulate, n - first[0]))
            yield window
            if window.open:
                break
        self.state.resume_rng = None

    def _items(self, epoch: int, n: int | None) -> Iterator[Item]:
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # before the iterator exists, or every epoch repeats
        skip = self.state.batch_in_epoch
        restore_after = None
        if skip and self.state.epoch_rng is not None:
            restore_after = self.rng_snapshot()
            self.rng_restore(self.state.epoch_rng)
        else:
            self.state.epoch_rng = self.rng_snapshot()
        iterator = iter(self.loader)
        for _ in range(skip):
            next(iterator, None)
        if restore_after is not None:
            self.rng_restore(restore_after)
        index = self.position.batch = skip
        if n is not None:
            for batch in iterator:
                if index >= n:
                    return
                yield index, batch, index + 1 == n
                index = self.position.batch = index + 1
            return
        sentinel = object()
        batch = next(iterator, sentinel)
        while batch is not sentinel:
            self.position.batch = index + 1
            following = next(iterator, sentinel) if self.limit is None or index + 1 < self.limit else sentinel
            self.position.batch = index
            yield index, batch, following is sentinel
            batch = following
            index += 1

    # -- the RNG states a resume point holds -------------------------------------------------
    def _loader_generators(self) -> list[torch.Generator]:
        """Explicit generators the loader shuffles with (``DataLoader(generator=...)``): their
        states are part of the resume point, like the global RNGs."""
        loader = self.loader
        found: dict[int, torch.Generator] = {}
        for holder in (loader, getattr(loader, "sampler", None),
                       getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            gen = getattr(holder, "generator", None)
            if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
                found.setdefault(id(gen), gen)
        return list(found.values())

    def rng_capture(self) -> tuple[Any, ...]:
        """The RNG states a resume point holds, unconverted (cheap; :meth:`rng_snapshot` converts)."""
        return ckpt.capture_rng(), [g.get_state() for g in self._loader_generators()]

    def rng_snapshot(self, captured: tuple[Any, ...] | None = None) -> dict[str, Any]:
        """The RNG states now (or ``captured``'s, from :meth:`rng_capture`), as a checkpoint stores them."""
        global_states, generators = captured if captured is not None else self.rng_capture()
        states = ckpt.rng_states(global_states)
        states["loader_generators"] = generators
        return states

    def rng_restore(self, states: dict[str, Any]) -> None:
        ckpt.set_rng_states(states)
        for gen, state in zip(self._loader_generators(), states.get("loader_generators", [])):
            gen.set_state(state)
