"""GPU check: what the torchplug plugins do on a real CUDA device, in one run of under 4 minutes.

Usage (on a GPU machine, after ``pip install -e core -e plugins/native_amp -e plugins/ddp_plugin
-e plugins/apex_plugin``; NVIDIA apex tag 25.05's ``apex/`` folder on PYTHONPATH for the apex part)::

    PYTHONPATH=third_party/apex-25.05 python scripts/gpu_check.py --out $OUT/gpu_check.json

Sections, each in its own try/except and time budget (one failing or running out of time never
loses the others; the JSON is rewritten after every section):

* ``native_amp_dtype``: the autocast dtype seen inside ``training_step`` with
  ``Trainer(precision=16)`` and ``precision="bf16"`` (fp16 / bf16 expected);
* ``native_amp_overflow``: fp16, an inf injected into the gradients of one step: that step is
  skipped (parameters unchanged), the loss scale halves, the next step trains, the Trainer counts
  one skipped step;
* ``host_syncs``: per step, the host reads seen from Python (``torchplug.testing.syncs``) and the
  synchronising CUDA calls (``torch.cuda.set_sync_debug_mode``) of the Trainer in fp32, bf16 and
  fp16, each against a hand-written loop: the Trainer must not make more;
* ``native_amp_speed``: step time, Trainer vs a hand-written autocast (+ GradScaler for fp16)
  loop, fp16 and bf16, on a tiny MLP (32-64-10, batch 32) and a large one (4 x 4096 at batch
  4096), plus a strict-fp32 large baseline (TF32 off, stated in the JSON);
* ``ddp_one_rank``: a one-rank NCCL process group (FileStore in a temporary folder);
  ``Trainer(strategy="ddp")`` must NOT wrap the model at world size 1; its step time against an
  unwrapped hand loop and a hand loop wrapped in DDP;
* ``apex``: real NVIDIA apex O1 and O2 through ``Trainer(precision=16, amp_backend="apex")``
  against a hand-written apex loop (``amp.initialize``, ``amp.scale_loss``, step), when
  ``apex.amp`` is importable; "skipped (apex not importable)" otherwise;
* ``apex_pytest``: ``pytest plugins/apex_plugin/tests -m gpu`` when that folder exists.

Timing: pre-built batches on the device; a loader notes the time at each batch fetch and calls
``torch.cuda.synchronize()`` before the two stamps that bound the steady-state window; one
discarded warm-up fit per variant, then repetitions interleaved ABBA; median and paired ratio.

Without CUDA the script exits with status 2 and says so; ``--allow-cpu`` runs the same sections
on the CPU (fp16/bf16 CPU autocast, GradScaler("cpu"), a one-rank gloo group, apex skipped) as a
dry run of the script's own logic. ``--quick`` shortens everything.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "CUDA is not available: this script checks GPU behaviour; run it on a GPU machine"
LR, MOMENTUM = 0.01, 0.9


class TimeBudget(Exception):
    """A section ran out of its share of the run's time."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sub(self, seconds: float) -> Budget:
        return Budget(max(0.0, min(seconds, self.left())))

    def check(self) -> None:
        if self.left() <= 0:
            raise TimeBudget("time budget")


# ------------------------------------------------------------------------------ shared parts
def make_mlp(widths: Sequence[int], device: Any) -> Any:
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    with torch.device(device):  # initialise on the device: no 268 MB host-to-device copy per fit
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_batches(widths: Sequence[int], batch: int, device: Any, pool: int = 4) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, widths[0], generator=g).to(device),
             torch.randint(0, widths[-1], (batch,), generator=g).to(device)) for _ in range(pool)]


