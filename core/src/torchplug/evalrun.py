"""``Trainer.test`` and ``Trainer.predict``: one evaluation run of the module, outside fit.

``test`` goes through the ``launch`` hook like ``fit``, so with ``devices=N`` every worker tests
its shard of each loader and the metrics are averaged over the processes (as validation's are)::

    launch → setup_environment → world_size/global_rank → [all_gather_object: the plan
    handshake, with several processes] → setup("test") → root_device
    → on_test_start → on_test_epoch_start → per loader, per batch: on_test_batch_start
      → on_before_forward → forward_context → test_step → on_test_batch_end
    → test_epoch_end(outputs) → on_test_epoch_end → reduce → on_test_end(metrics)
    → teardown("test") → teardown_environment    (on an error: on_exception first)

``predict`` runs in the calling process only, with ``devices=N`` too (no workers, no process
group): every batch of every loader is predicted here, in order, so the predictions come back
whole and in the loader's order::

    setup("predict") → root_device → on_predict_start → on_predict_epoch_start
    → per batch: on_predict_batch_start → on_before_forward → forward_context → predict_step
      → on_predict_batch_end → on_predict_epoch_end(outputs) → on_predict_end → teardown("predict")
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchplug import checkpoint as ckpt
from torchplug.datamodule import staged
from torchplug.errors import MisconfigurationError
from torchplug.evaluation import PREDICT, TEST, Stage, per_loader, reduced, run_epoch
from torchplug.handshake import check_ranks
from torchplug.module import MetricStore
from torchplug.modulehooks import check_module_methods, positional_arity, registered
from torchplug.prepare import attach_metrics, check_loader, check_module, distributed_loader, resolve_loaders
from torchplug.run import add_context, validate_only
from torchplug.state import Position, RunState

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


class _RunContext:
    """What the module's ``self.trainer`` reads during a test or predict run (there are no
    optimizers outside fit: ``self.optimizers()`` gives none)."""

    def __init__(self, trainer: Trainer, module: nn.Module) -> None:
        self.trainer, self.hooks, self.model = trainer, trainer.hooks, module
        self.optimizers: list[torch.optim.Optimizer] = []
        self.step_optimizers: list[Any] = []
        self.schedulers: list[Any] = []


def the_module(trainer: Trainer, model: nn.Module | None, what: str) -> nn.Module:
    """``model``, or (Lightning 1.x) the module this Trainer fitted last."""
    if model is not None:
        return model
    if trainer.model is None:
        raise MisconfigurationError(
            f"trainer.{what}() without a model needs a fit first (it then uses the fitted module): call "
            f"trainer.{what}(model, ...) or trainer.fit(model, ...) before it."
        )
    return trainer.model


def loaders_of(module: nn.Module, dataloaders: Any, datamodule: Any, stage: str) -> list[Any]:
    """The loaders of a test or predict run: given, else the datamodule's, else the module's
    ``<stage>_dataloader()``; a single loader or a list of them; refused when none or empty."""
    method = f"{stage}_dataloader"
    if dataloaders is not None and datamodule is not None:
        raise MisconfigurationError(
            f"trainer.{stage}() got both dataloaders= and datamodule={type(datamodule).__name__}: pass one of them."
        )
    if dataloaders is None and datamodule is not None:
        dataloaders = getattr(datamodule, method)()
        if dataloaders is None:
            raise MisconfigurationError(
                f"trainer.{stage}(datamodule={type(datamodule).__name__}): its {method}() returned None; define it.")
    if dataloaders is None and callable(getattr(module, method, None)):
        dataloaders = getattr(module, method)()
    if dataloaders is None:
        raise MisconfigurationError(
            f"No {stage} data: pass trainer.{stage}(model, dataloaders=...), a datamodule with {method}(), or define "
            f"{type(module).__name__}.{method}()."
        )
    loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
    for i, loader in enumerate(loaders):
        check_loader(f"{stage} dataloader {i}", loader)
    step = getattr(module, f"{stage}_step")
    if len(loaders) > 1 and positional_arity(step) < 3:
        raise MisconfigurationError(
            f"{type(module).__name__}.{stage}_step{inspect.signature(step)} takes no dataloader_idx, but "
            f"{len(loaders)} {stage} loaders were given (Lightning passes it with several): add a dataloader_idx "
            "parameter.")
    return loaders


def one_loader(dataloaders: Any, datamodule: Any, method: str) -> Any:
    """``dataloaders``, or the (set up) datamodule's ``method()``; refused when both are given."""
    if datamodule is None:
        return dataloaders
    if dataloaders is not None:
        raise MisconfigurationError(
            f"Got both dataloaders= and datamodule={type(datamodule).__name__}: pass one of them.")
    return getattr(datamodule, method)()


