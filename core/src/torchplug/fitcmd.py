"""``torchplug fit``, and what the training commands share: the Trainer built from the command
line, the plugins and run folder they print, the loss-curve plot, and the ``--json`` mode.

``torchplug fit package.module:Class`` trains a user's :class:`torchplug.TrainingModule`; the
class is built with no arguments and provides ``train_dataloader()`` (and optionally
``val_dataloader()``). Without ``--max-epochs`` or ``--max-steps`` it trains
:data:`torchplug.cli.FIT_EPOCHS` epochs and says so. Both ``demo`` and ``fit`` print the active
plugins, the run folder and a PNG of the loss curves drawn from the run's ``metrics.csv``. With
``--json`` stdout gets exactly one JSON object (the run's summary, or ``{"error": ...}``) and
everything else goes to stderr: the messages, the progress bar, the module's own prints and those
of spawned workers (file descriptor 1 points at stderr while the command runs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchplug.errors import TorchplugError
from torchplug.module import TrainingModule

DEMO_EXTRA = 'pip install "torchplug[demo]"'
PLOT_NAME = "loss_curves.png"


class DemoDependencyError(TorchplugError, ImportError):
    """scikit-learn or matplotlib, the ``demo`` extra, is missing."""


def require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DemoDependencyError(
            f"{what} needs {module.partition('.')[0]}, which is not installed ({exc}). "
            f"Install the demo extra: {DEMO_EXTRA}"
        ) from exc


def run_fit(args: argparse.Namespace) -> int:
    return run_command("fit", _fit, args)


def _fit(args: argparse.Namespace) -> dict[str, Any]:
    from torchplug.cli import FIT_EPOCHS

    cls = load_target(args.target)
    from torchplug.seed import seed_everything

    seed_everything(args.seed)
    try:
        model = cls()
    except TypeError as exc:
        raise TargetError(
            f"{args.target} must be constructible with no arguments (torchplug fit calls {cls.__name__}()); "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not callable(getattr(model, "train_dataloader", None)):
        raise TargetError(
            f"{args.target} has no train_dataloader(): torchplug fit gets its data from the module; "
            "define train_dataloader() (and val_dataloader() for validation)."
        )
    say = sayer(args)
    say(f"torchplug fit: {cls.__module__}.{cls.__qualname__}")
    if args.max_epochs is None and args.max_steps is None:
        args.max_epochs = FIT_EPOCHS
        say(f"training {FIT_EPOCHS} epochs (the default without --max-epochs or --max-steps)")
    elif args.max_epochs is None:
        say(f"training until {args.max_steps} optimizer steps (--max-steps; no epoch limit)")
    summary = train(model, args, say)
    say(f"done: {summary['global_step']} steps, {summary['current_epoch']} epochs, {summary['seconds']:.1f} s")
    return summary


def run_command(command: str, body: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> int:
    error: TorchplugError | None = None
    summary: dict[str, Any] = {}
    with _stdout_to_stderr(args.json):
        try:
            summary = body(args)
        except TorchplugError as exc:
            error = exc
        else:
            if summary.get("plot"):
                print(f"loss curves: {summary['plot']}", flush=True)
    if error is not None:
        return fail(command, error, args)
    if args.json:
        print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """While the command runs in JSON mode, whatever is written to stdout goes to stderr: our
    messages, the user's prints and, through file descriptor 1, native code and spawned workers
    (they inherit it). stdout then carries the JSON alone."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved: int | None = None
    out_fd = -1
    try:
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass  # not real files (a test's capture): sys.stdout alone is redirected
    else:
        saved = os.dup(out_fd)
        os.dup2(err_fd, out_fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, out_fd)
            os.close(saved)


class TargetError(TorchplugError, ValueError):
    """``torchplug fit`` was given a target it cannot train."""


