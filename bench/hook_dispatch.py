"""Hook dispatch cost per training step: the calls the fit loop makes per step, through the
``trainer.hooks`` façade, through pluggy's raw ``pm.hook.<name>`` callers, and as plain calls of
the same implementations.

Usage:
    python bench/hook_dispatch.py [--reps 9] [--target-ms 40] [--quick]

One step of the loop with ``accumulate_grad_batches=1`` and ``gradient_clip_val > 0`` calls, in
order: on_before_forward, forward_context (entered), backward, unscale_gradients,
on_before_optimizer_step, clip_gradients, optimizer_step, on_train_batch_end. The script runs
that sequence with

* ``defaults``: only the core's built-in implementations (a plain fp32 run);
* ``one_plugin``: a plugin that implements every one of those hooks (and answers the
  firstresult ones), registered beside the defaults;

and times it three ways: ``facade`` (``Hooks``, what the loop uses), ``pluggy``
(``pm.hook.<name>(**kwargs)``) and ``plain`` (the implementations that would answer, called
directly: the floor). The implementations get stand-ins whose ``backward``/``step`` do nothing
and a real tiny MLP for the batch move, so the differences are dispatch, not training work.
``dispatch_us`` = variant - plain. The tiny MLP's hand-written step is timed in the same run to
state the overhead as a ratio: (hand step + dispatch) / hand step. The last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import _harness as h
import torch
import torch.nn.functional as F

import torchplug
from torchplug import defaults
from torchplug.hookcalls import Hooks
from torchplug.manager import get_plugin_manager


class _Loss:
    def backward(self) -> None:
        pass


class _Optimizer:
    param_groups: list[dict[str, Any]] = [{"params": []}]

    def step(self) -> None:
        pass


class EveryStepHook(torchplug.Plugin):
    """One implementation of each per-step hook; answers the firstresult ones itself."""

    def on_before_forward(self, args: Any) -> None:
        return None

    def forward_context(self) -> Any:
        return nullcontext()

    def backward(self, loss: Any) -> bool:
        loss.backward()
        return True

    def unscale_gradients(self, optimizer: Any) -> None:
        pass

    def on_before_optimizer_step(self, trainer: Any, optimizer: Any) -> None:
        pass

    def clip_gradients(self, grad_clip_val: float, optimizer: Any, norm_type: float) -> Any:
        return 0.0

    def optimizer_step(self, optimizers: list[Any]) -> bool:
        for optimizer in optimizers:
            optimizer.step()
        return True

    def on_train_batch_end(self, trainer: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass


def loop_calls(hooks: Any) -> Callable[..., None]:
    """One step's hook calls, exactly as the loop makes them, on ``hooks`` (façade or pm.hook)."""
    def step(trainer: Any, model: Any, batch: Any, loss: Any, opts: list[Any]) -> None:
        args = hooks.on_before_forward(model=model, args=(batch, 0))
        if isinstance(args, list):  # raw pluggy returns the list of all results
            args = next((a for a in args if a is not None), (batch, 0))
        with hooks.forward_context(model=model):
            pass
        hooks.backward(loss=loss, optimizers=opts, model=model)
        for optimizer in opts:
            hooks.unscale_gradients(optimizer=optimizer)
            hooks.on_before_optimizer_step(trainer=trainer, optimizer=optimizer)
            hooks.clip_gradients(grad_clip_val=1.0, optimizer=optimizer, norm_type=2.0)
        hooks.optimizer_step(optimizers=opts)
        hooks.on_train_batch_end(trainer=trainer, outputs=loss, batch=args[0], batch_idx=0)
    return step


def plain_defaults(trainer: Any, model: Any, batch: Any, loss: Any, opts: list[Any]) -> None:
    args = defaults.on_before_forward(model, (batch, 0))
    with defaults.forward_context():
        pass
    defaults.backward(loss)
    for optimizer in opts:
        defaults.clip_gradients(1.0, optimizer, 2.0)
    defaults.optimizer_step(opts)
    del args


def plain_one_plugin(plugin: EveryStepHook) -> Callable[..., None]:
    def step(trainer: Any, model: Any, batch: Any, loss: Any, opts: list[Any]) -> None:
        plugin.on_before_forward((batch, 0))  # returns None: the args pass on unchanged
        args = defaults.on_before_forward(model, (batch, 0))
        with plugin.forward_context():
            pass
        plugin.backward(loss)
        for optimizer in opts:
            plugin.unscale_gradients(optimizer)
            plugin.on_before_optimizer_step(trainer, optimizer)
            plugin.clip_gradients(1.0, optimizer, 2.0)
        plugin.optimizer_step(opts)
        plugin.on_train_batch_end(trainer, loss, args[0], 0)
    return step


