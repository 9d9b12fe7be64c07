"""Every hook a torchplug plugin can implement: this module is the API reference.

Hooks are grouped by the phase in which the core calls them, in calling order:

1. launch and environment  (``launch`` … ``check_configuration`` … ``teardown_environment``)
2. setup                   (``model_init_context``, ``model_transforms``, ``setup_optimizers``,
                            ``on_after_setup_optimizers``, ``connect_precision``, ``configure_apex``,
                            ``configure_ddp``, ``get_model_from_plugin``)
3. step                    (``on_before_forward``, ``block_backward_sync``, ``forward_context``,
                            ``backward``, ``unscale_gradients``, ``clip_gradients``, ``optimizer_step``)
4. collectives             (``barrier``, ``broadcast``, ``all_gather_object``, ``reduce``)
5. user events             (``on_fit_start`` … ``on_exception``), including checkpoint state
6. Lightning's events      (``setup`` … ``on_validation_epoch_end``, ``on_test_*``, ``on_predict_*``):
                            the module's hooks

Calling conventions (pluggy calls every hook by keyword):

* **firstresult**: implementations run from the most recently registered plugin to the core's
  built-in defaults (registered ``trylast``); the first one that returns something other than
  ``None`` decides. Return ``None`` to defer to the next plugin (hence the ``X | None``
  return types: callers always get an ``X``, from a plugin or from the defaults).
* **all called**: every implementation runs; return values are ignored.
* **chained** (``on_before_forward`` only): every implementation runs in call order and receives
  what the previous one returned (``None`` means "unchanged").

An implementation may accept any subset of a hook's arguments, in any order. Implement a hook
with ``@torchplug.hookimpl`` on a function or method, or by overriding a method of the same name
in a :class:`torchplug.Plugin` subclass (no decorator needed, Lightning 1.1 style).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.optim import Optimizer

    from torchplug.trainer import Trainer
    from torchplug.transforms import ModelTransform

hookspec = pluggy.HookspecMarker("torchplug")
hookimpl = pluggy.HookimplMarker("torchplug")


# --------------------------------------------------------------------------------------------
# 1. Launch and environment
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def launch(trainer: Trainer, function: Callable[[], Any]) -> Any:
    """Run ``function`` in the processes the run needs and return the launching process's result.

    :param trainer: the Trainer that is fitting.
    :param function: takes no arguments and runs the whole fit in the current process; it
        returns a :class:`torchplug.FitOutcome`. It is picklable, so a plugin may run it in
        worker processes it starts itself.
    :returns: the :class:`~torchplug.FitOutcome` of global rank 0, or ``None`` to leave the
        launch to the next plugin.

    Convention: firstresult. The built-in default calls ``function()`` in this process. The
    ``ddp`` plugin starts ``devices`` workers when no launcher (torchrun, an initialised
    process group) is present, and returns rank 0's outcome; the core then loads its weights
    into the model given to ``fit``.

    Example::

        @hookimpl
        def launch(trainer, function):
            if not needs_workers(trainer):
                return None
            return run_in_workers(function)
    """


@hookspec
def check_configuration(trainer: Trainer) -> None:
    """Refuse a configuration this plugin cannot run, before any work starts.

    :param trainer: the Trainer being constructed; its arguments are validated and its plugins
        resolved.

    Convention: all called, from ``Trainer.__init__``. Raise
    :class:`torchplug.MisconfigurationError` with a message that names the plugin and the fix
    (e.g. apex on a machine without CUDA, ``static_graph=True`` with gradient accumulation).

    Example::

        @hookimpl
        def check_configuration(trainer):
            if trainer.accumulate_grad_batches > 1 and self.static_graph:
                raise MisconfigurationError("ddp: static_graph=True breaks no_sync ...")
    """


@hookspec
def required_plugins(trainer: Trainer, amp_backend: str) -> list[Any] | None:
    """The plugins this plugin needs beside it: Lightning 1.1's ``Plugin.required_plugins``.

    :param trainer: the Trainer being constructed, its plugins resolved.
    :param amp_backend: ``trainer.amp_backend`` (Lightning 1.1 passed it).
    :returns: what must be active: plugin names (``trainer.plugin_names``), plugin classes or
        plugin objects (an active plugin of that class), or ``None``/``[]`` for nothing.

    Convention: all called, from ``Trainer.__init__``, after the plugins are resolved and before
    ``check_configuration``. Each requirement that no active plugin meets is refused there, before
    any work, naming both plugins and the fix (``Trainer(plugins=[...])``): unlike Lightning 1.1,
    torchplug adds no plugin itself, so selection stays what ``trainer.plan`` shows.
    """


@hookspec
def setup_environment(trainer: Trainer) -> None:
    """Prepare this process for the run: process group, device, seeds.

    :param trainer: the Trainer that is fitting.

    Convention: all called, once per process, before the model is set up. The ``ddp``
    plugin initialises the process group here (``env://``, or the one it spawned), unless
    one is already initialised.
    """


@hookspec(firstresult=True)
def world_size() -> int | None:
    """Number of data-parallel processes taking part in the run.

    :returns: the world size. Default: 1.

    Convention: firstresult, asked after ``setup_environment``. A value above 1 makes the
    core inject a ``DistributedSampler`` and write progress, metrics and checkpoints on
    global rank 0 only.
    """


@hookspec(firstresult=True)
def global_rank() -> int | None:
    """Rank of this process among all data-parallel processes.

    :returns: the rank, 0-based. Default: 0.

    Convention: firstresult, asked after ``setup_environment``.
    """


@hookspec(firstresult=True)
def root_device(trainer: Trainer, model: nn.Module) -> torch.device | None:
    """The device this process trains on.

    :param trainer: the Trainer; ``trainer.accelerator`` is ``"cpu"``, ``"cuda"`` or ``None``.
    :param model: the user's module, before any wrapping.
    :returns: a ``torch.device``. Default: ``cuda:0`` for ``accelerator="cuda"``, ``cpu`` for
        ``"cpu"``, else the device of the model's first parameter (CPU without parameters).

    Convention: firstresult. The core moves the model there before
    ``configure_optimizers``. The ``ddp`` plugin returns ``cuda:LOCAL_RANK`` on GPUs.
    """


@hookspec
def teardown_environment(trainer: Trainer) -> None:
    """Release what ``setup_environment`` acquired.

    :param trainer: the Trainer that fitted.

    Convention: all called, once per process, also after an exception. The ``ddp`` plugin
    destroys the process group it created (never one it found initialised). By then the core
    has dropped (and garbage-collected) ``configure_ddp``'s wrapper, so nothing of the run
    holds the group into interpreter exit, where gloo can abort the process.
    """


# --------------------------------------------------------------------------------------------
# 2. Setup of model and optimizers, in this order
# --------------------------------------------------------------------------------------------
#
# Each step has one owner, and each runs once the steps it depends on are final:
#
#   root_device → model_init_context, entered around the module's configure_model()
#   → the module moved to the root device (unless it still holds meta tensors)
#   → model_transforms, applied in their declared order (activation_checkpoint < compile < shard)
#   → configure_optimizers() (the user's, on the final parameters) → setup_optimizers (strategy)
#   → on_after_setup_optimizers → connect_precision (precision; configure_apex)
#   → configure_ddp (the wrapper) → get_model_from_plugin


@hookspec
def model_init_context(trainer: Trainer) -> AbstractContextManager[Any] | None:
    """A context manager the module's layers are created in (meta device, deferred init, a dtype).

    :param trainer: the Trainer; ``trainer.world_size`` and ``trainer.global_rank`` are set.
    :returns: a context manager, not entered, or ``None`` for none.

    Convention: all called, once per process, after ``root_device``. The core enters the
    returned contexts (the first answer outermost) around the module's optional
    ``configure_model()`` (Lightning 2.x's name: create the layers there rather than in
    ``__init__``); a ``configure_model`` that cannot be called without arguments is refused before
    any work. The contexts are entered even when the module defines none. Then the module is
    moved to the root device, unless it holds meta tensors: a plugin whose context creates
    them materialises them in its model transform (``module.to_empty(device=...)``, then
    ``reset_parameters()``).

    Example::

        @hookimpl
        def model_init_context(trainer):
            return torch.device("meta")
    """


@hookspec
def model_transforms(trainer: Trainer, model: nn.Module) -> ModelTransform | Sequence[ModelTransform] | None:
    """Declare how this plugin changes the module before its optimizers exist.

    :param trainer: the Trainer.
    :param model: the user's module, on its root device, after ``configure_model()``.
    :returns: a :class:`torchplug.ModelTransform` (``name``, ``apply``, ``before``, ``after``),
        a list of them, or ``None``.

    Convention: all called, once per process, before ``configure_optimizers``. The core
    orders every plugin's transforms by their ``before``/``after`` names and, between the
    well-known names, by ``torchplug.transforms.DEFAULT_ORDER`` (``"activation_checkpoint"`` <
    ``"compile"`` < ``"shard"``); a cycle, a name declared twice or two transforms nothing
    orders is a :class:`torchplug.PluginConflictError` naming them and their plugins, raised
    before any transform runs. It then calls each ``apply(module)``, which changes the module
    IN PLACE; the applied order is ``trainer.model_transforms`` (``[(name, plugin), ...]``).

    Example::

        @hookimpl
        def model_transforms():
            return ModelTransform("compile", lambda module: module.compile(backend="inductor"))
    """


@hookspec(firstresult=True)
def setup_optimizers(trainer: Trainer, optimizers: list[Optimizer]) -> list[Optimizer] | None:
    """Replace or wrap the optimizers a strategy needs in its own form (ZeRO's sharded optimizer).

    :param trainer: the Trainer.
    :param optimizers: what ``configure_optimizers`` returned, built on the final (transformed,
        sharded) parameters.
    :returns: the optimizers to train with, one per given optimizer, or ``None`` to defer.
        Default: unchanged.

    Convention: firstresult, once per process, right after ``configure_optimizers`` and before
    ``on_after_setup_optimizers``. The core re-binds the LR schedulers to returned optimizers
    that are new objects (as after ``connect_precision``).
    """


@hookspec
def on_after_setup_optimizers(trainer: Trainer) -> None:
    """Called once the optimizers exist, before precision and DDP setup.

    :param trainer: the Trainer; ``trainer.optimizers`` and ``trainer.lr_schedulers`` are set.

    Convention: all called, in every launch mode (in-process, spawned workers, torchrun),
    after ``setup_optimizers``.
    """


@hookspec(firstresult=True)
def connect_precision(
    trainer: Trainer, model: nn.Module, optimizers: list[Optimizer]
) -> tuple[nn.Module, list[Optimizer]] | None:
    """Set up model and optimizers for the plugin's precision (Lightning 1.1's ``connect``).

    :param trainer: the Trainer.
    :param model: the user's module, on its root device, not yet wrapped for DDP.
    :param optimizers: the optimizers from ``configure_optimizers``.
    :returns: ``(model, optimizers)`` to train with, or ``None`` to defer. Default: unchanged.

    Convention: firstresult, once per process, after ``on_after_setup_optimizers`` and before
    ``configure_ddp``. When the returned optimizers are new objects, the core re-binds the LR
    schedulers to them (apex replaces optimizers). The apex plugin calls ``configure_apex``
    from here.
    """


@hookspec(firstresult=True)
def configure_apex(
    amp: Any, model: nn.Module, optimizers: list[Optimizer], amp_level: str
) -> tuple[nn.Module, list[Optimizer]] | None:
    """Initialise NVIDIA apex amp for the model and optimizers.

    :param amp: the ``apex.amp`` module.
    :param model: the user's module, on its CUDA device, not wrapped for DDP.
    :param optimizers: the optimizers.
    :param amp_level: the opt level, ``"O0"`` to ``"O3"``.
    :returns: ``(model, optimizers)`` as ``amp.initialize`` returns them.

    Convention: firstresult, called by the apex plugin's ``connect_precision``. Override it to
    pass more options to ``amp.initialize``.

    Example::

        class MyApex(ApexPlugin):
            def configure_apex(self, amp, model, optimizers, amp_level):
                return amp.initialize(model, optimizers, opt_level=amp_level,
                                      keep_batchnorm_fp32=False)
    """


@hookspec(firstresult=True)
def configure_ddp(model: nn.Module, device_ids: list[int] | None) -> nn.Module | None:
    """Wrap the model for data-parallel training.

    :param model: the user's module after ``connect_precision``.
    :param device_ids: ``[local_rank]`` on CUDA, ``None`` on CPU.
    :returns: the module the loop trains. Default: ``model`` unchanged.

    Convention: firstresult. A returned wrapper (anything but ``model`` itself) is called
    with the step arguments, ``wrapper(batch, batch_idx)``, and must run
    ``model.training_step``: wrap ``torchplug.TrainingStepModule(model)`` in your DDP.

    Example (DESIGN.md's custom DDP)::

        class MyDDP(DDPPlugin):
            def configure_ddp(self, model, device_ids):
                return MyDDPWrapper(TrainingStepModule(model), device_ids=device_ids)
    """


@hookspec(firstresult=True)
def get_model_from_plugin(model: nn.Module) -> nn.Module | None:
    """Unwrap what ``configure_ddp`` returned.

    :param model: the wrapped module.
    :returns: the user's module. Default: ``model``.

    Convention: firstresult. The core uses it for validation, checkpoints and the model it
    hands back after fit.
    """


# --------------------------------------------------------------------------------------------
# 3. One training step, in the order the loop calls them
# --------------------------------------------------------------------------------------------


@hookspec
def on_before_forward(model: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Transform the arguments of the step function before it runs.

    :param model: the module that will run the step (wrapped or not).
    :param args: the arguments the step function will get: ``(batch, batch_idx)`` for
        ``training_step`` and ``validation_step``.
    :returns: new args, or ``None`` for unchanged.

    Convention: **chained**: every implementation runs, each receiving the args the previous
    one returned. The default (trylast) moves tensors in the batch to the model's device; the
    ``ddp`` plugin moves them to the rank's device. Called for training and validation.

    Example::

        @hookimpl
        def on_before_forward(args):
            batch, idx = args
            return (augment(batch), idx)
    """


@hookspec(firstresult=True)
def block_backward_sync(model: nn.Module) -> AbstractContextManager[Any] | None:
    """A context manager that stops gradient synchronisation between processes.

    :param model: the module returned by ``configure_ddp``.
    :returns: a context manager. Default: ``contextlib.nullcontext()``.

    Convention: firstresult. The core ENTERS the returned context around the forward AND the
    backward of every micro-batch but the last of an accumulation window; the last runs outside
    it and performs the one gradient all-reduce of the window. Return the context manager, do
    not enter it yourself. The ``ddp`` plugin returns ``model.no_sync()``. When the returned
    context's ``__enter__`` gives another context manager (a ``@contextmanager`` that yields
    ``model.no_sync()``, as Lightning 1.1's DDPPlugin did without entering it), the core enters
    that one too, so the sync really is blocked.
    """


@hookspec(firstresult=True)
def forward_context(model: nn.Module) -> AbstractContextManager[Any] | None:
    """A context manager for the forward pass (precision: autocast).

    :param model: the module that will run the step.
    :returns: a context manager. Default: ``contextlib.nullcontext()`` (fp32).

    Convention: firstresult. The core enters it around ``training_step`` and
    ``validation_step``; backward runs outside it. The ``native_amp`` plugin returns
    ``torch.autocast(device_type, dtype)``.
    """


@hookspec(firstresult=True)
def backward(loss: torch.Tensor, optimizers: list[Optimizer], model: nn.Module, sync_gradients: bool) -> Any:
    """Run backward for one micro-batch's loss (precision: loss scaling).

    :param loss: the micro-batch loss, already divided by the accumulation window length.
    :param optimizers: the optimizers that will step at the window's end.
    :param model: the module that ran the step.
    :param sync_gradients: whether this backward synchronises gradients across processes:
        ``True`` for the last micro-batch of an accumulation window (run outside
        ``block_backward_sync``), ``False`` for the others. Always ``True`` with a window of 1.
    :returns: anything but ``None`` once backward has run. Default: ``loss.backward()``.

    Convention: firstresult. ``native_amp`` backpropagates ``scaler.scale(loss)``; ``apex``
    runs backward inside ``amp.scale_loss`` (with ``delay_unscale`` when ``sync_gradients`` is
    ``False`` across processes). Like every hook argument, ``sync_gradients`` is passed only to
    implementations that name it.
    """


@hookspec
def unscale_gradients(optimizer: Optimizer) -> None:
    """Bring the gradients of ``optimizer`` to their true scale.

    :param optimizer: an optimizer whose gradients are complete for this window.

    Convention: all called by the core at every window's end, before
    ``on_before_optimizer_step`` and ``clip_gradients``. Implementations must be idempotent
    within a step: ``native_amp`` calls ``GradScaler.unscale_`` at most once per optimizer and
    step, however many hooks ask.
    """


@hookspec(firstresult=True)
def clip_gradients(grad_clip_val: float, optimizer: Optimizer, norm_type: float) -> torch.Tensor | None:
    """Clip the gradients of ``optimizer``'s parameters to a total norm.

    :param grad_clip_val: the maximum total norm (``gradient_clip_val``), > 0.
    :param optimizer: the optimizer whose parameters' gradients are clipped.
    :param norm_type: the p of the p-norm; ``float("inf")`` for the max norm.
    :returns: the total norm of the gradients before clipping, as a tensor.

    Convention: firstresult, at the window's end when ``gradient_clip_val > 0``, after
    ``unscale_gradients``. Default: ``torch.nn.utils.clip_grad_norm_`` over the optimizer's
    parameters. ``apex`` clips ``amp.master_params(optimizer)`` with eps 1e-5.
    """


@hookspec(firstresult=True)
def optimizer_step(optimizers: list[Optimizer]) -> bool | None:
    """Step every optimizer once for this window (precision: skip on inf).

    :param optimizers: all optimizers of the run.
    :returns: ``True`` if the parameters were updated, ``False`` if the step was skipped
        (e.g. inf/NaN gradients under fp16). Default: ``opt.step()`` for each, ``True``.

    Convention: firstresult. After a skipped step the core does not step the LR schedulers
    and counts the skip in ``trainer.callback_metrics["skipped_steps"]``.
    """


# --------------------------------------------------------------------------------------------
# 4. Collectives the loop uses (defaults: one process)
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def data_parallel_group() -> Any:
    """The process group gradients are averaged over.

    :returns: a ``torch.distributed`` process group, or ``None`` outside distributed runs.

    Convention: firstresult. ``ddp``: ``group.WORLD`` or the group it was given.
    """


@hookspec
def barrier(name: str) -> None:
    """Wait until every process reaches this point.

    :param name: what the processes wait for, for error messages.

    Convention: all called. Default: nothing (one process).
    """


@hookspec(firstresult=True)
def broadcast(obj: Any, src: int) -> Any:
    """Send a picklable object from rank ``src`` to all processes.

    :param obj: the object (only rank ``src``'s matters).
    :param src: the sending rank.
    :returns: rank ``src``'s object. Default: ``obj``.

    Convention: firstresult. Since pluggy reads a ``None`` result as "not handled", a plugin
    that really broadcasts implements it as a wrapper (``@hookimpl(wrapper=True)``: ``yield``,
    then return the received object), so that a broadcast ``None`` arrives as ``None``.
    """


@hookspec(firstresult=True)
def all_gather_object(obj: Any) -> list[Any] | None:
    """Gather a picklable object from every process, in rank order.

    :param obj: this process's object (never ``None``).
    :returns: every rank's object, rank 0's first. Default: ``[obj]`` (one process).

    Convention: firstresult. The core calls it once per fit, right after ``world_size`` and
    ``global_rank`` and before any other collective, when the world size is above 1: every
    rank sends its plan fingerprint and plugin list (the handshake of :mod:`torchplug.handshake`),
    so that ranks that resolved different plugins stop with an error instead of hanging. It
    must finish or fail within the process group's timeout. The ``ddp`` plugin uses
    ``torch.distributed.all_gather_object`` on its group.
    """


@hookspec(firstresult=True)
def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor | None:
    """Reduce a tensor over all processes.

    :param tensor: a tensor on the root device.
    :param op: ``"mean"`` or ``"sum"``.
    :returns: the reduced tensor. Default: ``tensor``.

    Convention: firstresult. The core averages validation metrics with it.
    """


# --------------------------------------------------------------------------------------------
# 5. User-facing events (loggers, policies); all called, return values ignored
# --------------------------------------------------------------------------------------------


@hookspec
def on_fit_start(trainer: Trainer, model: nn.Module) -> None:
    """The fit loop is about to run its first step.

    :param trainer: the Trainer. From the fit's setup on, plugins use its public API
        (:mod:`torchplug.trainer_api`): ``trainer.model``/``lightning_module`` (the user's
        module), ``trainer.should_stop``, ``trainer.reduce_boolean_decision``,
        ``trainer.log``, ``trainer.logged_metrics``/``callback_metrics``,
        ``trainer.save_checkpoint`` (call it on every rank), ``trainer.log_dir``,
        ``trainer.is_global_zero``.
    :param model: the user's module.

    Convention: all called, once per process, after setup and before the first step.
    """


@hookspec
def on_train_epoch_start(trainer: Trainer, epoch: int) -> None:
    """A training epoch starts.

    :param trainer: the Trainer.
    :param epoch: the 0-based epoch.

    Convention: all called, at the start of every epoch, before its first batch.
    """


@hookspec
def on_before_optimizer_step(trainer: Trainer, optimizer: Optimizer) -> None:
    """Gradients of a window are complete and unscaled; clipping and the step follow.

    :param trainer: the Trainer.
    :param optimizer: the optimizer about to step.

    Convention: all called, once per optimizer at every window's end, after
    ``unscale_gradients`` and before ``clip_gradients``.
    """


@hookspec
def on_train_batch_end(trainer: Trainer, outputs: Any, batch: Any, batch_idx: int) -> None:
    """A micro-batch has run forward and backward (and the step, at a window's end).

    :param trainer: the Trainer.
    :param outputs: what ``training_step`` returned.
    :param batch: the batch, after ``on_before_forward``.
    :param batch_idx: its index in the epoch.

    Convention: all called, after every micro-batch.
    """


@hookspec
def on_train_epoch_end(trainer: Trainer, epoch: int) -> None:
    """A training epoch ended (before its validation).

    :param trainer: the Trainer.
    :param epoch: the 0-based epoch.

    Convention: all called, at the end of every epoch. What plugins log here with
    ``trainer.log`` is written in the epoch's metrics row, right after this hook.
    """


@hookspec
def on_validation_end(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Validation finished.

    :param trainer: the Trainer.
    :param metrics: the validation metrics, averaged over batches and processes.

    Convention: all called, after every validation run, on every process, with the metrics
    already in ``trainer.callback_metrics`` (the same on every rank: decide early stopping or
    which checkpoint to keep here). What plugins log here with ``trainer.log`` is written in
    the validation's metrics row, after this hook.
    """


@hookspec
def on_log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    """A metrics row was written: what a logger needs.

    :param trainer: the Trainer.
    :param metrics: the row, ``{name: value}`` as floats: the metrics logged (``self.log``,
        ``trainer.log``) since the previous row, validation means included; without those
        logged with ``logger=False``.
    :param step: ``trainer.global_step`` when the row was written (the x axis of a logger).

    Convention: all called, on global rank 0 only, each time a row is written to metrics.csv
    (also with ``Trainer(logger=False)``, which only turns the CSV file off): every
    ``log_every_n_steps`` optimizer steps, after ``on_train_epoch_end`` and after
    ``on_validation_end``. Metrics a plugin logs from those two event hooks are in the row of
    that event. The values are already on the host: a logger adds no device sync.

    Example::

        @hookimpl
        def on_log_metrics(metrics, step):
            for name, value in metrics.items():
                writer.add_scalar(name, value, step)
    """


@hookspec
def collect_state(trainer: Trainer) -> None:
    """Gather on every process the state that global rank 0 is about to read.

    :param trainer: the Trainer.

    Convention: all called, on EVERY process, right before rank 0 builds a checkpoint
    (``last.ckpt``, the one on interrupt, ``trainer.save_checkpoint``) and before the trained
    weights are handed back after fit. It may run collectives: a sharded optimizer consolidates
    its state here (``ZeroRedundancyOptimizer.consolidate_state_dict(to=0)``), a sharded model
    gathers its full state dict, and a plugin whose own checkpoint state is sharded (an EMA of
    FSDP parameters) gathers it too, so that its ``on_save_checkpoint`` (rank 0) stores full
    tensors. ``on_save_checkpoint`` then reads what was gathered. The final weights are
    gathered after ``on_fit_end`` (in a launched copy): a plugin that changes them at the end
    (swaps in an EMA) does it in ``on_fit_end`` on every rank, and that is what comes back.

    ``trainer.save_checkpoint`` runs it too, so a plugin must call that on every rank at the
    same point (as Lightning requires), e.g. from an event hook every rank runs. Called on rank
    0 alone under a gathering strategy (ZeRO, FSDP), rank 0 enters a collective the other ranks
    never join: the fit stops at the process group's timeout (or on the mismatched collectives)
    with the strategy's error; under plain DDP, whose ``collect_state`` gathers nothing, rank 0
    writes the file and the ranks carry on.
    """


@hookspec(firstresult=True)
def get_state_dicts(
    trainer: Trainer, model: nn.Module, optimizers: list[Optimizer]
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The full state dicts of the module and the optimizers, as a checkpoint stores them.

    :param trainer: the Trainer.
    :param model: the user's module (sharded or not).
    :param optimizers: the optimizers of the run.
    :returns: ``(model_state_dict, [optimizer_state_dict, ...])``, plain CPU or device tensors
        under the module's own keys (no wrapper prefixes), or ``None`` to defer. Default:
        ``model.state_dict()`` and each ``optimizer.state_dict()``.

    Convention: firstresult, on global rank 0 only, after ``collect_state`` ran on every
    process: it may not run collectives. A sharded strategy returns what it gathered there
    (``get_model_state_dict(..., full_state_dict=True)``). The same answer is what a fit in
    worker processes hands back to the model given to ``fit``.
    """


@hookspec(firstresult=True)
def load_state_dicts(
    trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], state_dict: dict[str, Any],
    optimizer_states: list[dict[str, Any]]
) -> bool | None:
    """Load full state dicts (what ``get_state_dicts`` returned) into the module and optimizers.

    :param trainer: the Trainer.
    :param model: the user's module, set up (transformed, sharded) as it will train.
    :param optimizers: the optimizers, after ``connect_precision``.
    :param state_dict: the module's full state dict from the checkpoint.
    :param optimizer_states: one full optimizer state dict per optimizer.
    :returns: ``True`` once loaded, or ``None`` to defer. Default: ``model.load_state_dict``
        and each ``optimizer.load_state_dict``.

    Convention: firstresult, on EVERY process when a fit resumes, before ``on_load_checkpoint``;
    it may run collectives (a sharded module keeps its shard of each full tensor). A mismatch
    raises; the core reports it as a :class:`torchplug.CheckpointError`.
    """


@hookspec(firstresult=True)
def save_sharded_state(
    trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], checkpoint_path: str | None
) -> dict[str, Any] | None:
    """Write the module's and optimizers' state as shards, every process its own, next to the checkpoint file.

    :param trainer: the Trainer.
    :param model: the user's module (sharded or not).
    :param optimizers: the optimizers of the run.
    :param checkpoint_path: the file global rank 0 is about to write (its folder exists); ``None``
        on the other processes (a strategy broadcasts rank 0's over its group: only rank 0 knows
        the run folder).
    :returns: where the shards are: ``{"folder": name, ...}``, ``name`` relative to the checkpoint
        file's folder, other keys the strategy's own (plain values). The checkpoint then stores it
        under ``"sharded_state"``, with the module's state-dict keys and shapes under
        ``"state_dict_shapes"``, and no full state dicts (``get_state_dicts`` is not asked for it).
        ``None``: a checkpoint with full state dicts. Default: ``None``.

    Convention: firstresult, on EVERY process each time a checkpoint is written, before
    ``collect_state``; it may run collectives, and every process answers alike (a reference
    everywhere or ``None`` everywhere). A strategy that saved here need not gather the module and
    optimizers in the ``collect_state`` that follows; the weights a fit in worker processes hands
    back are gathered by another ``collect_state``, after the last checkpoint.
    """


@hookspec(firstresult=True)
def load_sharded_state(
    trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], folder: str, reference: dict[str, Any]
) -> bool | None:
    """Load the sharded state of a checkpoint (what ``save_sharded_state`` wrote) at this run's world size.

    :param trainer: the Trainer.
    :param model: the user's module, set up (transformed, sharded) as it will train.
    :param optimizers: the optimizers, after ``connect_precision``.
    :param folder: the shards' folder, resolved next to the checkpoint file (the core checked that
        it exists before any work started).
    :param reference: what ``save_sharded_state`` returned, as the checkpoint stored it.
    :returns: ``True`` once loaded, or ``None`` to defer. Default: a
        :class:`torchplug.CheckpointError` saying that no plugin of this run reads the folder.

    Convention: firstresult, on EVERY process when a fit resumes from a checkpoint with
    ``"sharded_state"``, instead of ``load_state_dicts`` and before ``on_load_checkpoint``; it may
    run collectives. Shards of another model raise a :class:`torchplug.CheckpointError` naming
    the folder.
    """


