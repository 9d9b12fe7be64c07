"""SIGKILL a checkpoint writer at random moments: ``python ckpt_kill_harness.py PATH ROUNDS SEED``.

Each round forks a child that rewrites ``PATH`` with :func:`torchplug.checkpoint.save` in a
loop (a 16 MB tensor: most of its time is spent inside a write), kills it with SIGKILL after a
random delay, and reads ``PATH`` back with :func:`torchplug.checkpoint.load`. Prints one JSON
line: per round, the step that loaded, whether the tensor is intact and the other files left
in the folder. fork is used so that torch is imported once, not once per round; the children
never run a parallel torch kernel (one thread, no arithmetic), which is what fork would break.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from torchplug import checkpoint as ckpt  # noqa: E402

BIG = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB


def payload(step: int) -> dict[str, object]:
    return {"torchplug_checkpoint": 1, "state_dict": {"w": BIG}, "optimizer_states": [],
            "global_step": step, "epoch": 0}


def main() -> None:
    path, rounds, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    ckpt.save(payload(0), path)
    results = []
    for r in range(rounds):
        pid = os.fork()
        if pid == 0:  # the writer: never returns
            step = (r + 1) * 1_000_000
            try:
                while True:
                    step += 1
                    ckpt.save(payload(step), path)
            finally:
                os._exit(1)
        delay = rng.uniform(0.0, 0.4)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        data = ckpt.load(path)  # must not raise: the previous or a newer complete checkpoint
        results.append({
            "delay": round(delay, 3),
            "step": int(data["global_step"]),
            "intact": bool(torch.equal(data["state_dict"]["w"], BIG)),
            "others": sorted(p.name for p in path.parent.iterdir() if p != path),
        })
    print(json.dumps(results))


if __name__ == "__main__":
    main()
