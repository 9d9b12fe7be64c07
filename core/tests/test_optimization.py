"""Lightning 1.x optimization on the module, against hand-written loops (bit-exact, fp32, CPU):
two optimizers with ``optimizer_idx`` (a GAN), the module's ``optimizer_step`` and
``optimizer_zero_grad`` overrides, and manual optimization (also under fp16 native AMP)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchplug
from torchplug import MisconfigurationError


def gan_data(n: int = 32, batch_size: int = 8) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g) + 2.0), batch_size=batch_size)


class GAN(torchplug.TrainingModule):
    """Generator noise(3) → 4, discriminator 4 → 1; Adam for each, Lightning 1.1's GAN example."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
        self.disc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def losses(self, real: torch.Tensor, noise: torch.Tensor, optimizer_idx: int) -> torch.Tensor:
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        bce = nn.functional.binary_cross_entropy_with_logits
        if optimizer_idx == 0:  # generator: fool the discriminator
            return bce(self.disc(self.gen(noise)), ones)
        fake = self.gen(noise).detach()
        return (bce(self.disc(real), ones) + bce(self.disc(fake), zeros)) / 2

    def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int) -> torch.Tensor:
        (real,) = batch
        noise = torch.randn(len(real), 3, generator=torch.Generator().manual_seed(batch_idx))
        return self.losses(real, noise, optimizer_idx)

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.gen.parameters(), lr=0.01), torch.optim.Adam(self.disc.parameters(), lr=0.01)]


def hand_gan(epochs: int) -> GAN:
    """Each optimizer steps on its own loss; the other optimizer's parameters get no gradient."""
    model = GAN()
    optimizers = model.configure_optimizers()
    for _ in range(epochs):
        for batch_idx, (real,) in enumerate(gan_data()):
            noise = torch.randn(len(real), 3, generator=torch.Generator().manual_seed(batch_idx))
            for idx, opt in enumerate(optimizers):
                others = [p for i, o in enumerate(optimizers) if i != idx for g in o.param_groups for p in g["params"]]
                for p in others:
                    p.requires_grad_(False)
                model.losses(real, noise, idx).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                for p in others:
                    p.requires_grad_(True)
    return model


def test_two_optimizers_with_optimizer_idx_equal_a_hand_loop_bit_for_bit(tp: Any, make_trainer: Any) -> None:
    seen: list[Any] = []

    class Recorded(GAN):
        def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int) -> torch.Tensor:
            seen.append((optimizer_idx, self.gen[0].weight.requires_grad, self.disc[0].weight.requires_grad))
            return super().training_step(batch, batch_idx, optimizer_idx)

        def training_epoch_end(self, outputs: list[Any]) -> None:
            seen.append(("epoch_end", [len(per_opt) for per_opt in outputs]))

    model = Recorded()
    trainer = make_trainer(max_epochs=2, logger=False, enable_checkpointing=False)
    trainer.fit(model, gan_data())
    assert tp.params_equal(model, hand_gan(epochs=2))
    assert trainer.global_step == 8  # one step per batch, as in Lightning 1.x
    assert seen[:2] == [(0, True, False), (1, False, True)]  # only the stepping optimizer's params need grad
    assert ("epoch_end", [4, 4]) in seen
    assert all(p.requires_grad for p in model.parameters())


def test_on_before_optimizer_step_gets_the_optimizer_and_its_index_as_the_module_asks(make_trainer: Any) -> None:
    """Lightning 1.x's (optimizer, optimizer_idx) and 2.x's (optimizer), with two optimizers."""
    seen: list[Any] = []

    class OneX(GAN):
        def on_before_optimizer_step(self, optimizer: Any, optimizer_idx: int) -> None:
            seen.append(("1.x", self.trainer.optimizers.index(optimizer), optimizer_idx))

    class TwoX(GAN):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            seen.append(("2.x", self.trainer.optimizers.index(optimizer)))

    for model in (OneX(), TwoX()):
        make_trainer(max_steps=2, logger=False, enable_checkpointing=False).fit(model, gan_data())
    assert seen == [("1.x", 0, 0), ("1.x", 1, 1)] * 2 + [("2.x", 0), ("2.x", 1)] * 2


def test_module_optimizer_step_and_zero_grad_overrides(tp: Any, make_trainer: Any) -> None:
    """Lightning 1.1's LR warm-up override: set the LR, then optimizer.step(closure=...)."""
    calls: list[Any] = []

    class WarmUp(tp.Net):  # type: ignore[misc, name-defined]
        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_idx: int,
                           optimizer_closure: Any = None, on_tpu: bool = False, using_native_amp: bool = False,
                           using_lbfgs: bool = False) -> None:
            for group in optimizer.param_groups:
                group["lr"] = 0.1 * min(1.0, (self.trainer.global_step + 1) / 4)
            optimizer.step(closure=optimizer_closure)

        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_idx: int) -> None:
            calls.append((epoch, batch_idx, optimizer_idx))
            optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)  # the weights tp.fresh_net gives
    model = WarmUp(dropout=0.0)
    make_trainer(max_epochs=1, logger=False, enable_checkpointing=False).fit(model, tp.loader(shuffle=False))
    hand = tp.fresh_net(dropout=0.0)
    opt = hand.configure_optimizers()
    for step, (x, y) in enumerate(tp.loader(shuffle=False)):
        for group in opt.param_groups:
            group["lr"] = 0.1 * min(1.0, (step + 1) / 4)
        nn.functional.cross_entropy(hand(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert tp.params_equal(model, hand)
    assert calls == [(0, i, 0) for i in range(7)]


class Manual(torchplug.TrainingModule):
    automatic_optimization = False

    def __init__(self, overflow_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)
        self.overflow_at = overflow_at
        self.record: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.lin(x).float(), y)
        if batch_idx == self.overflow_at:
            loss = loss * float("inf")
        opt.zero_grad()
        before = self.lin.weight.detach().clone()
        self.manual_backward(loss)
        opt.step()
        scaler = getattr(self.trainer.plugin_for("precision"), "scaler", None)
        self.record.append((torch.equal(before, self.lin.weight), scaler.get_scale() if scaler else None))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manual_optimization_equals_a_hand_loop(tp: Any, make_trainer: Any) -> None:
    model = Manual()
    trainer = make_trainer(max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(model, tp.loader(shuffle=False))
    hand = Manual()
    opt = hand.configure_optimizers()
    for x, y in tp.loader(shuffle=False):
        opt.zero_grad()
        nn.functional.cross_entropy(hand.lin(x), y).backward()
        opt.step()
    assert tp.params_equal(model, hand)
    assert trainer.global_step == 7


def test_manual_optimization_under_fp16_native_amp_skips_an_overflowing_step(make_trainer: Any, tp: Any) -> None:
    pytest.importorskip("torchplug_native_amp")
    model = Manual(overflow_at=2)
    trainer = make_trainer(precision=16, accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(model, tp.loader(shuffle=False))
    unchanged = [r[0] for r in model.record]
    scales = [r[1] for r in model.record]
    assert unchanged == [False, False, True, False, False, False, False]  # step 2 skipped: weights unchanged
    assert scales[2] == scales[1] / 2  # and the scale halved
    assert trainer.callback_metrics["skipped_steps"] == 1.0


def test_manual_optimization_refuses_accumulation_and_clipping_before_any_work(tp: Any, make_trainer: Any) -> None:
    for kwargs in ({"accumulate_grad_batches": 2}, {"gradient_clip_val": 1.0}):
        with pytest.raises(MisconfigurationError, match="automatic_optimization = False"):
            make_trainer(max_epochs=1, **kwargs).fit(Manual(), tp.loader())
