"""Step time with Lightning-style module hooks defined: ``torchplug.Trainer`` calling the
module's hooks against a hand loop that calls the same methods itself.

Usage:
    python bench/module_hooks_overhead.py [--reps 9] [--quick]
    python bench/module_hooks_overhead.py --count-calls   # Python calls per step, hand loop vs Trainer

The tiny MLP 32-64-10 at batch 32 (the loop's own cost dominates, so the hooks' dispatch shows).
The module defines the per-step hooks a Lightning user writes (``on_train_batch_start``,
``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``,
``on_before_zero_grad``, ``on_train_batch_end``), each doing the same small piece of work (a
counter); the hand loop calls each of them at the same place in its step. Timing, interleaving
and the A/A check are loop_overhead.py's. Target: <= 1.05x the hand loop (issue 14). The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import _harness as h
import torch
from _tpbench import BenchModule

import torchplug

STEPS = (50, 500)  # (warmup, measure)
QUICK_STEPS = (5, 30)
TARGET = 1.05


HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
         "on_before_zero_grad", "on_train_batch_end")


class HookedModule(BenchModule):
    """BenchModule with the per-step module hooks, each counting its calls."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__(net)
        self.calls = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.calls += 1

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.calls += 1

    def on_after_backward(self) -> None:
        self.calls += 1

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls += 1

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.calls += 1


def fit_hand(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    module = HookedModule(net)
    opt = module.configure_optimizers()
    module.train()
    for batch_idx, batch in enumerate(loader):
        module.on_train_batch_start(batch, batch_idx)
        loss = module.training_step(batch, batch_idx)
        module.on_before_backward(loss)
        loss.backward()  # type: ignore[no-untyped-call]
        module.on_after_backward()
        module.on_before_optimizer_step(opt)
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        module.on_before_zero_grad(opt)
        opt.zero_grad(set_to_none=True)
        module.on_train_batch_end(loss, batch, batch_idx)
    check_calls(module, loader, "hand loop")


def fit_trainer(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    trainer = torchplug.Trainer(accelerator="cpu", max_steps=loader.steps, gradient_clip_val=clip, **h.QUIET)
    module = HookedModule(net)
    trainer.fit(module, train_dataloaders=loader)
    check_calls(module, loader, "Trainer")


def check_calls(module: HookedModule, loader: h.TimedLoader, who: str) -> None:
    """Both variants did the same work: every hook ran once per step."""
    if module.calls != len(HOOKS) * loader.steps:
        raise SystemExit(f"{who}: {module.calls} hook calls for {loader.steps} steps, expected "
                         f"{len(HOOKS) * loader.steps}")


IMPLS = {"hand": fit_hand, "hand_aa": fit_hand, "torchplug": fit_trainer}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 9, 1 quick)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: proves the script runs; not a measurement")
    parser.add_argument("--count-calls", action="store_true",
                        help="count Python calls per step, hand loop and Trainer (noise-free)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.count_calls:
        from loop_overhead import calls_per_step

        hand, trainer = calls_per_step(fit_hand, 1.0), calls_per_step(fit_trainer, 1.0)
        print(f"Python calls per step: hand loop {hand:.0f}, Trainer {trainer:.0f}")
        return
    reps = args.reps if args.reps is not None else (1 if args.quick else 9)
    warmup, measure = QUICK_STEPS if args.quick else STEPS
    widths, batch = h.SIZES["tiny"]
    batches = h.make_batches(widths, batch)

    def once(name: str) -> float:
        torch.manual_seed(0)
        loader = h.TimedLoader(batches, warmup + measure + 1)
        IMPLS[name](h.make_mlp(widths), loader, 1.0)
        return loader.per_step(warmup, measure)

    samples = h.interleave(once, ["hand", "torchplug", "hand_aa"], reps, label="module_hooks", warmup=not args.quick)
    stats = h.summarize(samples, "hand")
    row = h.row(f"step time tiny MLP {'-'.join(map(str, widths))} batch {batch} with six per-step module hooks "
                "(hand loop: calls the same hooks)", "ms/step", stats, "hand", "torchplug", TARGET,
                note=h.aa_note(stats))
    print(f"\nhand {stats['hand']['median']:.4f} ms, torchplug {stats['torchplug']['median']:.4f} ms, "
          f"ratio {stats['torchplug']['ratio_paired']:.3f}x (<= {TARGET}), A/A {stats['hand_aa']['ratio_paired']:.3f}",
          flush=True)
    result: dict[str, Any] = {"bench": "module_hooks_overhead", "quick": args.quick, "reps": reps, "stats": stats,
                              "rows": [row]}
    h.emit(result)


if __name__ == "__main__":
    main()
