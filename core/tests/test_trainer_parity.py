"""Trainer.fit against a hand-written PyTorch loop: bit-identical parameters (fp32, CPU).

The hand loop is the documented algorithm written out in plain PyTorch: the loss of each
micro-batch divided by its window's length (the last window of an epoch may be shorter),
``clip_grad_norm_`` over the model's parameters, ``step``, ``zero_grad(set_to_none=True)``,
step-interval schedulers after every optimizer step, epoch-interval ones after every epoch,
validation (eval mode, no_grad) at every epoch's end. Both sides start from the same seed, so
shuffling and dropout draw the same random numbers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn


def hand_loop(model: nn.Module, train: Any, val: Any, max_steps: int, accumulate: int, clip: float,
              sched: str | None, make_optimizers: Any) -> torch.optim.Optimizer:
    config = make_optimizers(model, model.lr, sched)
    step_scheds: list[Any] = []
    epoch_scheds: list[Any] = []
    if isinstance(config, torch.optim.Optimizer):
        opt = config
    elif isinstance(config, dict):
        opt = config["optimizer"]
        step_scheds.append(config["lr_scheduler"]["scheduler"])
    else:
        (opt,), scheds = config
        for s in scheds:
            (step_scheds if isinstance(s, dict) else epoch_scheds).append(s["scheduler"] if isinstance(s, dict) else s)
    step = 0
    model.train()
    while True:
        n = len(train)
        for i, (x, y) in enumerate(train):
            start = i - i % accumulate
            window = min(accumulate, n - start)
            loss = nn.functional.cross_entropy(model(x), y)
            (loss / window).backward()
            if i + 1 == start + window:
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                for s in step_scheds:
                    s.step()
                step += 1
                if step == max_steps:
                    return opt
        if val is not None:
            model.eval()
            with torch.no_grad():
                for x, _ in val:
                    model(x)
            model.train()
        for s in epoch_scheds:
            s.step()


CASES = [
    # accumulate, clip, scheduler, dict loss, validation
    pytest.param(1, 0.0, None, False, False, id="plain"),
    pytest.param(3, 0.0, None, False, False, id="accumulate3"),
    pytest.param(1, 0.5, None, False, False, id="clip"),
    pytest.param(3, 0.5, None, False, False, id="accumulate3-clip"),
    pytest.param(3, 0.5, "both", False, True, id="accumulate3-clip-schedulers-validation"),
    pytest.param(2, 0.3, "step", True, False, id="accumulate2-clip-stepLR-dictloss"),
]


@pytest.mark.parametrize(("accumulate", "clip", "sched", "dict_loss", "with_val"), CASES)
def test_fit_matches_hand_loop_bit_for_bit(tp: Any, make_trainer: Any, accumulate: int, clip: float,
                                           sched: str | None, dict_loss: bool, with_val: bool) -> None:
    # 56 samples, batch 8: 7 batches per epoch; accumulate 3 gives windows 3, 3, 1.
    per_epoch = -(-7 // accumulate)
    max_steps = 2 * per_epoch + 2  # two full epochs and part of a third
    val = tp.loader(n=24, shuffle=False, seed=1) if with_val else None

    torch.manual_seed(1234)
    trained = tp.fresh_net(sched=sched, dict_loss=dict_loss)
    trainer = make_trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
                           logger=False, enable_checkpointing=False)
    trainer.fit(trained, tp.loader(), val)

    torch.manual_seed(1234)
    reference = tp.fresh_net(sched=sched)
    opt = hand_loop(reference, tp.loader(), tp.loader(n=24, shuffle=False, seed=1) if with_val else None,
                    max_steps, accumulate, clip, sched, tp.make_optimizers)

    assert trainer.global_step == max_steps
    assert trainer.current_epoch == 2
    for (name, a), b in zip(trained.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), f"{name} differs by up to {(a - b).abs().max().item():.3g}"
    # The optimizer state (momentum) and learning rate are the same too.
    mine = trainer.optimizers[0]
    for p_mine, p_ref in zip(trained.parameters(), reference.parameters()):
        assert torch.equal(mine.state[p_mine]["momentum_buffer"], opt.state[p_ref]["momentum_buffer"])
    assert mine.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert all(p.grad is None for p in trained.parameters())  # zero_grad(set_to_none=True)


def test_clipping_and_accumulation_change_the_result(tp: Any, make_trainer: Any) -> None:
    """The parity cases above are not vacuous: clipping and accumulation do change the weights."""
    results = []
    for accumulate, clip in ((1, 0.0), (1, 0.5), (3, 0.0)):
        torch.manual_seed(0)
        model = tp.fresh_net()
        make_trainer(max_steps=5, accumulate_grad_batches=accumulate, gradient_clip_val=clip, logger=False,
                     enable_checkpointing=False).fit(model, tp.loader())
        results.append(model)
    assert not tp.params_equal(results[0], results[1])
    assert not tp.params_equal(results[0], results[2])


def test_unsized_loader_steps_its_last_partial_window(tp: Any, make_trainer: Any) -> None:
    """A loader without len(): the last batch is found by reading one ahead, so a partial
    window still steps and no gradient leaks into the next epoch."""

    class Unsized:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __iter__(self) -> Any:
            return iter(self.inner)

    torch.manual_seed(0)
    model = tp.fresh_net(dropout=0.0)
    trainer = make_trainer(max_epochs=2, accumulate_grad_batches=3, logger=False, enable_checkpointing=False)
    trainer.fit(model, Unsized(tp.loader(shuffle=False)))
    assert trainer.global_step == 2 * 3  # windows 3, 3, 1 per epoch
    assert trainer.current_epoch == 2
    assert all(p.grad is None for p in model.parameters())
