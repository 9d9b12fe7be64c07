"""``FSDPPlugin``: FSDP2 ``fully_shard`` as a torchplug strategy, on the ddp plugin's processes."""

from __future__ import annotations

import inspect
from collections.abc import Generator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer

from torchplug import MisconfigurationError, ModelTransform, TrainingStepModule, hookimpl
from torchplug.utils import optimizer_params
from torchplug_ddp import DDPPlugin
from torchplug_fsdp.sharded import ShardedCheckpoints

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from torchplug import Trainer

#: fully_shard arguments the plugin sets itself, or that belong to another owner.
_OWN_ARGS = frozenset({"module", "mesh"})
_REFUSED = {"mp_policy": "precision comes from the precision plugin: Trainer(precision='bf16') composes with fsdp "
                         "(autocast from native_amp); a second precision owner would cast twice"}


class FSDPPlugin(DDPPlugin):
    """Sharded data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    :param wrap: module classes to shard as their own FSDP units, bottom-up, before the root;
        default: every submodule that holds parameters itself (``nn.Linear``, norms, ...).
    :param timeout: as ``DDPPlugin``: seconds a collective may wait.
    :param backend: as ``DDPPlugin``: ``"gloo"`` on CPU, ``"nccl"`` on CUDA by default.
    :param start_method: as ``DDPPlugin``.
    :param checkpoint: ``"full"`` (default): checkpoints hold full state dicts, gathered to rank 0.
        ``"sharded"``: every rank writes its shards of the model and optimizer state with
        ``torch.distributed.checkpoint`` (DCP) into a folder next to the checkpoint file
        (``last.ckpt.<step>-<id>.dcp``), which keeps the run state and names the folder; no gather.
        Either kind resumes at any world size (:mod:`torchplug_fsdp.sharded`).
    :param fsdp_kwargs: passed to every ``fully_shard`` call (``reshard_after_forward``, ...);
        ``mp_policy`` is refused (use the precision plugin), unknown names too.

    Processes, launch and collectives are the ``ddp`` plugin's (a subclass of ``DDPPlugin``).
    Setup: the ``"shard"`` model transform runs ``fully_shard`` on the ``wrap`` units and then on
    a ``TrainingStepModule`` around the module (the FSDP root, whose forward runs
    ``training_step``), before the optimizers exist, so they hold the sharded parameters.
    Checkpoints hold full state dicts (gathered on every rank in ``collect_state``, in the same
    format as a one-process run's), so they resume at any world size and load into a plain module.
    """

    def __init__(self, *, wrap: Sequence[type[nn.Module]] | None = None, timeout: float = 120.0,
                 backend: str | None = None, start_method: str = "spawn", checkpoint: str = "full",
                 **fsdp_kwargs: Any) -> None:
        super().__init__(timeout=timeout, backend=backend, start_method=start_method)
        name = type(self).__name__
        if checkpoint not in ("full", "sharded"):
            raise MisconfigurationError(
                f"{name} (torchplug-fsdp): checkpoint={checkpoint!r}; use 'full' (full state dicts gathered to "
                "rank 0) or 'sharded' (every rank writes its shards with torch.distributed.checkpoint)."
            )
        self.checkpoint = checkpoint
        for key, why in _REFUSED.items():
            if key in fsdp_kwargs:
                raise MisconfigurationError(f"{name} (torchplug-fsdp): {key} is not accepted: {why}.")
        accepted = set(inspect.signature(fully_shard).parameters) - _OWN_ARGS - set(_REFUSED)
        unknown = sorted(set(fsdp_kwargs) - accepted)
        if unknown:
            raise MisconfigurationError(
                f"{name} (torchplug-fsdp): {', '.join(unknown)} not accepted; fully_shard takes "
                f"{', '.join(sorted(accepted))} (the plugin sets module and mesh itself)."
            )
        if wrap is not None and not all(isinstance(c, type) and issubclass(c, nn.Module) for c in wrap):
            raise MisconfigurationError(f"{name} (torchplug-fsdp): wrap must be nn.Module classes, got {wrap!r}")
        self.wrap = tuple(wrap) if wrap is not None else None
        self.fsdp_kwargs = fsdp_kwargs
        self.ddp_kwargs = {}
        self._forget()

    def _forget(self) -> None:
        self._root: nn.Module | None = None
        self._gathered: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
        self._shards = ShardedCheckpoints()

    def __repr__(self) -> str:
        args = [f"timeout={self.timeout:g}"] + [f"{k}={v!r}" for k, v in self.fsdp_kwargs.items()]
        if self.checkpoint != "full":
            args.append(f"checkpoint={self.checkpoint!r}")
        if self.wrap is not None:
            args.insert(0, f"wrap=({', '.join(c.__name__ for c in self.wrap)},)")
        return f"{type(self).__name__}({', '.join(args)})"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_root", None)
        state.pop("_gathered", None)
        state.pop("_shards", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._forget()

    # -- 2. setup -----------------------------------------------------------------------------

    def model_transforms(self, trainer: Trainer) -> ModelTransform | None:
        if not (dist.is_available() and dist.is_initialized()):
            return None  # one process without a group: nothing to shard over
        return ModelTransform("shard", lambda module: self._shard(module, trainer))

    def _mesh(self, trainer: Trainer) -> DeviceMesh:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        device_type = "cuda" if torch.cuda.is_available() and dist.get_backend(self.process_group) == "nccl" else "cpu"
        if self.process_group is not None:
            return DeviceMesh.from_group(self.process_group, device_type)
        return init_device_mesh(device_type, (dist.get_world_size(),))

    def _shard(self, module: nn.Module, trainer: Trainer) -> None:
        mesh = self._mesh(trainer)
        units = [m for m in module.modules() if m is not module and self._is_unit(m)]
        for unit in reversed(units):  # bottom-up: children before the modules that hold them
            fully_shard(unit, mesh=mesh, **self.fsdp_kwargs)
        root = TrainingStepModule(module)
        fully_shard(root, mesh=mesh, **self.fsdp_kwargs)  # the module's remaining parameters; runs lazy init
        self._root = root

    def _is_unit(self, module: nn.Module) -> bool:
        if isinstance(module, FSDPModule):
            return False
        if self.wrap is not None:
            return isinstance(module, self.wrap)
        return any(True for _ in module.parameters(recurse=False))

    def configure_ddp(self, model: nn.Module, device_ids: list[int] | None) -> nn.Module:
        if self._root is None:
            return model
        return self._root

    def get_model_from_plugin(self, model: nn.Module) -> nn.Module:
        while isinstance(model, TrainingStepModule):
            model = model.module
        return model

    # -- 3. step ------------------------------------------------------------------------------

    def block_backward_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        if isinstance(model, FSDPModule):
            return _no_gradient_sync(model)
        return nullcontext()

    @hookimpl(tryfirst=True)  # before a precision plugin's clip_grad_norm_, which would return a DTensor
    def clip_gradients(self, grad_clip_val: float, optimizer: Optimizer, norm_type: float) -> torch.Tensor | None:
        if self._root is None:
            return None
        norm = torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), grad_clip_val, norm_type)
        # The sharded grads' norm is a DTensor whose full value is the global norm (one all-reduce).
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    # -- 5. checkpoints -----------------------------------------------------------------------

    def save_sharded_state(self, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer],
                           checkpoint_path: str | None) -> dict[str, Any] | None:
        """``checkpoint="sharded"``: every rank writes its shards (DCP); the checkpoint references the folder."""
        if self.checkpoint != "sharded":
            return None
        return self._shards.save(trainer, model, optimizers, checkpoint_path, self._group())

    def load_sharded_state(self, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer], folder: str,
                           reference: dict[str, Any]) -> bool | None:
        """Shards of any world size, resharded by DCP to this run's (with either ``checkpoint`` setting)."""
        return self._shards.load(model, optimizers, folder, reference, self._group())

    def _group(self) -> Any:
        """The group DCP coordinates over, or ``None`` for one process without a group."""
        if self._world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return None
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def collect_state(self, trainer: Trainer) -> None:
        """Every rank gathers the full tensors (collectives in the same order everywhere); rank 0 keeps them.
        Not for a checkpoint just saved sharded: its state is in the shards."""
        if self._shards.take_saved():
            self._gathered = None
            return
        if self._root is None:
            return
        module = self.get_model_from_plugin(self._root)
        weights = {k: _full(v) for k, v in module.state_dict().items()}
        states = []
        for optimizer in trainer.optimizers:
            sd = optimizer.state_dict()
            sd["state"] = {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()}
            states.append(sd)
        self._gathered = (weights, states) if trainer.is_global_zero else None

    def get_state_dicts(self) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        # Kept until the next collect_state: the checkpoint and the weights handed back after
        # fit may both read one gather.
        if self._root is not None and self._gathered is None:
            raise RuntimeError("FSDPPlugin (torchplug-fsdp): get_state_dicts before collect_state gathered the "
                               "full state; the core calls collect_state on every rank first")
        return self._gathered

    def load_state_dicts(self, model: nn.Module, optimizers: list[Optimizer], state_dict: dict[str, Any],
                         optimizer_states: list[dict[str, Any]]) -> bool | None:
        """Full tensors from the checkpoint, each rank keeping its shard (no collective needed:
        every rank read the whole file)."""
        if self._root is None:
            return None
        current = model.state_dict()
        model.load_state_dict({k: _like(v, current.get(k)) for k, v in state_dict.items()})
        for optimizer, saved in zip(optimizers, optimizer_states):
            params = optimizer_params(optimizer)
            converted = dict(saved)
            converted["state"] = {i: {k: _like(v, params[int(i)]) for k, v in s.items()}
                                  for i, s in saved["state"].items()}
            optimizer.load_state_dict(converted)
        return True

    def teardown_environment(self) -> None:
        self._forget()
        super().teardown_environment()


@contextmanager
def _no_gradient_sync(model: FSDPModule) -> Generator[None, None, None]:
    """FSDP2 keeps the unsharded gradients and issues no reduce-scatter inside this context."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full(value: Any) -> Any:
    if isinstance(value, DTensor):
        return value.full_tensor().detach().cpu()
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _like(value: Any, reference: Any) -> Any:
    """``value`` (a full tensor) sharded like ``reference`` when that is a DTensor of its shape."""
    if isinstance(reference, DTensor) and isinstance(value, torch.Tensor) and value.shape == reference.shape:
        # src_data_rank=None: every rank holds the full tensor, so each takes its shard without a collective.
        return distribute_tensor(value.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements, src_data_rank=None)
    return value
