"""A ``Trainer(devices=2)`` fit (the ddp plugin spawns 2 gloo ranks) that a test signals:
``python ddp_signal_run.py ROOT``.

Each rank writes ``ROOT/rank<r>.pid`` once it has finished optimizer step 3, then
``ROOT/teardown<r>.json`` from a ``trylast`` ``teardown_environment`` (it runs after the ddp
plugin's own), recording whether the process group is still initialised. Writing a checkpoint
takes 0.5 s (``on_save_checkpoint`` sleeps), as it does for a real model, and the launching
process reacts to Ctrl-C 0.2 s after its workers, as a busy one does: what the launcher does to
its workers while they save the last completed step is then deterministic, not a rare race.
The launching process exits with code 3 and one JSON line when the fit ends with
``KeyboardInterrupt``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import TinyNet, loader

import torchplug
from torchplug import Plugin, hookimpl


class Witness(Plugin):
    def __init__(self, root: str) -> None:
        self.root = root

    def on_train_batch_end(self, trainer: Any, batch_idx: int) -> None:
        if trainer.global_step == 3:
            Path(self.root, f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))

    def on_save_checkpoint(self, trainer: Any, checkpoint: dict[str, Any]) -> None:
        time.sleep(0.5)

    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        Path(self.root, f"exception{trainer.global_rank}.txt").write_text(f"{type(exception).__name__}: {exception}")

    @hookimpl(trylast=True)
    def teardown_environment(self, trainer: Any) -> None:
        report = {"pid": os.getpid(), "initialized": dist.is_available() and dist.is_initialized()}
        Path(self.root, f"teardown{trainer.global_rank}.json").write_text(json.dumps(report))


def late_interrupt(signum: int, frame: Any) -> None:
    time.sleep(0.2)
    raise KeyboardInterrupt


if __name__ == "__main__":
    from torchplug_ddp import DDPPlugin

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, late_interrupt)  # in this process only: spawned workers start afresh
    root = sys.argv[1]
    trainer = torchplug.Trainer(devices=2, max_steps=100_000, default_root_dir=root, enable_progress_bar=False,
                                autoload_plugins=False, log_every_n_steps=1,
                                plugins=[DDPPlugin(timeout=30), Witness(root)])
    try:
        trainer.fit(TinyNet(sleep=0.02), loader(n=8192))  # 512 steps per epoch: no epoch-end checkpoint
    except KeyboardInterrupt as exc:
        print(json.dumps({"interrupted": str(exc)}), flush=True)
        sys.exit(3)
    print(json.dumps({"interrupted": None}), flush=True)