class TimedLoader:
    """``steps`` batches from a pool; notes the time at each fetch, synchronising the device
    first at the window's two ends so queued GPU work is inside the window."""

    def __init__(self, batches: list[Any], warmup: int, measure: int, sync: Callable[[], None]) -> None:
        self.batches, self.warmup, self.measure, self.sync = batches, warmup, measure, sync
        self.steps = warmup + measure + 1
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        self.stamps = []
        for i in range(self.steps):
            if i in (self.warmup, self.warmup + self.measure):
                self.sync()
            self.stamps.append(time.perf_counter())
            yield self.batches[i % len(self.batches)]

    def per_step(self) -> float:
        if len(self.stamps) < self.steps:
            raise RuntimeError(f"the loop fetched {len(self.stamps)} batches, expected {self.steps}")
        return (self.stamps[self.warmup + self.measure] - self.stamps[self.warmup]) / self.measure


def timed_variants(variants: dict[str, Callable[[TimedLoader], Any]], make_loader: Callable[[], TimedLoader],
                   reps: int, budget: Budget) -> dict[str, Any]:
    """Warm-up once per variant, then up to ``reps`` ABBA repetitions while the budget lasts."""
    names = list(variants)
    for name in names:
        budget.check()
        variants[name](make_loader())
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        if rep and budget.left() <= 0:
            break
        for name in names if rep % 2 == 0 else names[::-1]:
            loader = make_loader()
            variants[name](loader)
            samples[name].append(loader.per_step())
    base = names[0]
    out: dict[str, Any] = {"reps": len(samples[base])}
    if not samples[base]:
        raise TimeBudget("time budget")
    base_med = statistics.median(samples[base])
    for name in names:
        med = statistics.median(samples[name])
        paired = [a / b for a, b in zip(samples[name], samples[base])]
        out[name] = {"ms_median": round(med * 1e3, 4), "ms_min": round(min(samples[name]) * 1e3, 4),
                     "ms_max": round(max(samples[name]) * 1e3, 4), f"ratio_vs_{base}": round(med / base_med, 4),
                     f"ratio_vs_{base}_paired": round(statistics.median(paired), 4)}
    return out


