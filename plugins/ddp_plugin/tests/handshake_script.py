"""Run by test_handshake.py as one rank of a 2-rank gloo group, with its own PYTHONPATH (so each
rank may see another version of the test plugin ``probe``): init the group, fit, report."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from ddp_test_support import Regressor, loader, quiet

from torchplug import PlanMismatchError, Trainer
from torchplug_ddp import DDPPlugin

if __name__ == "__main__":
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=10))
    started = time.monotonic()
    result: dict[str, object] = {"rank": rank, "error": None}
    try:
        trainer = Trainer(**quiet(plugins=["probe", DDPPlugin(timeout=10)], max_steps=2))
        result["fingerprint"] = trainer.plan.fingerprint
        trainer.fit(Regressor(), loader(4))
        result["global_step"] = trainer.global_step
    except PlanMismatchError as exc:
        result.update(error=str(exc), error_type=type(exc).__name__)
    finally:
        result["seconds_from_init"] = time.monotonic() - started
        dist.destroy_process_group()
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)
