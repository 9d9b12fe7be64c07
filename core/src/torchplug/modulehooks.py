"""The user's module as a plugin: Lightning's module hooks, called through the same hooks as
every plugin's, and refused before any work when torchplug would not call them.

For each fit, :func:`module_plugin` builds an adapter with one hook implementation per hook the
module defines; the Trainer registers it right after the built-in defaults, so pluggy calls it
after every other plugin (Lightning calls callbacks first, then the module). The adapter passes
the module method Lightning's positional arguments (``on_train_batch_end(outputs, batch,
batch_idx, dataloader_idx)``), as many as the method takes: Lightning 1.x and 2.x signatures
both work, whatever the parameters are called.

:func:`check_module_methods` refuses, naming the method and the fix, a public method that is one
typo from a hook or step name, a Lightning hook torchplug does not call, and a plugin hook
defined on the module (it belongs on a :class:`torchplug.Plugin`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchplug import hookspecs
from torchplug._validation import distance
from torchplug.errors import MisconfigurationError
from torchplug.hookspecs import hookimpl

if TYPE_CHECKING:
    from torchplug.trainer import Trainer

#: The name the adapter is registered under (``Hooks.wrap_error`` lets its errors through unchanged).
PLUGIN_NAME = "torchplug.module"
DATAMODULE_PLUGIN_NAME = "torchplug.datamodule"
HPARAMS_PLUGIN_NAME = "torchplug.hparams"

Call = Callable[..., Any]


def _optimizer_index(trainer: Trainer, optimizer: Any) -> int:
    try:
        return trainer.optimizers.index(optimizer)  # optimizers compare by identity
    except ValueError:
        return 0


def _plain(m: Call, n: int) -> Call:
    return lambda: m()


def _stage(m: Call, n: int) -> Call:
    return lambda stage: m(*(stage,)[:n])


def _outputs(m: Call, n: int) -> Call:
    return lambda outputs: m(*(outputs,)[:n])


def _checkpoint(m: Call, n: int) -> Call:
    return lambda checkpoint: m(*(checkpoint,)[:n])


def _fit_batch_start(m: Call, n: int) -> Call:
    return lambda batch, batch_idx: m(*(batch, batch_idx, 0)[:n])


def _fit_batch_end(m: Call, n: int) -> Call:
    return lambda outputs, batch, batch_idx: m(*(outputs, batch, batch_idx, 0)[:n])


def _eval_batch_start(m: Call, n: int) -> Call:
    return lambda batch, batch_idx, dataloader_idx: m(*(batch, batch_idx, dataloader_idx)[:n])


def _eval_batch_end(m: Call, n: int) -> Call:
    return lambda outputs, batch, batch_idx, dataloader_idx: m(*(outputs, batch, batch_idx, dataloader_idx)[:n])


def _before_optimizer_step(m: Call, n: int) -> Call:
    if n < 2:  # Lightning 2.x: (optimizer)
        return lambda optimizer: m(*(optimizer,)[:n])
    return lambda trainer, optimizer: m(optimizer, _optimizer_index(trainer, optimizer))


# module hook → its adapter, given ``m`` (the module's bound method) and ``n`` (how many positional
# arguments the method takes). The adapter is what pluggy calls: its parameters name the hookspec
# arguments it needs (pluggy passes those, by name), and it gives the method the first ``n`` of
# Lightning's positional arguments, in one call (this runs per step). dataloader_idx is 0 in fit
# (one loader each), the loader's index in test and predict.
MODULE_HOOKS: dict[str, Callable[[Call, int], Call]] = {
    "setup": _stage,
    "teardown": _stage,
    "on_fit_start": _plain,
    "on_fit_end": _plain,
    "on_train_start": _plain,
    "on_train_end": _plain,
    "on_epoch_start": _plain,
    "on_epoch_end": _plain,
    "on_train_epoch_start": _plain,
    "on_train_epoch_end": _plain,
    "on_train_batch_start": _fit_batch_start,
    "on_train_batch_end": _fit_batch_end,
    "on_before_backward": lambda m, n: lambda loss: m(*(loss,)[:n]),
    "on_after_backward": _plain,
    "on_before_optimizer_step": _before_optimizer_step,
    "on_before_zero_grad": lambda m, n: lambda optimizer: m(*(optimizer,)[:n]),
    "training_epoch_end": _outputs,
    "on_validation_start": _plain,
    "on_validation_epoch_start": _plain,
    "on_validation_batch_start": _fit_batch_start,
    "on_validation_batch_end": _fit_batch_end,
    "validation_epoch_end": _outputs,
    "on_validation_epoch_end": _plain,
    "on_validation_end": _plain,
    "on_test_start": _plain,
    "on_test_epoch_start": _plain,
    "on_test_batch_start": _eval_batch_start,
    "on_test_batch_end": _eval_batch_end,
    "test_epoch_end": _outputs,
    "on_test_epoch_end": _plain,
    "on_test_end": _plain,
    "on_predict_start": _plain,
    "on_predict_epoch_start": _plain,
    "on_predict_batch_start": _eval_batch_start,
    "on_predict_batch_end": _eval_batch_end,
    "on_predict_epoch_end": _outputs,
    "on_predict_end": _plain,
    "on_save_checkpoint": _checkpoint,
    "on_load_checkpoint": _checkpoint,
}

#: How many positional arguments Lightning passes where it is more than the hookspec names.
LIGHTNING_ARITY = {"on_train_batch_start": 3, "on_train_batch_end": 4, "on_validation_batch_start": 3,
                   "on_validation_batch_end": 4, "on_before_optimizer_step": 2}


#: The module's own API: what the loop calls on it directly, and what TrainingModule provides.
MODULE_API = frozenset({
    "forward", "training_step", "validation_step", "test_step", "predict_step", "configure_optimizers",
    "train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader", "prepare_data",
    "optimizer_step", "optimizer_zero_grad", "configure_callbacks", "log", "log_dict", "optimizers",
    "lr_schedulers", "manual_backward", "save_hyperparameters", "toggle_optimizer", "untoggle_optimizer",
})

#: Lightning hooks and overrides torchplug does not call, with what to do instead.
UNSUPPORTED: dict[str, str] = {
    "on_train_dataloader": "build the loader in train_dataloader() (Lightning deprecated this hook in 1.x)",
    "on_val_dataloader": "build the loader in val_dataloader() (Lightning deprecated this hook in 1.x)",
    "on_test_dataloader": "build the loader in test_dataloader() (Lightning deprecated this hook in 1.x)",
    "on_pretrain_routine_start": "use setup(stage) or on_fit_start()",
    "on_pretrain_routine_end": "use on_fit_start() or on_train_start()",
    "tbptt_split_batch": "truncated backpropagation through time is not supported: split the sequence in "
                         "training_step",
    "on_hpc_save": "SLURM HPC checkpoints are not supported: use on_save_checkpoint(checkpoint)",
    "on_hpc_load": "SLURM HPC checkpoints are not supported: use on_load_checkpoint(checkpoint)",
    "training_step_end": "*_step_end exists for DataParallel, which torchplug does not run: finish the work "
                         "at the end of training_step",
    "validation_step_end": "*_step_end exists for DataParallel: finish the work at the end of validation_step",
    "test_step_end": "*_step_end exists for DataParallel: finish the work at the end of test_step",
    "backward": "the precision plugin owns backward (loss scaling): use on_before_backward(loss)/"
                "on_after_backward(), or manual optimization (automatic_optimization = False and "
                "self.manual_backward(loss))",
    "transfer_batch_to_device": "the batch is moved by the on_before_forward hook: implement it on a "
                                "torchplug.Plugin and pass Trainer(plugins=[...])",
    "on_before_batch_transfer": "implement on_before_forward(model, args) on a torchplug.Plugin",
    "on_after_batch_transfer": "implement on_before_forward(model, args) on a torchplug.Plugin",
    "configure_apex": "subclass torchplug_apex.ApexPlugin, override configure_apex there and pass "
                      "Trainer(plugins=[MyApex()])",
    "configure_ddp": "subclass torchplug_ddp.DDPPlugin, override configure_ddp there and pass "
                     "Trainer(plugins=[MyDDP()])",
    "init_ddp_connection": "the ddp plugin's setup_environment initialises the process group: subclass "
                           "torchplug_ddp.DDPPlugin to change it",
    "configure_sync_batchnorm": "convert the model with torch.nn.SyncBatchNorm.convert_sync_batchnorm before fit",
    "get_progress_bar_dict": "log what the bar shows with self.log(name, value, prog_bar=True)",
    "on_batch_start": "use on_train_batch_start(batch, batch_idx, dataloader_idx) (Lightning deprecated "
                      "on_batch_start in 1.x)",
    "on_batch_end": "use on_train_batch_end(outputs, batch, batch_idx, dataloader_idx) (Lightning deprecated "
                    "on_batch_end in 1.x)",
    "configure_gradient_clipping": "use Trainer(gradient_clip_val=...), or a plugin's clip_gradients hook",
    "on_before_accelerator_backend_setup": "use setup(stage)",
    "on_post_move_to_device": "use setup(stage) (the model is moved after it) or on_fit_start()",
}

_NN_MODULE = frozenset(dir(nn.Module))
_KNOWN = sorted(set(MODULE_HOOKS) | MODULE_API | set(hookspecs.HOOK_NAMES) | set(UNSUPPORTED))


def _user_methods(module: nn.Module) -> dict[str, Any]:
    """Public functions defined by the module's own classes (not TrainingModule's, not nn.Module's)."""
    from torchplug.module import TrainingModule

    found: dict[str, Any] = {}
    for cls in type(module).__mro__:
        if cls in (TrainingModule, nn.Module, object) or not issubclass(cls, nn.Module) \
                or cls.__module__.startswith("torch."):
            continue
        for name, value in vars(cls).items():
            if name.startswith("_") or name in found or not (inspect.isfunction(value) or isinstance(
                    value, (staticmethod, classmethod))):
                continue
            found[name] = value
    return found