def trainer_module(net: Any) -> Any:
    """The hand loops' model as a TrainingModule; ``forward`` exists so apex O2's input cast
    (it patches the top module's forward) applies, as in Lightning."""
    import torch.nn.functional as F

    import torchplug

    class CheckModule(torchplug.TrainingModule):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.net = inner
            self.seen: dict[str, Any] = {}

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            out = self(x)
            if not self.seen:
                self.seen = {"output_dtype": str(out.dtype).replace("torch.", ""),
                             "param_dtype": str(next(self.net.parameters()).dtype).replace("torch.", "")}
            hook = getattr(self, "inject", None)
            if hook is not None:
                hook(out, batch_idx)
            loss = F.cross_entropy(out, y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            import torch

            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    return CheckModule(net)


def observer() -> Any:
    """A plugin that notes what the loop hands to the hooks (the model it steps, param dtype)."""
    import torchplug

    class Observer(torchplug.Plugin):
        plugin_name = "gpu_check_observer"

        def __init__(self) -> None:
            self.stepped_model: str | None = None
            self.batch_end: list[Callable[[Any, int], None]] = []

        def on_before_forward(self, model: Any) -> None:
            if self.stepped_model is None:
                self.stepped_model = f"{type(model).__module__}.{type(model).__qualname__}"

        def on_train_batch_end(self, trainer: Any, batch_idx: int) -> None:
            for callback in self.batch_end:
                callback(trainer, batch_idx)

    return Observer()


QUIET: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
#: entry-point name -> (module, class): used when a plugin is importable but has no entry point
#: (its folder is on PYTHONPATH instead of pip-installed), so the check still runs.
PLUGIN_CLASSES = {"native_amp": ("torchplug_native_amp", "NativeAMPPlugin"), "ddp": ("torchplug_ddp", "DDPPlugin"),
                  "apex": ("torchplug_apex", "ApexPlugin")}
PLUGIN_SOURCES: dict[str, str] = {}


def make_trainer(ctx: Ctx, **kwargs: Any) -> Any:
    """``Trainer(accelerator=<the device>, no logger/checkpoints/progress bar, **kwargs)``."""
    import importlib

    import torchplug
    from torchplug import discovery

    wanted = []
    if kwargs.get("precision", 32) not in (32, "32"):
        wanted.append("apex" if kwargs.get("amp_backend") == "apex" else "native_amp")
    if kwargs.get("strategy") == "ddp":
        wanted.append("ddp")
    plugins = list(kwargs.pop("plugins", []))
    for name in wanted:
        if discovery.find(name) is not None:
            PLUGIN_SOURCES[name] = "entry point"
            continue
        module, cls = PLUGIN_CLASSES[name]
        plugins.append(getattr(importlib.import_module(module), cls)())
        PLUGIN_SOURCES[name] = f"{module}.{cls} imported directly (no entry point: the plugin is not pip-installed)"
    return torchplug.Trainer(accelerator=ctx.accelerator, plugins=plugins, **kwargs, **QUIET)


class Ctx:
    """What every section needs: device, sizes, reps, sync."""

    def __init__(self, device: str, quick: bool) -> None:
        import torch

        self.device = device
        self.cuda = device == "cuda"
        self.quick = quick
        self.accelerator = "cuda" if self.cuda else "cpu"
        self.sync: Callable[[], None] = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.reps = (3 if quick else 5) if self.cuda else (2 if quick else 3)
        self.tiny = ((32, 64, 10), 32)
        # The dry run on a CPU keeps the "large" model small: it checks logic, not speed.
        self.large = ((4096,) * 5, 4096) if self.cuda else ((256,) * 5, 128)
        tiny_steps = (10, 40) if quick else (20, 200)
        large_steps = (3, 10) if quick else (10, 50)
        fp32_steps = (2, 4) if quick else (3, 12)
        if not self.cuda:
            tiny_steps, large_steps, fp32_steps = (2, 5), (1, 2), (1, 2)
            torch.set_num_threads(1)  # a dry run: steady, not fast
        self.steps = {"tiny": tiny_steps, "large": large_steps, "large_fp32": fp32_steps,
                      # apex O1 wraps every torch function in Python: fewer steps keep it in budget
                      "apex_tiny": (tiny_steps[0], min(tiny_steps[1], 100)),
                      "apex_large": (large_steps[0], min(large_steps[1], 30))}


def plugin_of(trainer: Any, role: str) -> Any:
    return trainer.plugin_for(role)


def find_scaler(plugin: Any) -> Any:
    import torch

    for value in vars(plugin).values():
        if isinstance(value, torch.amp.GradScaler):
            return value
    return None


# ----------------------------------------------------------------------------------- sections
def section_native_amp_dtype(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    widths, batch = ctx.tiny
    result: dict[str, Any] = {}
    ok = True
    for precision, expected in ((16, "float16"), ("bf16", "bfloat16")):
        budget.check()
        module = trainer_module(make_mlp(widths, ctx.device))
        trainer = make_trainer(ctx, precision=precision, max_steps=2)
        trainer.fit(module, train_dataloaders=make_batches(widths, batch, ctx.device, pool=2))
        seen = module.seen["output_dtype"]
        good = seen == expected
        ok &= good
        result[f"precision={precision}"] = {"autocast_dtype_in_training_step": seen, "expected": expected,
                                            "ok": good, "plugins": trainer.plugin_names,
                                            "param_dtype": module.seen["param_dtype"]}
    result["status"] = "ok" if ok else "failed"
    return result


def section_native_amp_overflow(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    import torch

    widths, batch = ctx.tiny
    inject_at = 2
    module = trainer_module(make_mlp(widths, ctx.device))

    def inject(out: Any, batch_idx: int) -> None:
        if batch_idx == inject_at:  # the loss stays finite; its gradient becomes inf
            out.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    module.inject = inject
    obs = observer()
    history: dict[int, dict[str, Any]] = {}

    def note(trainer: Any, batch_idx: int) -> None:
        scaler = find_scaler(plugin_of(trainer, "precision"))
        history[batch_idx] = {
            "params": [p.detach().clone() for p in module.parameters()],
            "scale": float(scaler.get_scale()) if scaler is not None else None,
        }

    obs.batch_end.append(note)
    trainer = make_trainer(ctx, precision=16, max_steps=inject_at + 2, plugins=[obs], log_every_n_steps=1)
    budget.check()
    trainer.fit(module, train_dataloaders=make_batches(widths, batch, ctx.device, pool=4))
    before, at, after = history[inject_at - 1], history[inject_at], history[inject_at + 1]
    unchanged = all(torch.equal(a, b) for a, b in zip(before["params"], at["params"]))
    trained_after = any(not torch.equal(a, b) for a, b in zip(at["params"], after["params"]))
    halved = before["scale"] is not None and at["scale"] == before["scale"] / 2
    skipped = trainer.callback_metrics.get("skipped_steps")
    ok = unchanged and halved and trained_after and skipped == 1
    return {
        "status": "ok" if ok else "failed",
        "injected_at_batch": inject_at,
        "params_unchanged_on_skip": unchanged,
        "scale_before": before["scale"], "scale_after_skip": at["scale"], "scale_halved": halved,
        "trains_after_skip": trained_after,
        "skipped_steps_metric": skipped,
        "plugins": trainer.plugin_names,
    }


def _hand_amp(ctx: Ctx, widths: Sequence[int], dtype: Any, scaler_on: bool, wrap: Callable[[Any], Any] | None = None
              ) -> Callable[[TimedLoader], None]:
    import torch
    import torch.nn.functional as F

    def fit(loader: TimedLoader) -> None:
        torch.manual_seed(0)
        model = make_mlp(widths, ctx.device)
        if wrap is not None:
            model = wrap(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        scaler = torch.amp.GradScaler(ctx.device) if scaler_on else None
        ctx_manager = (lambda: torch.autocast(ctx.device, dtype=dtype)) if dtype is not None else nullcontext
        for x, y in loader:
            with ctx_manager():
                loss = F.cross_entropy(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
            opt.zero_grad(set_to_none=True)

    return fit


def _trainer_fit(ctx: Ctx, widths: Sequence[int], info: dict[str, Any] | None = None,
                 **kwargs: Any) -> Callable[[TimedLoader], None]:
    import torch

    def fit(loader: TimedLoader) -> None:
        torch.manual_seed(0)
        trainer = make_trainer(ctx, max_steps=loader.steps, **kwargs)
        trainer.fit(trainer_module(make_mlp(widths, ctx.device)), train_dataloaders=loader)
        if info is not None:
            info["plugins"] = trainer.plugin_names
            info["world_size"] = trainer.world_size

    return fit


def section_host_syncs(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    """Per step: host reads seen from Python (torchplug.testing.syncs.HostReads) and, on CUDA,
    synchronising CUDA calls (torch.cuda.set_sync_debug_mode("warn")), Trainer vs hand loop."""
    import torch

    from torchplug.testing.syncs import accelerator_path, reads_per_step

    widths, batch = ctx.tiny
    batches = make_batches(widths, batch, ctx.device)
    short, long = 8, 24

    def per_step(fit: Callable[[TimedLoader], None]) -> dict[str, float]:
        cuda_syncs: list[int] = []

        def run(steps: int) -> None:
            budget.check()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if ctx.cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    fit(TimedLoader(batches, 0, steps - 1, lambda: None))
                finally:
                    if ctx.cuda:
                        torch.cuda.set_sync_debug_mode("default")
            cuda_syncs.append(sum("synchroniz" in str(w.message) for w in caught))

        reads, _ = reads_per_step(run, (short, long))
        out = {"host_reads_per_step": reads}
        if ctx.cuda:
            out["cuda_syncs_per_step"] = (cuda_syncs[1] - cuda_syncs[0]) / (long - short)
        return out

    result: dict[str, Any] = {"method": f"counts of a {long}-step fit minus an {short}-step one, per step"}
    if not ctx.cuda:
        result["note"] = "CPU dry run: no CUDA sync counts; the loss check forced onto the accelerator path"
    ok = True
    # The dry run takes the accelerator's path (the loss check queued on the device); a CUDA run
    # takes it anyway.
    with accelerator_path():
        for label, dtype, precision in (("fp32", None, 32), ("bf16", torch.bfloat16, "bf16"),
                                        ("fp16", torch.float16, 16)):
            hand = per_step(_hand_amp(ctx, widths, dtype, scaler_on=label == "fp16"))
            ours = per_step(_trainer_fit(ctx, widths, precision=precision))
            good = all(ours[key] <= hand[key] for key in hand)
            ok &= good
            result[label] = {"hand": hand, "torchplug": ours, "ok": good}
    result["status"] = "ok" if ok else "failed"
    return result


def section_native_amp_speed(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    import torch

    torch.set_float32_matmul_precision("highest")  # the fp32 baseline is strict fp32, not TF32
    result: dict[str, Any] = {
        "fp32_baseline": f"strict fp32 (torch.get_float32_matmul_precision()="
                         f"{torch.get_float32_matmul_precision()!r}, TF32 matmul off)",
        "tiny_mlp": {"widths": ctx.tiny[0], "batch": ctx.tiny[1]},
        "large_mlp": {"widths": ctx.large[0], "batch": ctx.large[1]},
        "timings": {},
    }
    cases = [
        ("tiny", "bf16", torch.bfloat16, "bf16"), ("tiny", "fp16", torch.float16, 16),
        ("large", "bf16", torch.bfloat16, "bf16"), ("large", "fp16", torch.float16, 16),
        ("large", "fp32", None, 32), ("tiny", "fp32", None, 32),
    ]
    skipped = []
    for size, label, dtype, precision in cases:
        key = f"{size}/{label}"
        if budget.left() <= 0:
            skipped.append(key)
            continue
        widths, batch = ctx.tiny if size == "tiny" else ctx.large
        warmup, measure = ctx.steps["large_fp32" if label == "fp32" else size]
        batches = make_batches(widths, batch, ctx.device)
        info: dict[str, Any] = {}
        variants = {"hand": _hand_amp(ctx, widths, dtype, scaler_on=label == "fp16"),
                    "torchplug": _trainer_fit(ctx, widths, info, precision=precision)}
        if size == "tiny" and label == "bf16":
            # What the default non-finite-loss check costs (on CUDA it is queued on the device
            # and read at the logging interval).
            variants["torchplug_no_loss_check"] = _trainer_fit(ctx, widths, precision=precision,
                                                                on_nonfinite_loss="ignore")
        make_loader = functools.partial(TimedLoader, batches, warmup, measure, ctx.sync)
        try:
            timing = timed_variants(variants, make_loader, ctx.reps, budget)
        except TimeBudget:
            skipped.append(key)
            continue
        timing["plugins"] = info.get("plugins")
        timing["steps"] = {"warmup": warmup, "measure": measure}
        result["timings"][key] = timing
    if skipped:
        result["skipped"] = dict.fromkeys(skipped, "skipped: time budget")
    result["status"] = "ok" if result["timings"] else "skipped"
    return result


def section_ddp_one_rank(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    import datetime as dt

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if ctx.cuda else "gloo"
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised")
    if ctx.cuda:
        torch.cuda.set_device(0)
    amp = _native_amp_installed()
    precision: Any = "bf16" if amp else 32
    dtype = torch.bfloat16 if amp else None
    result: dict[str, Any] = {"backend": backend, "precision": str(precision)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)  # type: ignore[attr-defined]
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                timeout=dt.timedelta(seconds=60))
        try:
            widths, batch = ctx.large
            ddp_args = {"strategy": "ddp", "devices": 1, "precision": precision}
            # The wrapping check: an observer sees the module the loop steps.
            obs = observer()
            trainer = make_trainer(ctx, max_steps=2, plugins=[obs], **ddp_args)
            trainer.fit(trainer_module(make_mlp(widths, ctx.device)),
                        train_dataloaders=make_batches(widths, batch, ctx.device, pool=2))
            wrapped = "DistributedDataParallel" in (obs.stepped_model or "")
            result.update({"stepped_model": obs.stepped_model, "wrapped": wrapped,
                           "trainer_world_size": trainer.world_size, "plugins": trainer.plugin_names})
            budget.check()
            warmup, measure = ctx.steps["large"]
            batches = make_batches(widths, batch, ctx.device)
            device_ids = [0] if ctx.cuda else None
            variants = {
                "hand_unwrapped": _hand_amp(ctx, widths, dtype, scaler_on=False),
                "torchplug_ddp": _trainer_fit(ctx, widths, **ddp_args),
                "hand_ddp_wrapped": _hand_amp(ctx, widths, dtype, scaler_on=False,
                                              wrap=lambda m: DistributedDataParallel(m, device_ids=device_ids)),
            }
            try:
                result["timing_large_mlp"] = timed_variants(
                    variants, lambda: TimedLoader(batches, warmup, measure, ctx.sync), ctx.reps, budget)
            except TimeBudget:
                result["timing_large_mlp"] = "skipped: time budget"
        finally:
            dist.destroy_process_group()
    result["status"] = "failed" if result["wrapped"] or result["trainer_world_size"] != 1 else "ok"
    return result


def _apex_amp() -> tuple[Any, str | None]:
    try:
        from apex import amp
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not hasattr(amp, "initialize") or not hasattr(amp, "scale_loss"):
        return None, "the importable apex has no amp.initialize/amp.scale_loss (not NVIDIA apex <= 25.05)"
    return amp, None


def _apex_reset() -> None:
    """Undo O1's patching of torch functions: every amp.initialize at O1 wraps them again, so
    repeated fits in one process would otherwise stack wrappers and slow down run after run."""
    try:
        from apex.amp._amp_state import _amp_state

        handle = getattr(_amp_state, "handle", None)
        if handle is not None:
            handle._deactivate()
    except Exception:
        pass


def section_apex(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    if not ctx.cuda:
        return {"status": "skipped", "reason": "skipped (apex amp needs CUDA)"}
    amp, why = _apex_amp()
    if amp is None:
        return {"status": "skipped", "reason": f"skipped (apex not importable): {why}"}
    import apex

    result: dict[str, Any] = {"apex_path": os.path.dirname(apex.__file__), "levels": {}}
    ok = True
    for level in ("O1", "O2"):
        budget.check()
        entry: dict[str, Any] = {}
        widths, batch = ctx.tiny
        module = trainer_module(make_mlp(widths, ctx.device))
        trainer = make_trainer(ctx, precision=16, amp_backend="apex", amp_level=level, max_steps=3)
        before = [p.detach().float().clone() for p in module.parameters()]
        trainer.fit(module, train_dataloaders=make_batches(widths, batch, ctx.device, pool=3))
        _apex_reset()
        after = [p.detach().float() for p in module.parameters()]
        entry["plugins"] = trainer.plugin_names
        entry["seen_in_training_step"] = module.seen
        entry["params_changed_and_finite"] = (any(not torch.equal(a, b) for a, b in zip(before, after))
                                              and all(bool(torch.isfinite(a).all()) for a in after))
        expected_param = "float16" if level == "O2" else "float32"
        entry["param_dtype_ok"] = module.seen.get("param_dtype") == expected_param
        ok &= entry["params_changed_and_finite"] and entry["param_dtype_ok"]

        def hand(loader: TimedLoader, widths: Sequence[int] = widths, level: str = level) -> None:
            torch.manual_seed(0)
            model = make_mlp(widths, ctx.device)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            model, opt = amp.initialize(model, opt, opt_level=level, verbosity=0)
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                with amp.scale_loss(loss, opt) as scaled:
                    scaled.backward()
                opt.step()
                opt.zero_grad()  # O2 replaces zero_grad with one that takes no set_to_none
            _apex_reset()

        def via_trainer(loader: TimedLoader, widths: Sequence[int] = widths, level: str = level) -> None:
            torch.manual_seed(0)
            trainer = make_trainer(ctx, precision=16, amp_backend="apex", amp_level=level, max_steps=loader.steps)
            trainer.fit(trainer_module(make_mlp(widths, ctx.device)), train_dataloaders=loader)
            _apex_reset()

        timings: dict[str, Any] = {}
        for size in ("tiny", "large"):
            widths_s, batch_s = ctx.tiny if size == "tiny" else ctx.large
            warmup, measure = ctx.steps[f"apex_{size}"]
            batches = make_batches(widths_s, batch_s, ctx.device)
            try:
                variants: dict[str, Callable[[TimedLoader], Any]] = {
                    "hand": functools.partial(hand, widths=widths_s),
                    "torchplug": functools.partial(via_trainer, widths=widths_s)}
                make_loader = functools.partial(TimedLoader, batches, warmup, measure, ctx.sync)
                timings[size] = timed_variants(variants, make_loader, ctx.reps, budget)
            except TimeBudget:
                timings[size] = "skipped: time budget"
        entry["timings"] = timings
        result["levels"][level] = entry
    result["status"] = "ok" if ok else "failed"
    return result


def section_apex_pytest(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    tests = ROOT / "plugins" / "apex_plugin" / "tests"
    if not tests.is_dir():
        return {"status": "skipped", "reason": f"skipped ({tests.relative_to(ROOT)} does not exist)"}
    if not ctx.cuda:
        return {"status": "skipped", "reason": "skipped (the real-apex tests need CUDA)"}
    if _apex_amp()[0] is None:
        return {"status": "skipped", "reason": "skipped (apex not importable)"}
    timeout = max(5.0, budget.left())
    cmd = [sys.executable, "-m", "pytest", str(tests), "-m", "gpu", "-q", "-p", "no:cacheprovider", "-x"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"skipped: time budget ({timeout:.0f} s)"}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    # pytest exit 5: no test selected (no gpu-marked tests): not a failure of the plugin.
    status = "ok" if proc.returncode in (0, 5) else "failed"
    return {"status": status, "returncode": proc.returncode, "command": " ".join(cmd[1:]), "tail": tail}


SECTIONS: list[tuple[str, Callable[[Ctx, Budget], dict[str, Any]], float, float]] = [
    # name, function, its time limit (s), the least time worth starting it with (s)
    ("native_amp_dtype", section_native_amp_dtype, 30, 3),
    ("native_amp_overflow", section_native_amp_overflow, 30, 3),
    ("host_syncs", section_host_syncs, 20, 3),
    ("native_amp_speed", section_native_amp_speed, 75, 10),
    ("ddp_one_rank", section_ddp_one_rank, 40, 8),
    ("apex", section_apex, 60, 10),
    ("apex_pytest", section_apex_pytest, 45, 10),
]


def _native_amp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchplug_native_amp") is not None


# --------------------------------------------------------------------------------- reporting
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("torchplug", "torchplug-native-amp", "torchplug-ddp", "torchplug-apex", "pluggy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _table(report: dict[str, Any]) -> str:
    lines = []
    for name, sec in report["sections"].items():
        status = sec.get("status", "?")
        lines.append(f"{name:22} {status:8} {sec.get('seconds', 0):6.1f} s  {sec.get('reason', sec.get('error', ''))}")
        for key, timing in (sec.get("timings") or {}).items():
            lines.append(_timing_line(key, timing))
        if isinstance(sec.get("timing_large_mlp"), dict):
            lines.append(_timing_line("large", sec["timing_large_mlp"]))
        for level, entry in (sec.get("levels") or {}).items():
            for key, timing in (entry.get("timings") or {}).items():
                lines.append(_timing_line(f"{level}/{key}", timing))
        for key in ("precision=16", "precision=bf16"):
            if key in sec:
                seen = sec[key]["autocast_dtype_in_training_step"]
                lines.append(f"    {key}: autocast dtype in training_step {seen} (expected {sec[key]['expected']})")
        if "scale_halved" in sec:
            lines.append(f"    skip on inf: params unchanged {sec['params_unchanged_on_skip']}, scale "
                         f"{sec['scale_before']} -> {sec['scale_after_skip']}, trains after "
                         f"{sec['trains_after_skip']}, skipped_steps {sec['skipped_steps_metric']}")
        for label in ("fp32", "bf16", "fp16"):
            if isinstance(sec.get(label), dict) and "hand" in sec[label]:
                lines.append(f"    {label}: per step torchplug {sec[label]['torchplug']} vs hand {sec[label]['hand']}")
        if "wrapped" in sec:
            lines.append(f"    world size {sec['trainer_world_size']}, stepped model {sec['stepped_model']} "
                         f"(wrapped: {sec['wrapped']})")
    return "\n".join(lines)


def _timing_line(key: str, timing: Any) -> str:
    if not isinstance(timing, dict):
        return f"    {key:14} {timing}"
    names = [k for k, v in timing.items() if isinstance(v, dict) and "ms_median" in v]
    parts = []
    for n in names:
        ratio = next((v for k, v in timing[n].items() if k.endswith("_paired")), None)
        parts.append(f"{n} {timing[n]['ms_median']:.3f} ms" + (f" ({ratio:.3f}x)" if n != names[0] else ""))
    return f"    {key:14} " + ", ".join(parts) + f"  [{timing.get('reps')} reps]"


def _default_out() -> str:
    out_dir = os.environ.get("OUT")
    return os.path.join(out_dir, "gpu_check.json") if out_dir else "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, dry-run the sections on the CPU")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and steps")
    p.add_argument("--budget", type=float, default=200.0, help="seconds for all sections together")
    p.add_argument("--only", default="", help="comma list of sections")
    args = p.parse_args(argv)
    out = Path(args.out or _default_out())

    try:
        import torch
    except Exception as exc:
        print(f"{NO_CUDA} (torch does not import: {type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(f"{NO_CUDA} (torch {torch.__version__}, torch.cuda.is_available() is False). "
              "--allow-cpu dry-runs the script's logic on the CPU.", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    # A hard stop if something hangs (e.g. a collective): the JSON so far is already on disk.
    faulthandler.dump_traceback_later(args.budget + 25, exit=True)

    ctx = Ctx("cuda" if cuda else "cpu", args.quick)
    report: dict[str, Any] = {
        "script": "scripts/gpu_check.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "device": ctx.device, "dry_run_on_cpu": not cuda, "quick": args.quick,
        "versions": _versions(), "plugin_sources": PLUGIN_SOURCES, "budget_s": args.budget, "sections": {},
    }
    only = {s for s in args.only.split(",") if s}
    total = Budget(args.budget)
    start = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, function, limit, least in SECTIONS:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        if total.left() < least:
            section: dict[str, Any] = {"status": "skipped", "reason": "skipped: time budget"}
        else:
            try:
                section = function(ctx, total.sub(limit))
            except TimeBudget:
                section = {"status": "skipped", "reason": "skipped: time budget"}
            except Exception as exc:
                section = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc().splitlines()[-12:]}
            if cuda:
                torch.cuda.empty_cache()
        section["seconds"] = round(time.monotonic() - t0, 1)
        report["sections"][name] = section
        print(f"[gpu_check] {name}: {section['status']} ({section['seconds']} s)", file=sys.stderr, flush=True)
        report["total_seconds"] = round(time.monotonic() - start, 1)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    faulthandler.cancel_dump_traceback_later()
    statuses = [sec["status"] for sec in report["sections"].values()]
    counts = {s: statuses.count(s) for s in ("ok", "failed", "skipped")}
    report["summary"] = counts
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    where = f"{report['gpu']} (CUDA {report['cuda']})" if cuda else "CPU DRY RUN (no CUDA)"
    print(f"gpu_check {report['date']} on {where}, torch {report['torch']}: "
          f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped in {report['total_seconds']} s")
    print(_table(report))
    print(f"JSON: {out}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