def load_weights(trainer: Trainer, module: nn.Module, ckpt_path: str | os.PathLike[str], stage: str) -> None:
    """``ckpt_path``'s weights into ``module`` before the run: a path, ``"last"`` (the last fit's
    ``last.ckpt``) or ``"best"`` (a ``ModelCheckpoint``'s best file)."""
    if not isinstance(ckpt_path, (str, os.PathLike)):
        raise MisconfigurationError(f"ckpt_path must be a path, got {ckpt_path!r} ({type(ckpt_path).__name__})")
    path: str | os.PathLike[str] = ckpt_path
    if ckpt_path == "last":
        if trainer.checkpoint_path is None:
            raise MisconfigurationError(f"trainer.{stage}(ckpt_path='last'): this Trainer wrote no last.ckpt; "
                                        "pass the checkpoint's path.")
        path = trainer.checkpoint_path
    elif ckpt_path == "best":
        best = [str(getattr(p, "best_model_path", "")) for p in trainer.pm.get_plugins()
                if type(p).__name__ == "ModelCheckpoint" and bool(getattr(p, "best_model_path", ""))]
        if not best:
            raise MisconfigurationError(
                f"trainer.{stage}(ckpt_path='best'): no ModelCheckpoint callback of this Trainer knows a best "
                "checkpoint (with devices=N it is tracked in the workers); pass the checkpoint's path.")
        path = best[0]
    data = ckpt.load(path, weights_only=trainer.checkpoint_weights_only)
    ckpt.check_matches(data, module, path)
    module.load_state_dict(data["state_dict"])


def validate(trainer: Trainer, model: nn.Module | None, dataloaders: Any, datamodule: Any) -> dict[str, float]:
    """``Trainer.validate``: in this process (:func:`torchplug.run.validate_only`)."""
    module = the_module(trainer, model, "validate")
    check_module(module, need_validation=True)
    check_module_methods(module)
    if dataloaders is not None and datamodule is not None:  # refused before prepare_data/setup run
        one_loader(dataloaders, datamodule, "val_dataloader")
    with staged(datamodule, "validate"):
        _, loader = resolve_loaders(module, None, one_loader(dataloaders, datamodule, "val_dataloader"),
                                    need_train=False)
        if loader is None:
            raise MisconfigurationError(
                f"No validation data: pass validate(model, dataloaders=...), a datamodule with val_dataloader(), or "
                f"define {type(module).__name__}.val_dataloader()."
            )
        with registered(trainer, module):
            metrics = validate_only(trainer, module, loader)
    trainer.callback_metrics.update(metrics)
    return metrics


def either(new: Any, old: Any, old_name: str) -> Any:
    """``dataloaders=`` or its Lightning 1.1 spelling ``old_name``, not both."""
    if new is not None and old is not None:
        raise MisconfigurationError(f"{old_name}= is Lightning 1.1's spelling of dataloaders=: pass one of them.")
    return old if new is None else new


def test(trainer: Trainer, model: nn.Module | None, dataloaders: Any, ckpt_path: str | os.PathLike[str] | None,
         datamodule: Any, verbose: bool) -> list[dict[str, float]]:
    """``Trainer.test``: one dict of test metrics per loader (Lightning 1.x's return)."""
    module = the_module(trainer, model, "test")
    check_module(module, need=("test_step",))
    check_module_methods(module)
    if dataloaders is not None and datamodule is not None:  # refused before prepare_data/setup run
        loaders_of(module, dataloaders, datamodule, "test")
    if ckpt_path is not None:  # a bad file fails before any work
        load_weights(trainer, module, ckpt_path, "test")
    with staged(datamodule, "test"):
        loaders = loaders_of(module, dataloaders, datamodule, "test")
        function = functools.partial(run_in_process, trainer, module, loaders, "test", True)
        try:
            results: list[dict[str, float]] = trainer.hooks.launch(trainer=trainer, function=function)
        finally:
            trainer.hooks.close_trace()
    for values in results:
        trainer.callback_metrics.update(values)
    if verbose and os.environ.get("RANK", "0") == "0":
        for i, values in enumerate(results):
            print(f"{'-' * 80}\nDATALOADER:{i} TEST RESULTS\n{values}\n{'-' * 80}", file=sys.stdout, flush=True)
    trainer.model = module
    return results