def load_target(target: str) -> type[nn.Module]:
    """Import ``package.module:Class`` (the current directory is importable) and check that
    it is a TrainingModule class."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise TargetError(f"Expected package.module:Class, got {target!r} (e.g. torchplug fit mymodel:MyModule).")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # Last, not first: a file in the working directory must never shadow an installed
        # package (a plugin module, say); spawned DDP workers inherit the path, so they can
        # unpickle the user's class too.
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise TargetError(
                f"Cannot import {module_name!r}: {exc}. Run from the folder that contains it, or install its "
                "package (the current directory is on the import path)."
            ) from exc
        raise TargetError(f"Importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise TargetError(f"Importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            candidates = sorted(
                name for name, value in vars(module).items()
                if isinstance(value, type) and issubclass(value, nn.Module) and hasattr(value, "training_step")
            )
            hint = f" It defines: {', '.join(candidates)}." if candidates else ""
            raise TargetError(f"Module {module_name!r} has no attribute {attr_path!r}.{hint}")
        obj = getattr(obj, part)
    if not isinstance(obj, type) or not issubclass(obj, nn.Module):
        raise TargetError(
            f"{target} is {type(obj).__name__} {obj!r}, not a class; torchplug fit needs a torchplug.TrainingModule "
            "subclass."
        )
    missing = [name for name in ("training_step", "configure_optimizers")
               if not callable(getattr(obj, name, None)) or getattr(obj, name) is getattr(TrainingModule, name)]
    if missing:
        raise TargetError(f"{target} does not define {' or '.join(f'{m}()' for m in missing)}.")
    return obj


def train(model: nn.Module, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    from torchplug.trainer import Trainer

    trainer = Trainer(
        plugins=args.plugins, accelerator=args.accelerator, devices=args.devices,
        precision=args.precision if args.precision != "32" else 32,
        max_epochs=args.max_epochs, max_steps=args.max_steps if args.max_steps else -1,
        accumulate_grad_batches=args.accumulate, gradient_clip_val=args.gradient_clip_val,
        default_root_dir=args.root_dir, enable_progress_bar=not args.no_progress_bar,
        log_every_n_steps=5,
    )
    say("plugins active: " + describe_plugins(trainer))
    say(f"devices {args.devices}, precision {trainer.precision}, accumulate {args.accumulate}, "
        f"max_epochs {trainer.max_epochs}, seed {args.seed}")
    start = time.perf_counter()
    trainer.fit(model, ckpt_path=args.ckpt_path)
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {
        "plugins": trainer.plugin_names,
        "devices": args.devices,
        "precision": trainer.precision,
        "accumulate": args.accumulate,
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "seconds": round(seconds, 3),
        "metrics": trainer.callback_metrics,
        "log_dir": trainer.log_dir,
        "checkpoint": trainer.checkpoint_path,
        "plot": None,
    }
    for name in ("val_acc", "val_loss", "train_loss"):
        if name in trainer.callback_metrics:
            summary[name] = trainer.callback_metrics[name]
    if trainer.log_dir is not None and (Path(trainer.log_dir) / "metrics.csv").is_file():
        try:
            summary["plot"] = str(plot_loss_curves(Path(trainer.log_dir) / "metrics.csv"))
        except DemoDependencyError as exc:
            say(f"no plot: {exc}")
    say(f"run folder: {trainer.log_dir}")
    if trainer.checkpoint_path:
        say(f"checkpoint: {trainer.checkpoint_path}")
    return summary


def plot_loss_curves(metrics_csv: Path, out: Path | None = None) -> Path:
    """Draw ``*loss*`` metrics of a run's metrics.csv against the optimizer step into a PNG
    next to it (train and validation curves)."""
    require("matplotlib", "Plotting the loss curves")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from torchplug.metrics import read_csv

    series = read_csv(metrics_csv)
    losses = {name: points for name, points in series.items() if "loss" in name}
    figure = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, points in sorted(losses.items()):
        steps = [p[0] for p in points]
        values = [p[2] for p in points]
        style = "o-" if name.startswith("val") else "-"
        ax.plot(steps, values, style, label=name, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"Loss curves ({metrics_csv.parent.name})")
    if losses:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss metric was logged", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    path = out or metrics_csv.parent / PLOT_NAME
    figure.savefig(path)
    return path


def describe_plugins(trainer: Any) -> str:
    """The active plugins with their distributions and roles, or the built-in defaults."""
    described = []
    for record in trainer.pm.records:
        if record.source == "builtin":
            continue
        ep = record.entry_point
        origin = f"{ep.dist_name} {ep.dist_version}" if ep else record.source
        role = f", {record.role}" if record.role else ""
        described.append(f"{record.name} ({origin}{role})")
    if not described:
        return "none (built-in defaults: one process, fp32)"
    return ", ".join(described)


def one_thread_unless_set() -> None:
    """The demo's matmuls are tiny: one thread per process is fastest (several threads spin
    against each other, and against the other ranks). Spawned workers inherit the variable."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def sayer(args: argparse.Namespace) -> Any:
    def say(text: str) -> None:
        print(text, flush=True)

    return say


def fail(command: str, exc: BaseException, args: argparse.Namespace) -> int:
    print(f"torchplug {command}: error: {exc}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"command": command, "error": str(exc), "error_type": type(exc).__name__}), flush=True)
    return 2 if isinstance(exc, (DemoDependencyError, TargetError, ValueError, LookupError, ImportError)) else 1


__all__ = [
    "DemoDependencyError", "TargetError", "load_target", "plot_loss_curves", "require", "run_command", "run_fit",
    "train",
]