def time_per_call(fn: Callable[..., None], call_args: tuple[Any, ...], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn(*call_args)
    return (time.perf_counter() - start) / number


def hand_step_seconds(reps: int, steps: int) -> list[float]:
    """The tiny MLP's hand-written fp32 step (forward, backward, clip, step, zero_grad)."""
    widths, batch = h.SIZES["tiny"]
    torch.manual_seed(0)
    net = h.make_mlp(widths)
    opt = torch.optim.SGD(net.parameters(), lr=h.LR, momentum=h.MOMENTUM)
    x, y = h.make_batches(widths, batch, pool=1)[0]

    def one() -> None:
        loss = F.cross_entropy(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(20):
        one()
    return [time_per_call(one, (), steps) for _ in range(reps)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--target-ms", type=float, default=40.0, help="wall time of one timed batch of calls")
    p.add_argument("--quick", action="store_true", help="smoke mode: 2 repetitions of short batches")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    reps = 2 if args.quick else args.reps
    target = 0.004 if args.quick else args.target_ms / 1e3

    widths, batch = h.SIZES["tiny"]
    model = h.make_mlp(widths)
    data = h.make_batches(widths, batch, pool=1)[0]
    call_args = (object(), model, data, _Loss(), [_Optimizer()])

    pm_defaults = get_plugin_manager(autoload=False)
    plugin = EveryStepHook()
    pm_plugin = get_plugin_manager([plugin], autoload=False)
    variants: dict[str, Callable[..., None]] = {
        "defaults/plain": plain_defaults,
        "defaults/facade": loop_calls(Hooks(pm_defaults, trace=False)),
        "defaults/pluggy": loop_calls(pm_defaults.hook),
        "one_plugin/plain": plain_one_plugin(plugin),
        "one_plugin/facade": loop_calls(Hooks(pm_plugin, trace=False)),
        "one_plugin/pluggy": loop_calls(pm_plugin.hook),
    }
    numbers: dict[str, int] = {}
    for name, fn in variants.items():  # warm up, and size each batch of calls to ~target seconds
        per = time_per_call(fn, call_args, 200)
        numbers[name] = max(50, int(target / per))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps):
        for name in h.abba(list(variants), rep):
            samples[name].append(time_per_call(variants[name], call_args, numbers[name]))
    hand = hand_step_seconds(reps, 50 if args.quick else 500)
    hand_us = statistics.median(hand) * 1e6

    cases: dict[str, Any] = {}
    rows = []
    for case in ("defaults", "one_plugin"):
        base = samples[f"{case}/plain"]
        plain_us = statistics.median(base) * 1e6
        entry: dict[str, Any] = {"plain_us": round(plain_us, 3)}
        for how in ("facade", "pluggy"):
            values = samples[f"{case}/{how}"]
            extra = [(v - b) * 1e6 for v, b in zip(values, base)]
            entry[f"{how}_us"] = round(statistics.median(values) * 1e6, 3)
            entry[f"{how}_dispatch_us"] = round(statistics.median(extra), 3)
            entry[f"{how}_ratio_vs_hand_step"] = round((hand_us + statistics.median(extra)) / hand_us, 4)
        cases[case] = entry
        label = "built-in defaults only" if case == "defaults" else "one plugin on every step hook"
        dispatch = entry["facade_dispatch_us"]
        rows.append({
            "metric": f"hook dispatch per step, {label}", "unit": "us/step",
            "hand": round(hand_us, 2), "torchplug": round(hand_us + dispatch, 2),
            "ratio": entry["facade_ratio_vs_hand_step"], "target": "", "ok": None,
            "note": f"tiny hand step {hand_us:.0f} us + the loop's hook calls: facade {entry['facade_us']:.2f} us, "
                    f"plain calls {plain_us:.2f} us -> dispatch {dispatch:.2f} us (raw pluggy "
                    f"{entry['pluggy_dispatch_us']:.2f} us)",
        })
    h.emit({
        "bench": "hook_dispatch", "reps": reps, "calls_per_sample": numbers,
        "hand_tiny_step_us": round(hand_us, 2), "cases": cases,
        "samples_us": {k: [round(v * 1e6, 3) for v in vs] for k, vs in samples.items()}, "rows": rows,
    })


if __name__ == "__main__":
    main()