def predict(trainer: Trainer, model: nn.Module | None, dataloaders: Any, datamodule: Any, return_predictions: bool,
            ckpt_path: str | os.PathLike[str] | None) -> list[Any] | None:
    """``Trainer.predict``: every batch's ``predict_step`` result, in order (a list per loader
    with several loaders), computed in this process."""
    module = the_module(trainer, model, "predict")
    check_module(module, need=())  # predict_step defaults to the module's forward
    check_module_methods(module)
    if not isinstance(return_predictions, bool):
        raise MisconfigurationError(f"return_predictions must be True or False, got {return_predictions!r}")
    if dataloaders is not None and datamodule is not None:  # refused before prepare_data/setup run
        loaders_of(module, dataloaders, datamodule, "predict")
    if ckpt_path is not None:  # a bad file fails before any work
        load_weights(trainer, module, ckpt_path, "predict")
    with staged(datamodule, "predict"):
        loaders = loaders_of(module, dataloaders, datamodule, "predict")
        outputs: list[list[Any]] = run_in_process(trainer, module, loaders, "predict", False, keep=return_predictions)
    trainer.model = module
    if not return_predictions:
        return None
    return outputs if len(loaders) > 1 else outputs[0]


def run_in_process(trainer: Trainer, module: nn.Module, loaders: Sequence[Any], stage_name: str,
                   environment: bool, keep: bool = True) -> Any:
    """One process's test or predict run (the orders in the module docstring). ``environment``:
    set up the processes (test; a worker of a launched run, or torchrun's rank) or not (predict)."""
    stage: Stage = TEST if stage_name == "test" else PREDICT
    trainer._use_module_callbacks(module)  # a spawned worker's Trainer was rebuilt without them
    hooks = trainer.hooks
    position, state, metrics = Position(), RunState(), MetricStore()
    set_up = False
    with registered(trainer, module):
        try:
            if environment:
                hooks.setup_environment(trainer=trainer)
                trainer.world_size = hooks.world_size()
                trainer.global_rank = hooks.global_rank()
                if trainer.world_size > 1:
                    check_ranks(trainer)
            set_up = True
            hooks.setup(trainer=trainer, stage=stage_name)
            device = hooks.root_device(trainer=trainer, model=module)
            module.to(device)
            trainer.model = module
            metrics.reduce = lambda tensor, op: hooks.reduce(tensor=tensor.to(device), op=op)
            attach_metrics(module, metrics)
            module.__dict__["_torchplug_loop"] = _RunContext(trainer, module)
            shards = [distributed_loader(loader, trainer, shuffle_default=False) for loader in loaders]
            keep = keep or stage.epoch_end in hooks.implemented
            epoch = run_epoch(trainer, module, shards, stage, None, position, metrics, keep)
            if stage is PREDICT:
                hooks.on_predict_end(trainer=trainer)
                return epoch.outputs
            results = [reduced(trainer, device, values) for values in per_loader(epoch)]
            hooks.on_test_end(trainer=trainer, metrics={k: v for values in results for k, v in values.items()})
            return results
        except Exception as exc:
            add_context(exc, position, state)
            hooks.on_exception(trainer=trainer, exception=exc)
            wrapped = hooks.wrap_error(exc)
            if wrapped is exc:
                raise
            raise wrapped from exc
        finally:
            attach_metrics(module, None)
            module.__dict__.pop("_torchplug_loop", None)
            if set_up:
                hooks.teardown(trainer=trainer, stage=stage_name)
            if environment:
                hooks.teardown_environment(trainer=trainer)
            if trainer.launched_copy:  # spawned workers skip interpreter teardown: write the trace now
                hooks.close_trace()


__all__ = ["either", "loaders_of", "predict", "run_in_process", "test", "validate"]
