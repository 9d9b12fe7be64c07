"""``Trainer``: arguments, plugin selection, and the processes around the fit loop."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchplug import checkpoint as ckpt
from torchplug import evalrun
from torchplug import lightning_args as lt
from torchplug.arguments import (
    NONFINITE,
    RESUME_PLAN,
    SINGLE_PROCESS,
    check_accelerator,
    check_callback_list,
    check_choice,
    check_devices,
    check_int,
    check_number,
    check_plugin_list,
    check_precision,
    check_processes,
    check_type,
    iterable,
)
from torchplug.batchlimits import check_loaders
from torchplug.datamodule import datamodule_loaders, staged
from torchplug.discovery import installed_plugins
from torchplug.errors import MisconfigurationError, PluginError
from torchplug.handback import export_states, import_states
from torchplug.hookcalls import Hooks
from torchplug.lightning_plugins import check_required_plugins
from torchplug.manager import PluginManager, get_plugin_manager
from torchplug.modulehooks import check_module_methods, registered
from torchplug.plan import Plan, build_plan
from torchplug.plugin import Role
from torchplug.prepare import check_module, resolve_loaders
from torchplug.provenance import check_resume_plan
from torchplug.run import FitOutcome, FitRun
from torchplug.sharded import FOLDER_KEY, resolve_folder
from torchplug.state import SchedulerConfig, already_finished, resume_point
from torchplug.trainer_api import PluginFacingTrainer


class Trainer(PluginFacingTrainer):
    """Trains a :class:`torchplug.TrainingModule` with the selected plugins.

    Plugin selection: ``plugins`` (entry-point names, plugin objects, modules) fill their roles
    first; ``precision=16``/``"bf16"`` then picks ``native_amp`` (``apex`` with
    ``amp_backend="apex"``) and ``accelerator="ddp"``/``strategy="ddp"``/``devices>1``/
    ``num_nodes>1`` pick ``ddp`` for roles still empty. Everything is validated here, before
    any work: a bad argument or a missing plugin raises with the fix. ``callbacks`` (Lightning's
    spelling) are plugin objects too, registered after those of ``plugins``. What plugins may
    use of a Trainer during fit: :mod:`torchplug.trainer_api`.
    """

    def __init__(
        self,
        *,
        plugins: Sequence[object] | object | None = None,
        callbacks: Sequence[object] | object | None = None,
        accelerator: str | None = None,
        strategy: str | None = None,
        devices: int | str | None = None,
        gpus: int | str | list[int] | None = None,
        num_processes: int | None = None,
        num_nodes: int = 1,
        precision: int | str = 32,
        amp_backend: str = "native",
        amp_level: str | None = None,
        max_epochs: int | None = None,
        max_steps: int | None = -1,
        fast_dev_run: bool | int = False,
        accumulate_grad_batches: int | dict[int, int] = 1,
        gradient_clip_val: float | None = 0.0,
        gradient_clip_norm_type: float = 2.0,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        check_val_every_n_epoch: int = 1,
        val_check_interval: int | float = 1.0,
        num_sanity_val_steps: int = 0,
        log_every_n_steps: int = 50,
        enable_progress_bar: bool = True,
        enable_checkpointing: bool = True,
        logger: bool = True,
        default_root_dir: str | os.PathLike[str] | None = None,
        deterministic: bool = False,
        on_nonfinite_loss: str = "error",
        checkpoint_weights_only: bool = True,
        resume_plan: str = "warn",
        resume_from_checkpoint: str | os.PathLike[str] | None = None,
        blocked_plugins: Sequence[str] = (),
        autoload_plugins: bool | None = None,
        **lightning_1_1: Any,
    ) -> None:
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__", "lightning_1_1")}
        if lightning_1_1:  # Lightning 1.1's renamed arguments mapped (a warning each), its retired ones refused
            renamed = lt.map_retired(lightning_1_1, self._init_args, inspect.signature(Trainer.__init__))
            self.__init__(**{**self._init_args, **renamed})  # type: ignore[misc]
            return
        # Lightning 1.1's spellings (gpus, num_processes, ddp_cpu, resume_from_checkpoint) warn once: workers
        # rebuild this Trainer from the mapped arguments.
        spelled = lt.map_spellings(self._init_args, torch.cuda.is_available)
        accelerator, strategy, devices = spelled["accelerator"], spelled["strategy"], spelled["devices"]
        self.resume_from_checkpoint = lt.check_resume_argument(resume_from_checkpoint)
        self._init_args.update(spelled, gpus=None, num_processes=None, resume_from_checkpoint=None)
        #: fast_dev_run's batches (0: off); it overrides the run's length, the metrics file and checkpoints
        self.fast_dev_run = lt.fast_dev_run_batches(fast_dev_run)
        if self.fast_dev_run:
            (max_epochs, max_steps, limit_train_batches, limit_val_batches, val_check_interval, check_val_every_n_epoch,
             num_sanity_val_steps, logger, enable_checkpointing) = lt.fast_dev_run_overrides(self.fast_dev_run)
        self.accelerator, self.strategy = check_accelerator(accelerator, strategy)
        self.devices = check_devices(devices)
        self.num_nodes = check_int("num_nodes", num_nodes, minimum=1)
        self.precision, self.amp_backend, self.amp_level = check_precision(precision, amp_backend, amp_level)
        if max_epochs is not None:
            check_int("max_epochs", max_epochs, minimum=1)
        # Lightning 1.1 wrote "no limit" as max_steps=None, later versions as -1.
        self.max_steps = -1 if max_steps is None else check_int("max_steps", max_steps, minimum=-1)
        if self.max_steps == 0:
            raise MisconfigurationError("max_steps must be positive, or -1 for no limit; got 0")
        self.max_epochs = max_epochs if max_epochs is not None else (1000 if self.max_steps == -1 else None)
        #: ``{epoch: n}``: from that epoch on, n micro-batches per step (an int argument is ``{0: n}``)
        self.accumulation_schedule = lt.check_schedule(accumulate_grad_batches)
        #: the accumulation in effect (the loop sets it at every epoch's start, as Lightning's scheduler did)
        self.accumulate_grad_batches = lt.accumulation(self.accumulation_schedule, 0)
        self.gradient_clip_val = 0.0 if gradient_clip_val is None else check_number(
            "gradient_clip_val", gradient_clip_val, minimum=0.0)
        self.gradient_clip_norm_type = check_number(
            "gradient_clip_norm_type", gradient_clip_norm_type, minimum=0.0, exclusive=True)
        self.limit_train_batches = lt.check_limit("limit_train_batches", limit_train_batches, minimum=1)
        self.limit_val_batches = lt.check_limit("limit_val_batches", limit_val_batches, minimum=0)
        self.check_val_every_n_epoch = check_int("check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
        self.val_check_interval = lt.check_val_check_interval(val_check_interval)
        self.num_sanity_val_steps = lt.check_sanity_steps(num_sanity_val_steps)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        self.enable_progress_bar = check_type("enable_progress_bar", enable_progress_bar, bool)
        self.enable_checkpointing = check_type("enable_checkpointing", enable_checkpointing, bool)
        self.logger = check_type("logger", logger, bool)
        if default_root_dir is not None and not isinstance(default_root_dir, (str, os.PathLike)):
            raise MisconfigurationError(
                f"default_root_dir must be a path (str or os.PathLike), got {default_root_dir!r} "
                f"({type(default_root_dir).__name__})"
            )
        self.default_root_dir = Path(default_root_dir).absolute() if default_root_dir is not None else Path.cwd()
        self.deterministic = check_type("deterministic", deterministic, bool)
        self.on_nonfinite_loss = check_choice("on_nonfinite_loss", on_nonfinite_loss, NONFINITE)
        self.checkpoint_weights_only = check_type("checkpoint_weights_only", checkpoint_weights_only, bool)
        self.resume_plan = check_choice("resume_plan", resume_plan, RESUME_PLAN)
        check_processes(self.devices, self.num_nodes, self.strategy, on_nonfinite_loss)
        if isinstance(blocked_plugins, str) or not all(isinstance(b, str) for b in iterable(blocked_plugins)):
            raise MisconfigurationError(f"blocked_plugins must be a list of plugin names, got {blocked_plugins!r}")
        check_type("autoload_plugins", autoload_plugins, (bool, type(None)))

        plugins, callbacks = check_plugin_list(plugins), check_callback_list(callbacks)
        self._trainer_callbacks: list[object] = callbacks
        self._module_callbacks: list[object] = []
        self._module_callbacks_for: int | None = None
        self.pm: PluginManager = get_plugin_manager(
            plugins + self._trainer_callbacks, role_defaults=self._role_defaults(), blocked=list(blocked_plugins),
            autoload=autoload_plugins
        )
        #: what this Trainer will run, and why (torchplug.plan); ranks compare its fingerprint
        self.plan: Plan = build_plan(self)
        self.hooks = Hooks(self.pm)
        check_required_plugins(self)
        self.hooks.check_configuration(trainer=self)

        # Set by fit; Lightning's names. global_step, current_epoch and callback_metrics are
        # properties: views of the run in this process, or of the last fit's outcome.
        self.world_size = 1
        self.global_rank = 0
        self.log_dir: str | None = None
        self.checkpoint_path: str | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_schedulers: list[Any] = []
        #: the model transforms applied in the last setup, in order: ``[(name, plugin), ...]``
        self.model_transforms: list[tuple[str, str]] = []
        self.model: nn.Module | None = None
        self.val_dataloaders: Any = None
        self.lr_scheduler_configs: list[SchedulerConfig] = []
        self._stop_without_fit = False
        self.launched_copy = False  # True in a process the launch hook started
        #: the fit that runs (or last ran) in this process: its state, and save_checkpoint
        self._run: FitRun | None = None
        #: what the last fit returned (from rank 0, when it ran in worker processes)
        self._outcome: FitOutcome | None = None
        self._metrics_without_fit: dict[str, float] = {}  # Trainer.validate before any fit

    # ---------------------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """Optimizer steps taken (windows, including steps a precision plugin skipped); live during fit."""
        if self._run is not None:
            return self._run.state.global_step
        return self._outcome.global_step if self._outcome is not None else 0

    @property
    def current_epoch(self) -> int:
        """Completed epochs; live during fit (after ``fit(max_epochs=2)`` it is 2, as in Lightning 2.x)."""
        if self._run is not None:
            return self._run.state.epoch
        return self._outcome.current_epoch if self._outcome is not None else 0

    @property
    def callback_metrics(self) -> dict[str, float]:
        """The last value of every metric logged (``self.log``), validation means included; live during fit."""
        if self._run is not None:
            return self._run.state.callback_metrics
        return self._outcome.callback_metrics if self._outcome is not None else self._metrics_without_fit

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @classmethod
    def available_plugins(cls) -> list[str]:
        """Lightning 1.1's classmethod: the names of the installed plugins (``torchplug plugins``; none is imported)."""
        return sorted({ep.name for ep in installed_plugins()})

    @property
    def plugin_names(self) -> list[str]:
        """The active plugins, in registration order, without the built-in defaults."""
        return [rec.name for rec in self.pm.records if rec.source not in ("builtin", "training module")]

    def plugin_for(self, role: Role) -> object | None:
        holders = self.pm.role_holders(role)
        return holders[0].plugin if holders else None

    def _role_defaults(self) -> dict[Role, str]:
        roles: dict[Role, str] = {}
        if self.precision != "32":
            roles["precision"] = "apex" if self.amp_backend == "apex" else "native_amp"
        wants_many = (isinstance(self.devices, int) and self.devices > 1) or self.num_nodes > 1
        if self.strategy is not None:
            if self.strategy not in SINGLE_PROCESS:
                roles["strategy"] = self.strategy
        elif wants_many:
            roles["strategy"] = "ddp"
        return roles

    # ---------------------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
        datamodule: Any = None,
    ) -> None:
        """Train ``model`` (on ``datamodule``'s loaders if given); afterwards it holds the trained weights
        (also after multi-process runs), and ``global_step``, ``current_epoch`` and ``callback_metrics`` are set."""
        check_module(model)
        check_module_methods(model)
        if datamodule is not None and (train_dataloaders is not None or val_dataloaders is not None):
            datamodule_loaders(datamodule, train_dataloaders, val_dataloaders)  # refused before prepare_data runs
        with staged(datamodule, "fit"):  # prepare_data, setup("fit") ... teardown("fit")
            self._fit(model, *datamodule_loaders(datamodule, train_dataloaders, val_dataloaders), ckpt_path, datamodule)

    def _fit(self, model: nn.Module, train_dataloaders: Any, val_dataloaders: Any,
             ckpt_path: str | os.PathLike[str] | None, datamodule: Any) -> None:
        if not getattr(model, "automatic_optimization", True) and (
                max(self.accumulation_schedule.values()) > 1 or self.gradient_clip_val > 0):
            raise MisconfigurationError(
                f"{type(model).__name__} optimizes manually (automatic_optimization = False), so the Trainer "
                f"neither accumulates nor clips: drop accumulate_grad_batches="
                f"{self._init_args['accumulate_grad_batches']} and "
                f"gradient_clip_val={self.gradient_clip_val}, and do both in training_step."
            )
        if ckpt_path is not None and not isinstance(ckpt_path, (str, os.PathLike)):
            raise MisconfigurationError(f"ckpt_path must be a path, got {ckpt_path!r} ({type(ckpt_path).__name__})")
        ckpt_path = lt.fit_checkpoint(self.resume_from_checkpoint, ckpt_path)
        train_loader, val_loader = resolve_loaders(model, train_dataloaders, val_dataloaders)
        check_loaders(self, train_loader, val_loader)
        self._use_module_callbacks(model)
        if self.fast_dev_run:
            _say(lt.fast_dev_run_note(self.fast_dev_run))
        resume = None
        if ckpt_path is not None:
            # Read and match against the model before any work: a bad file fails here.
            resume = ckpt.load(ckpt_path, weights_only=self.checkpoint_weights_only)
            ckpt.check_matches(resume, model, ckpt_path)
            resolve_folder(resume, ckpt_path, self.pm)  # sharded state: its folder, and a plugin that reads it
            check_resume_plan(self.plan, resume, ckpt_path, strict=self.resume_plan == "strict")
            if already_finished(resume, self.max_epochs, self.max_steps):
                self._finished_already(model, resume, ckpt_path)
                return
            _say(f"torchplug: resuming from {ckpt_path} at {resume_point(resume)}")
        function = functools.partial(self._fit_in_process, model, train_loader, val_loader, resume, datamodule)
        try:
            outcome: FitOutcome = self.hooks.launch(trainer=self, function=function)
        finally:
            self.hooks.close_trace()
        if outcome.state_dict is not None:
            model.load_state_dict(outcome.state_dict)
        if outcome.extra.get("plugin_states"):  # the fit ran in worker processes (torchplug.handback)
            import_states(self, outcome.extra["plugin_states"])
        self._outcome = outcome
        self._stop_without_fit = bool(outcome.extra.get("should_stop", False))
        self.log_dir = outcome.log_dir
        self.checkpoint_path = outcome.checkpoint_path
        self.model = model

    def _finished_already(self, model: nn.Module, resume: dict[str, Any], path: str | os.PathLike[str]) -> None:
        """A resume from a checkpoint where the run already ends: say so, hand back its weights
        and counters, and start nothing (no process, no run folder, no file written)."""
        limits = f"max_epochs={self.max_epochs}" if self.max_steps == -1 else \
            f"max_epochs={self.max_epochs}, max_steps={self.max_steps}"
        _say(f"torchplug: {path} is at {resume_point(resume)}, where this run ends ({limits}): nothing to train, "
             "nothing written. Raise max_epochs/max_steps to train on.")
        if FOLDER_KEY in resume:  # loading shards takes the strategy's processes: the module stays as given
            _say(f"torchplug: the weights of {path} are sharded in {resume[FOLDER_KEY]}; the model is left as given.")
        else:
            model.load_state_dict(resume["state_dict"])
        self._run = None
        self._outcome = FitOutcome(
            global_step=int(resume["global_step"]), current_epoch=int(resume["epoch"]),
            callback_metrics=dict(resume.get("callback_metrics", {})), log_dir=None, checkpoint_path=str(path))
        self.log_dir, self.checkpoint_path, self.model = None, str(path), model

    def _fit_in_process(self, model: nn.Module, train_loader: Any, val_loader: Any,
                        resume: dict[str, Any] | None, datamodule: Any = None) -> FitOutcome:
        self._use_module_callbacks(model)  # a spawned worker's Trainer was rebuilt without them
        try:
            with registered(self, model, datamodule):
                outcome = FitRun(self, model, train_loader, val_loader, resume).run()
            if outcome.state_dict is not None:  # rank 0 of a launched copy (get_state_dicts)
                outcome.state_dict = {k: v.detach().cpu() for k, v in outcome.state_dict.items()}
            if self.launched_copy and self.is_global_zero:  # the passed plugins' state, for the launcher's objects
                outcome.extra["plugin_states"] = export_states(self)
        finally:
            if self.launched_copy:  # spawned workers skip interpreter teardown: write the trace now
                self.hooks.close_trace()
        return outcome

    def validate(self, model: nn.Module | None = None, dataloaders: Any = None, datamodule: Any = None) -> dict[
            str, float]:
        """Run ``validation_step`` over ``dataloaders`` (or the datamodule's, or ``model.val_dataloader()``)
        in this process and return the averaged metrics; ``model=None``: the fitted module."""
        return evalrun.validate(self, model, dataloaders, datamodule)

    def test(self, model: nn.Module | None = None, dataloaders: Any = None,
             ckpt_path: str | os.PathLike[str] | None = None, datamodule: Any = None, verbose: bool = True,
             test_dataloaders: Any = None) -> list[dict[str, float]]:
        """``test_step`` over the loaders, through ``launch`` (``devices=N``: metrics averaged over the
        workers); one dict of metrics per loader (``test_dataloaders=`` is 1.1's ``dataloaders=``). :mod:`.evalrun`."""
        return evalrun.test(self, model, evalrun.either(dataloaders, test_dataloaders, "test_dataloaders"),
                            ckpt_path, datamodule, verbose)

    def predict(self, model: nn.Module | None = None, dataloaders: Any = None, datamodule: Any = None,
                return_predictions: bool = True, ckpt_path: str | os.PathLike[str] | None = None) -> Any:
        """Every batch's ``predict_step`` result, in order, computed in this process. :mod:`.evalrun`."""
        return evalrun.predict(self, model, dataloaders, datamodule, return_predictions, ckpt_path)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint of the current fit's state to ``path`` (atomically, in the format
        ``fit(ckpt_path=...)`` resumes from, with every plugin's ``on_save_checkpoint`` state),
        during a fit (from a hook) or after one that ran in this process. Call it on EVERY rank:
        each runs ``collect_state`` (which may gather across ranks), then global rank 0 writes."""
        if not isinstance(path, (str, os.PathLike)):
            raise MisconfigurationError(f"save_checkpoint needs a path, got {path!r}")
        run = self._run
        if run is None:
            if self.checkpoint_path is not None:
                raise MisconfigurationError(
                    "The last fit ran in worker processes, whose state is gone; its checkpoint is "
                    f"{self.checkpoint_path}."
                )
            raise MisconfigurationError("save_checkpoint needs a model that this Trainer has fitted; call fit first.")
        run.save_checkpoint(Path(path) if self.is_global_zero else None)

    # Pickling (for worker processes): plugins and hooks are rebuilt from the arguments.
    def __getstate__(self) -> dict[str, Any]:
        return {"init_args": self._init_args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["init_args"])  # type: ignore[misc]
        self.launched_copy = True


def _say(message: str) -> None:
    """A line for the user on stderr, from the launching process or global rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


__all__ = ["FitOutcome", "PluginError", "Trainer"]
