"""Step time with the everyday callbacks on: ``torchplug.Trainer`` with EarlyStopping,
ModelCheckpoint and the TensorBoard logger against a hand loop writing the same TensorBoard
scalars.

Usage:
    python bench/callbacks_overhead.py [--reps 9] [--quick]

The tiny MLP 32-64-10 at batch 32 (the loop's own cost dominates, so callback overhead shows).
Both variants log ``train_loss`` to TensorBoard every 50 steps at its global step (the Trainer's
default ``log_every_n_steps``; the hand loop with ``SummaryWriter.add_scalar(loss.item())``);
the Trainer also runs ``EarlyStopping(monitor="train_loss")`` and
``ModelCheckpoint(monitor="train_loss")``, which act at the epoch's end, outside the timed
window, as the checkpoints do. Timing, interleaving and the A/A check are loop_overhead.py's.
Target: <= 1.08x the hand loop. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import _harness as h
import torch
import torch.nn.functional as F
from _tpbench import LoggingBenchModule
from torch.utils.tensorboard import SummaryWriter

import torchplug
from torchplug.callbacks import EarlyStopping, ModelCheckpoint

STEPS = (50, 500)  # (warmup, measure)
QUICK_STEPS = (5, 30)
LOG_EVERY = 50
TARGET = 1.08


def fit_hand(net: torch.nn.Module, loader: h.TimedLoader, root: Path) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=h.LR, momentum=h.MOMENTUM)
    writer = SummaryWriter(log_dir=str(root / "hand"))
    net.train()
    for step, (x, y) in enumerate(loader, start=1):
        loss = F.cross_entropy(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % LOG_EVERY == 0:
            writer.add_scalar("train_loss", loss.item(), step)
    writer.close()


def fit_trainer(net: torch.nn.Module, loader: h.TimedLoader, root: Path) -> None:
    from torchplug_tensorboard import TensorBoardLogger

    trainer = torchplug.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=True, enable_progress_bar=False,
        default_root_dir=root, autoload_plugins=False, log_every_n_steps=LOG_EVERY,
        callbacks=[EarlyStopping(monitor="train_loss"), ModelCheckpoint(dirpath=root / "best", monitor="train_loss"),
                   TensorBoardLogger(log_dir=root / "tb")])
    trainer.fit(LoggingBenchModule(net), train_dataloaders=loader)


IMPLS = {"hand": fit_hand, "hand_aa": fit_hand, "torchplug": fit_trainer}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 9, 1 quick)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: proves the script runs; not a measurement")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    reps = args.reps if args.reps is not None else (1 if args.quick else 9)
    warmup, measure = QUICK_STEPS if args.quick else STEPS
    widths, batch = h.SIZES["tiny"]
    batches = h.make_batches(widths, batch)

    def once(name: str) -> float:
        torch.manual_seed(0)
        net = h.make_mlp(widths)
        loader = h.TimedLoader(batches, warmup + measure + 1)
        with tempfile.TemporaryDirectory() as root:
            IMPLS[name](net, loader, Path(root))
        return loader.per_step(warmup, measure)

    samples = h.interleave(once, ["hand", "torchplug", "hand_aa"], reps, label="callbacks", warmup=not args.quick)
    stats = h.summarize(samples, "hand")
    row = h.row(f"step time tiny MLP {'-'.join(map(str, widths))} batch {batch} with EarlyStopping + "
                "ModelCheckpoint + TensorBoard (hand loop: the same TensorBoard scalars)", "ms/step", stats, "hand",
                "torchplug", TARGET, note=h.aa_note(stats))
    print(f"\nhand {stats['hand']['median']:.4f} ms, torchplug {stats['torchplug']['median']:.4f} ms, "
          f"ratio {stats['torchplug']['ratio_paired']:.3f}x (<= {TARGET}), A/A {stats['hand_aa']['ratio_paired']:.3f}",
          flush=True)
    result: dict[str, Any] = {"bench": "callbacks_overhead", "quick": args.quick, "reps": reps, "stats": stats,
                              "rows": [row]}
    h.emit(result)


if __name__ == "__main__":
    main()