def positional_arity(method: Any) -> float:
    """How many positional arguments a bound method takes (``inf`` with ``*args``)."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return float("inf")
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return float("inf")
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _required(method: Any) -> int:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _where(module: nn.Module, name: str) -> str:
    method = getattr(module, name)
    try:
        sig = f"{name}{inspect.signature(method)}"
    except (TypeError, ValueError):
        sig = name
    return f"{type(module).__qualname__}.{sig} (module {type(module).__module__})"


def check_module_methods(module: nn.Module) -> None:
    """Refuse, before any work, a module method torchplug would silently not call."""
    for name in _user_methods(module):
        if name in _NN_MODULE:
            continue  # an nn.Module override (state_dict, train, extra_repr ...)
        if name in MODULE_HOOKS:
            passed = LIGHTNING_ARITY.get(name, MODULE_HOOKS[name](_ignore, 0).__code__.co_argcount)
            needed = _required(getattr(module, name))
            if name == "on_train_epoch_end" and needed:
                raise MisconfigurationError(
                    f"{_where(module, name)} takes the epoch's outputs, as in Lightning 1.1; torchplug calls "
                    "on_train_epoch_end() without them (as Lightning >= 1.5 does). Move the code to "
                    "training_epoch_end(self, outputs), or drop the parameter."
                )
            if needed > passed:
                raise MisconfigurationError(
                    f"{_where(module, name)} needs {needed} arguments, but torchplug calls the module hook "
                    f"{name!r} with {passed} (Lightning's). Give the extra parameters defaults."
                )
            continue
        if name in MODULE_API:
            continue
        if name in UNSUPPORTED:
            raise MisconfigurationError(
                f"{_where(module, name)} is a Lightning hook that torchplug does not call: {UNSUPPORTED[name]}. "
                f"Rename it '_{name}' if it is a helper."
            )
        if name in hookspecs.HOOK_NAMES:
            raise MisconfigurationError(
                f"{_where(module, name)} is a plugin hook, which torchplug does not call on the module: implement "
                f"it on a torchplug.Plugin subclass and pass Trainer(plugins=[MyPlugin()]), or rename it '_{name}'."
            )
        limit = 1 if len(name) <= 8 else 2
        if name.startswith("on_") or any(distance(name, known) <= limit for known in _KNOWN):
            close = difflib.get_close_matches(name, _KNOWN, n=1, cutoff=0.6)
            advice = f" Did you mean {close[0]!r}?" if close else ""
            raise MisconfigurationError(
                f"{_where(module, name)} looks like a hook, but torchplug has no module hook {name!r}, so it "
                f"would never be called.{advice} The module hooks are listed in torchplug.modulehooks.MODULE_HOOKS; "
                f"rename it '_{name}' if it is a helper."
            )


def _ignore(*args: Any) -> None:
    return None


def _arity(method: Any) -> int:
    """How many of Lightning's positional arguments to pass ``method`` (all, with ``*args``)."""
    arity = positional_arity(method)
    return 99 if arity == float("inf") else int(arity)