@hookspec
def on_save_checkpoint(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """A checkpoint is being written: add this plugin's state.

    :param trainer: the Trainer.
    :param checkpoint: the dict about to be saved. Add state under a key of your own (e.g.
        ``checkpoint["native_amp"] = scaler.state_dict()``) made of tensors, numbers, strings,
        lists, tuples and dicts only: checkpoints are loaded with ``weights_only=True``.

    Convention: all called, each time a checkpoint is built, before it is written.
    """


@hookspec
def on_load_checkpoint(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """A checkpoint was loaded to resume: restore this plugin's state.

    :param trainer: the Trainer.
    :param checkpoint: the loaded dict. Called after ``connect_precision`` (apex requires
        initialise-then-load).

    Convention: all called, once per process, when a fit resumes from ``ckpt_path``.
    """


@hookspec
def on_fit_end(trainer: Trainer, model: nn.Module) -> None:
    """Fit finished normally.

    :param trainer: the Trainer.
    :param model: the user's module with the trained weights.

    Convention: all called, once per process, after the last step, validation and ``last.ckpt``.
    In worker processes (``devices=N``) the weights handed back to the launching process are
    gathered after it (``collect_state`` → ``get_state_dicts``), so weights set here on every
    rank (an EMA swapped in, also into a sharded module's shards) are the ones returned. Plugins
    run in registration order (the user's module last); a plugin that must run after the
    others declares ``@hookimpl(trylast=True)`` (pluggy's ordering).
    """


@hookspec
def on_exception(trainer: Trainer, exception: BaseException) -> None:
    """Fit is ending with an exception (including ``KeyboardInterrupt``).

    :param trainer: the Trainer.
    :param exception: the exception; it is re-raised after every implementation ran.

    Convention: all called, once per process, before ``teardown_environment``.
    """


# --------------------------------------------------------------------------------------------
# 6. Lightning's module and callback events (all called, return values ignored)
#
# The user's TrainingModule implements these too: for each fit it is registered as a plugin
# (torchplug.modulehooks) right after the built-in defaults, so it runs after every other plugin,
# as a LightningModule's hooks run after the callbacks'. Lightning calls module hooks with
# positional arguments whose names vary between its versions (``batch_nb``, ``dataloader_idx``),
# so the specs keep torchplug's names (``trainer`` first) and the module's adapter passes a
# module method Lightning's positional arguments, as many as the method takes.
# --------------------------------------------------------------------------------------------


@hookspec
def setup(trainer: Trainer, stage: str) -> None:
    """The run is about to set up the model: build layers or load data that need the process.

    :param trainer: the Trainer; ``world_size`` and ``global_rank`` are known.
    :param stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.

    Convention: all called, once per process, after ``setup_environment`` and before
    ``root_device`` (so layers made here are moved to the device and get optimizers).
    Lightning module: ``setup(self, stage)``.
    """


@hookspec
def teardown(trainer: Trainer, stage: str) -> None:
    """The run is over: release what ``setup`` acquired.

    :param trainer: the Trainer.
    :param stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``, as ``setup`` got.

    Convention: all called, once per process, after ``on_fit_end`` (also after an exception, after
    ``on_exception``) and before ``teardown_environment``. Lightning module: ``teardown(self, stage)``.
    """


@hookspec
def on_train_start(trainer: Trainer) -> None:
    """Training is about to start, right after ``on_fit_start``.

    :param trainer: the Trainer.

    Convention: all called, once per process.
    """


@hookspec
def on_train_end(trainer: Trainer) -> None:
    """Training ended (the last epoch's validation and checkpoint done), before ``on_fit_end``.

    :param trainer: the Trainer.

    Convention: all called, once per process, after normal completion.
    """


@hookspec
def on_epoch_start(trainer: Trainer) -> None:
    """A training epoch starts (Lightning 1.x's ``on_epoch_start``), before ``on_train_epoch_start``.

    :param trainer: the Trainer; ``trainer.current_epoch`` is the epoch.

    Convention: all called, once per training epoch.
    """


@hookspec
def on_epoch_end(trainer: Trainer) -> None:
    """A training epoch ended (Lightning 1.x's ``on_epoch_end``), after ``on_train_epoch_end``.

    :param trainer: the Trainer.

    Convention: all called, once per training epoch, before its validation.
    """


@hookspec
def on_train_batch_start(trainer: Trainer, batch: Any, batch_idx: int) -> int | None:
    """A training micro-batch is about to run, before ``on_before_forward``.

    :param trainer: the Trainer.
    :param batch: the batch as the loader gave it.
    :param batch_idx: its index in the epoch.
    :returns: ``-1`` to skip the rest of the epoch (Lightning 1.x), else ``None``.

    Convention: all called, once per micro-batch; if any implementation (a plugin's or the
    module's) returns ``-1``, this batch and the rest of the epoch are skipped: an accumulation
    window it interrupts is dropped (its gradients discarded, no step), then the epoch ends as
    usual (``training_epoch_end`` … validation, ``last.ckpt``) and the next one starts normally.
    With several processes, return it on every rank at the same batch. Lightning module:
    ``on_train_batch_start(self, batch, batch_idx, dataloader_idx)`` (``dataloader_idx`` is 0).
    """


@hookspec
def on_before_backward(trainer: Trainer, loss: torch.Tensor) -> None:
    """A loss is about to be backpropagated.

    :param trainer: the Trainer.
    :param loss: the loss ``backward`` will get (divided by the window length already).

    Convention: all called, before every ``backward`` (also ``self.manual_backward``).
    """


@hookspec
def on_after_backward(trainer: Trainer) -> None:
    """A backward ran: the gradients of this micro-batch are accumulated (still scaled under fp16).

    :param trainer: the Trainer.

    Convention: all called, after every ``backward`` (also ``self.manual_backward``).
    """


@hookspec
def on_before_zero_grad(trainer: Trainer, optimizer: Optimizer) -> None:
    """An optimizer stepped and its gradients are about to be zeroed.

    :param trainer: the Trainer.
    :param optimizer: the optimizer whose gradients are zeroed next.

    Convention: all called, once per optimizer at every window's end, after ``optimizer_step``.
    """


@hookspec
def training_epoch_end(trainer: Trainer, outputs: list[Any]) -> None:
    """A training epoch ended: what every ``training_step`` of it returned.

    :param trainer: the Trainer.
    :param outputs: one entry per micro-batch, each a dict with the ``"loss"`` (detached) and any
        other keys ``training_step`` returned; with several optimizers and ``optimizer_idx``, one
        such list per optimizer. Collected only when some implementation exists.

    Convention: all called, once per training epoch, before ``on_train_epoch_end``. A
    ``self.log`` here logs an epoch value.
    """


@hookspec
def on_validation_start(trainer: Trainer) -> None:
    """A validation run starts.

    :param trainer: the Trainer.

    Convention: all called, before every validation run (after the training epoch's end hooks).
    """


@hookspec
def on_validation_epoch_start(trainer: Trainer) -> None:
    """A validation epoch starts, right after ``on_validation_start``.

    :param trainer: the Trainer.

    Convention: all called, before the first validation batch.
    """


@hookspec
def on_validation_batch_start(trainer: Trainer, batch: Any, batch_idx: int) -> None:
    """A validation batch is about to run, before ``on_before_forward``.

    :param trainer: the Trainer.
    :param batch: the batch as the loader gave it.
    :param batch_idx: its index.

    Convention: all called, once per validation batch.
    """


@hookspec
def on_validation_batch_end(trainer: Trainer, outputs: Any, batch: Any, batch_idx: int) -> None:
    """A validation batch ran.

    :param trainer: the Trainer.
    :param outputs: what ``validation_step`` returned.
    :param batch: the batch, after ``on_before_forward``.
    :param batch_idx: its index.

    Convention: all called, once per validation batch.
    """


@hookspec
def validation_epoch_end(trainer: Trainer, outputs: list[Any]) -> None:
    """The validation epoch ended: what every ``validation_step`` returned.

    :param trainer: the Trainer.
    :param outputs: the ``validation_step`` results, in batch order (collected only when some
        implementation exists).

    Convention: all called, after the last validation batch; a ``self.log`` here is part of the
    validation metrics (averaged over processes).
    """


@hookspec
def on_validation_epoch_end(trainer: Trainer) -> None:
    """The validation epoch ended, after ``validation_epoch_end``.

    :param trainer: the Trainer.

    Convention: all called, before the metrics are reduced and ``on_validation_end`` runs.
    """



# The test and predict loops (``Trainer.test``/``Trainer.predict``, torchplug.evaluation): the
# validation loop's order, with Lightning's names. ``dataloader_idx`` is the loader's index when
# several were given (0 with one).


@hookspec
def on_test_start(trainer: Trainer) -> None:
    """A test run (``Trainer.test``) starts, after ``setup(stage="test")``.

    :param trainer: the Trainer.

    Convention: all called, once per test run, in every process of it.
    """


@hookspec
def on_test_epoch_start(trainer: Trainer) -> None:
    """The test epoch starts, right after ``on_test_start``.

    :param trainer: the Trainer.

    Convention: all called, once per test run, before the first test batch of the first loader.
    """


@hookspec
def on_test_batch_start(trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
    """A test batch is about to run, before ``on_before_forward``.

    :param trainer: the Trainer.
    :param batch: the batch as the loader gave it.
    :param batch_idx: its index in its loader.
    :param dataloader_idx: the loader's index (0 with one loader).

    Convention: all called, once per test batch. Lightning module:
    ``on_test_batch_start(self, batch, batch_idx, dataloader_idx)``.
    """


@hookspec
def on_test_batch_end(trainer: Trainer, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
    """A test batch ran.

    :param trainer: the Trainer.
    :param outputs: what ``test_step`` returned.
    :param batch: the batch, after ``on_before_forward``.
    :param batch_idx: its index in its loader.
    :param dataloader_idx: the loader's index (0 with one loader).

    Convention: all called, once per test batch. Lightning module:
    ``on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx)``.
    """


@hookspec
def test_epoch_end(trainer: Trainer, outputs: list[Any]) -> None:
    """The test epoch ended: what every ``test_step`` returned.

    :param trainer: the Trainer.
    :param outputs: the ``test_step`` results in batch order; with several loaders, one such
        list per loader (collected only when some implementation exists).

    Convention: all called, after the last test batch; a ``self.log`` here is part of the test
    metrics (averaged over processes).
    """


@hookspec
def on_test_epoch_end(trainer: Trainer) -> None:
    """The test epoch ended, after ``test_epoch_end``.

    :param trainer: the Trainer.

    Convention: all called, before the test metrics are reduced and ``on_test_end`` runs.
    """


@hookspec
def on_test_end(trainer: Trainer, metrics: dict[str, float]) -> None:
    """A test run ended, with its metrics.

    :param trainer: the Trainer.
    :param metrics: every test metric, averaged over the batches and the processes (with several
        loaders the names end in ``/dataloader_idx_N``, as in Lightning).

    Convention: all called, once per test run, on every process, before ``teardown(stage="test")``.
    Lightning module: ``on_test_end(self)``.
    """


@hookspec
def on_predict_start(trainer: Trainer) -> None:
    """A predict run (``Trainer.predict``) starts, after ``setup(stage="predict")``.

    :param trainer: the Trainer.

    Convention: all called, once per predict run.
    """


@hookspec
def on_predict_epoch_start(trainer: Trainer) -> None:
    """The predict epoch starts, right after ``on_predict_start``.

    :param trainer: the Trainer.

    Convention: all called, once per predict run, before the first batch.
    """


@hookspec
def on_predict_batch_start(trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
    """A predict batch is about to run, before ``on_before_forward``.

    :param trainer: the Trainer.
    :param batch: the batch as the loader gave it.
    :param batch_idx: its index in its loader.
    :param dataloader_idx: the loader's index (0 with one loader).

    Convention: all called, once per predict batch. Lightning module:
    ``on_predict_batch_start(self, batch, batch_idx, dataloader_idx)``.
    """


@hookspec
def on_predict_batch_end(trainer: Trainer, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
    """A predict batch ran.

    :param trainer: the Trainer.
    :param outputs: what ``predict_step`` returned.
    :param batch: the batch, after ``on_before_forward``.
    :param batch_idx: its index in its loader.
    :param dataloader_idx: the loader's index (0 with one loader).

    Convention: all called, once per predict batch. Lightning module:
    ``on_predict_batch_end(self, outputs, batch, batch_idx, dataloader_idx)``.
    """


@hookspec
def on_predict_epoch_end(trainer: Trainer, outputs: list[Any]) -> None:
    """The predict epoch ended: every ``predict_step`` result.

    :param trainer: the Trainer.
    :param outputs: the predictions in batch order; with several loaders, one list per loader.

    Convention: all called, once per predict run, after the last batch. Lightning module:
    ``on_predict_epoch_end(self, outputs)`` (1.x).
    """


@hookspec
def on_predict_end(trainer: Trainer) -> None:
    """A predict run ended.

    :param trainer: the Trainer.

    Convention: all called, once per predict run, before ``teardown(stage="predict")``.
    """

#: Every hook name, in the order defined above.
HOOK_NAMES: Sequence[str] = tuple(
    name for name, value in list(globals().items()) if hasattr(value, "torchplug_spec")
)

#: Hooks the core calls itself, implementation after implementation, each receiving what the
#: previous one returned; their implementations cannot be wrappers. The one place this is said.
CHAINED_HOOKS: frozenset[str] = frozenset({"on_before_forward"})
