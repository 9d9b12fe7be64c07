"""Sharded strategies on two gloo ranks (CPU): ``Trainer(strategy="fsdp")`` and
``strategy="ddp_zero"`` against hand-written loops of the same (FSDP2 ``fully_shard`` on every
Linear and the root; DDP + ``ZeroRedundancyOptimizer``), and the optimizer state each rank holds.

Usage:
    python bench/sharded_step.py [--reps 5] [--quick]

Like ddp_step.py: two spawned processes join one gloo group through a FileStore, then run the
variants interleaved (ABBA); the Trainer finds the initialised group. Per-step time is rank 0's
steady-state window on the tiny MLP, SGD with momentum. Memory: the bytes of optimizer state
tensors on each rank after 2 Adam steps on the compute-bound MLP (512-2048-2048-10), for DDP,
ZeRO-1 and FSDP2, through the Trainer. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import _harness as h
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _tpbench import BenchModule
from torch.nn.parallel import DistributedDataParallel

import torchplug

WORLD = 2
STEPS, QUICK_STEPS = (30, 200), (3, 10)


def _hand_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, loader: h.TimedLoader, clip: float) -> None:
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()  # what the plugin returns: the global norm
        opt.step()
        opt.zero_grad(set_to_none=True)


def hand_fsdp(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in [m for m in net.modules() if isinstance(m, torch.nn.Linear)]:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    _hand_loop(net, torch.optim.SGD(net.parameters(), lr=h.LR, momentum=h.MOMENTUM), loader, clip)


def hand_zero(net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = DistributedDataParallel(net)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=h.LR, momentum=h.MOMENTUM)
    _hand_loop(model, opt, loader, clip)


def trainer_fit(strategy: str, net: torch.nn.Module, loader: h.TimedLoader, clip: float) -> None:
    trainer = torchplug.Trainer(accelerator="cpu", strategy=strategy, devices=WORLD, max_steps=loader.steps,
                                gradient_clip_val=clip, **h.QUIET)
    trainer.fit(BenchModule(net), train_dataloaders=loader)


GROUPS = {
    "fsdp": {"hand": hand_fsdp, "torchplug": functools.partial(trainer_fit, "fsdp"), "hand_aa": hand_fsdp},
    "zero": {"hand": hand_zero, "torchplug": functools.partial(trainer_fit, "ddp_zero"), "hand_aa": hand_zero},
}


class AdamModule(BenchModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class StateBytes(torchplug.Plugin):
    """Bytes of optimizer state tensors this rank holds at the end of the fit."""

    def __init__(self) -> None:
        self.bytes = 0

    def on_fit_end(self, trainer: Any) -> None:
        total = 0
        for opt in trainer.optimizers:
            local = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer: its shard's optimizer
            for state in local.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor) and t.ndim > 0:
                        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2: this rank's shard
                        total += t.numel() * t.element_size()
        self.bytes = total


def state_bytes(strategy: str) -> int:
    widths, batch = h.SIZES["compute"]
    probe = StateBytes()
    torch.manual_seed(0)
    trainer = torchplug.Trainer(accelerator="cpu", strategy=strategy, devices=WORLD, max_steps=2, plugins=[probe],
                                **h.QUIET)
    trainer.fit(AdamModule(h.make_mlp(widths)), train_dataloaders=h.make_batches(widths, batch, pool=2))
    return probe.bytes


def worker(rank: int, store_path: str, args: argparse.Namespace, out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        warmup, measure = QUICK_STEPS if args.quick else STEPS
        widths, batch = h.SIZES["tiny"]
        batches = h.make_batches(widths, batch, seed=rank)
        result: dict[str, Any] = {"steps": {}, "state_bytes": {}}
        for group, impls in GROUPS.items():
            def once(name: str, impls: dict[str, Any] = impls) -> float:
                torch.manual_seed(0)
                loader = h.TimedLoader(batches, warmup + measure + 1)
                dist.barrier()
                impls[name](h.make_mlp(widths), loader, args.clip)
                return loader.per_step(warmup, measure)

            result["steps"][group] = h.interleave(once, list(impls), 1 if args.quick else args.reps,
                                                  f"sharded_step {group}" if rank == 0 else "",
                                                  warmup=not args.quick)
        for strategy in ("ddp", "ddp_zero", "fsdp"):
            dist.barrier()
            result["state_bytes"][strategy] = state_bytes(strategy)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 repetition, a few steps")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result: dict[str, Any] = {"bench": "sharded_step", "world_size": WORLD, "backend": "gloo",
                              "reps": 1 if args.quick else args.reps, "clip": args.clip, "groups": {}, "rows": []}
    try:
        torchplug.Trainer(strategy="fsdp", devices=WORLD, **h.QUIET)
        torchplug.Trainer(strategy="ddp_zero", devices=WORLD, **h.QUIET)
    except Exception as exc:  # torchplug-fsdp or torchplug-ddp not installed
        result["skipped"] = f"{type(exc).__name__}: {exc}"
        h.emit(result)
        return
    with tempfile.TemporaryDirectory(prefix="bench-sharded-") as tmp:
        spawn: Any = mp.start_processes  # type: ignore[attr-defined]
        spawn(worker, args=(os.path.join(tmp, "store"), args, tmp), nprocs=WORLD, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]
    for group, samples in ranks[0]["steps"].items():
        stats = h.summarize(samples, "hand")
        result["groups"][group] = {"ms_per_step": stats}
        label = "fsdp (FSDP2 fully_shard)" if group == "fsdp" else "ddp_zero (DDP + ZeroRedundancyOptimizer)"
        result["rows"].append(h.row(f"step time tiny MLP, {label}, 2 gloo ranks (CPU)", "ms/step", stats, "hand",
                                    "torchplug", note="per rank; " + h.aa_note(stats)))
    result["state_bytes_per_rank"] = {s: [r["state_bytes"][s] for r in ranks] for s in ("ddp", "ddp_zero", "fsdp")}
    h.emit(result)


if __name__ == "__main__":
    main()