@contextmanager
def registered(trainer: Trainer, module: nn.Module, datamodule: Any = None) -> Iterator[None]:
    """The module's hooks (and a datamodule's checkpoint state, :mod:`torchplug.datamodule`)
    registered with the trainer's plugins for the block (a fit in this process: spawned workers
    register their own copy of the module)."""
    from torchplug import datamodule as dm
    from torchplug import hparams

    candidates = ((module_plugin(module), PLUGIN_NAME), (hparams.checkpoint_plugin(module), HPARAMS_PLUGIN_NAME),
                  (dm.checkpoint_plugin(datamodule) if datamodule is not None else None, DATAMODULE_PLUGIN_NAME))
    plugins = [(p, name) for p, name in candidates if p is not None]
    if not plugins:
        yield
        return
    for plugin, name in reversed(plugins):  # each goes right after the defaults: the module runs last
        trainer.pm.register_before_plugins(plugin, name)
    trainer.hooks.refresh()
    try:
        yield
    finally:
        for plugin, _ in plugins:
            trainer.pm.unregister(plugin)
        trainer.hooks.refresh()


def module_plugin(module: nn.Module) -> object | None:
    """The adapter that implements the module's hooks, or ``None`` when it defines none."""
    user = _user_methods(module)
    impls = {}
    for name in MODULE_HOOKS:
        if name in user:
            method = getattr(module, name)
            impls[name] = hookimpl(MODULE_HOOKS[name](method, _arity(method)))
    return SimpleNamespace(**impls) if impls else None


__all__ = ["LIGHTNING_ARITY", "MODULE_API", "MODULE_HOOKS", "PLUGIN_NAME", "UNSUPPORTED", "check_module_methods",
           "module_plugin", "registered"]


def epoch_output(output: Any) -> Any:
    """A step's result as ``training_epoch_end`` gets it (Lightning's): a dict with ``"loss"``,
    its tensors detached so the epoch's graphs are freed."""
    if isinstance(output, dict):
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in output.items()}
    return {"loss": output.detach()}
