"""``DDPPlugin``: torch DistributedDataParallel as a torchplug strategy plugin."""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import os
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from torchplug import MisconfigurationError, Plugin, TrainingStepModule, hookimpl
from torchplug.plugin import Role
from torchplug.utils import move_to_device
from torchplug_ddp._spawn import STORE_ENV, run_workers

if TYPE_CHECKING:
    from torchplug import Trainer

log = logging.getLogger("torchplug_ddp")

#: DDP arguments the plugin sets itself.
_OWN_ARGS = frozenset({"self", "module", "device_ids", "output_device", "process_group"})
#: Per-process state, never pickled into workers.
_RUNTIME = ("_created_group", "_world_size", "_rank", "_device")


class DDPPlugin(Plugin):
    """Data-parallel training with torch ``DistributedDataParallel``.

    :param timeout: seconds a collective (and the rendezvous) may wait for the other ranks
        before failing; also how long the launcher waits for the surviving ranks after one died.
    :param backend: the process-group backend; default ``"nccl"`` on CUDA, ``"gloo"`` on CPU.
    :param process_group: the group gradients are averaged over, when one is already
        initialised (default: the world).
    :param start_method: how ``devices=N`` workers are started: ``"spawn"`` or ``"forkserver"``.
    :param zero_redundancy: ZeRO-1: each optimizer becomes a
        ``torch.distributed.optim.ZeroRedundancyOptimizer`` of the same class and settings, so each
        rank holds the optimizer state of its shard of the parameters only (strategy name
        ``ddp_zero``); checkpoints consolidate the full state on rank 0 (``collect_state``).
    :param ddp_kwargs: passed to ``DistributedDataParallel`` (``find_unused_parameters`` is
        False unless given; ``static_graph=True`` is refused with gradient accumulation).

    Processes: under torchrun (``RANK``/``WORLD_SIZE`` set) or with a process group already
    initialised, every rank runs the fit itself and nothing is started. Otherwise
    ``Trainer(devices=N)`` starts N workers on this machine; the model given to ``fit`` gets
    rank 0's trained weights and ``trainer.callback_metrics`` rank 0's metrics. With one
    process in all, the model is not wrapped.

    CPU or CUDA: ``accelerator="cuda"``/``"cpu"`` decides; without one, CUDA when available.

    Subclass it to change one step, Lightning 1.1 style::

        class MyDDP(DDPPlugin):
            def configure_ddp(self, model, device_ids):
                return MyDDPWrapper(TrainingStepModule(model), device_ids=device_ids)
    """

    role: ClassVar[Role | None] = "strategy"

    def __init__(self, *, timeout: float = 120.0, backend: str | None = None, process_group: Any = None,
                 start_method: str = "spawn", zero_redundancy: bool = False, **ddp_kwargs: Any) -> None:
        name = type(self).__name__
        if not isinstance(zero_redundancy, bool):
            raise MisconfigurationError(f"{name}(zero_redundancy=...) must be True or False, got {zero_redundancy!r}")
        self.zero_redundancy = zero_redundancy
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise MisconfigurationError(f"{name}(timeout=...) must be a positive number of seconds, got {timeout!r}")
        if start_method not in multiprocessing.get_all_start_methods() or start_method == "fork":
            # fork copies a process whose torch threads (and CUDA context) do not survive it.
            raise MisconfigurationError(
                f"{name}(start_method={start_method!r}): use 'spawn' or 'forkserver' "
                f"(available here: {', '.join(m for m in multiprocessing.get_all_start_methods() if m != 'fork')})."
            )
        accepted = set(inspect.signature(DistributedDataParallel.__init__).parameters) - _OWN_ARGS
        unknown = sorted(set(ddp_kwargs) - accepted)
        if unknown:
            raise MisconfigurationError(
                f"{name}: {', '.join(unknown)} {'is not an argument' if len(unknown) == 1 else 'are not arguments'} "
                f"of torch DistributedDataParallel (the plugin sets module, device_ids and process_group itself). "
                f"Accepted: {', '.join(sorted(accepted))}."
            )
        self.timeout = float(timeout)
        self.backend = backend
        self.process_group = process_group
        self.start_method = start_method
        self.ddp_kwargs: dict[str, Any] = {"find_unused_parameters": False, **ddp_kwargs}
        self._reset()

    def _reset(self) -> None:
        self._created_group = False
        self._failed = False
        self._world_size = 1
        self._rank = 0
        self._device: torch.device | None = None

    def __repr__(self) -> str:
        args = [f"timeout={self.timeout:g}"] + [f"{k}={v!r}" for k, v in self.ddp_kwargs.items()]
        if self.backend is not None:
            args.insert(1, f"backend={self.backend!r}")
        if self.zero_redundancy:
            args.insert(1, "zero_redundancy=True")
        return f"{type(self).__name__}({', '.join(args)})"

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in _RUNTIME}
        state["process_group"] = None  # a live group belongs to one process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # -- 1. launch and environment ----------------------------------------------------------

    def check_configuration(self, trainer: Trainer) -> None:
        name = f"{type(self).__name__} (torchplug-ddp)"
        if not dist.is_available():
            raise MisconfigurationError(
                f"{name}: this torch build has no torch.distributed (torch {torch.__version__}); "
                "install a build with it."
            )
        schedule = trainer.accumulation_schedule  # the whole of it: {0: 1, 2: 4} accumulates from epoch 2
        if self.ddp_kwargs.get("static_graph") and max(schedule.values()) > 1:
            setting = schedule[0] if list(schedule) == [0] else schedule
            raise MisconfigurationError(
                f"{name}: static_graph=True cannot be combined with accumulate_grad_batches="
                f"{setting}: in static-graph mode DDP's no_sync() breaks (an INTERNAL ASSERT "
                "'expect_autograd_hooks_', after which gradients silently stop being all-reduced; "
                "pytorch/pytorch#143580). Drop static_graph=True, or do not accumulate (accumulate_grad_batches=1)."
            )
        cuda = _cuda_run(trainer)
        if self.backend == "nccl" and not cuda:
            raise MisconfigurationError(
                f"{name}: backend='nccl' needs CUDA, and this run is on the CPU; use backend='gloo' (the CPU default) "
                "or accelerator='cuda' on a machine with GPUs."
            )
        devices = trainer.devices if isinstance(trainer.devices, int) else None
        if devices is None:
            return
        if cuda:
            available = torch.cuda.device_count()
            if devices > available:
                raise MisconfigurationError(
                    f"{name}: devices={devices} asks for {devices} GPUs per machine, but this machine has "
                    f"{available} (torch.cuda.device_count()). Use devices={available} or fewer, or "
                    "accelerator='cpu' to run that many processes on the CPU."
                )
        else:
            cpus = os.cpu_count() or 1
            if devices > cpus:
                raise MisconfigurationError(
                    f"{name}: devices={devices} asks for {devices} CPU processes, but this machine has {cpus} "
                    f"CPUs (os.cpu_count()), so they would fight for cores. Use devices={cpus} or fewer"
                    + (", or accelerator='cuda' to train on GPUs." if torch.cuda.is_available() else ".")
                )

    def launch(self, trainer: Trainer, function: Callable[[], Any]) -> Any:
        if dist.is_available() and dist.is_initialized():
            return None  # Ray Train, a test fixture: every rank already runs fit
        if _launcher_env():
            self._check_launcher_world(trainer)
            return None  # torchrun & co.: every rank runs fit in-process
        name = f"{type(self).__name__} (torchplug-ddp)"
        if trainer.num_nodes > 1:
            raise MisconfigurationError(
                f"{name}: num_nodes={trainer.num_nodes} needs a launcher on every machine; the plugin starts "
                f"processes on this machine only. Run on each node: torchrun --nnodes={trainer.num_nodes} "
                f"--nproc-per-node={trainer.devices or 1} --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT your_script.py"
            )
        nprocs = _local_processes(trainer)
        if nprocs <= 1:
            return None
        # Like torchrun, avoid N processes x all-cores threads fighting over the same cores.
        threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // nprocs)
        return run_workers(function, nprocs, start_method=self.start_method, grace_s=self.timeout,
                           threads_per_worker=threads)

    def _check_launcher_world(self, trainer: Trainer) -> None:
        world = int(os.environ["WORLD_SIZE"])
        if not isinstance(trainer.devices, int):
            return
        expected = trainer.devices * trainer.num_nodes
        if world != expected:
            raise MisconfigurationError(
                f"{type(self).__name__} (torchplug-ddp): the launcher started WORLD_SIZE={world} processes, but "
                f"Trainer(devices={trainer.devices}, num_nodes={trainer.num_nodes}) expects {expected}. Pass "
                "devices=<processes per node> and num_nodes=<nodes> as given to torchrun (--nproc-per-node, --nnodes), "
                "or leave devices unset."
            )

    def setup_environment(self, trainer: Trainer) -> None:
        cuda = _cuda_run(trainer)
        env = os.environ
        self._created_group = False
        if dist.is_initialized():
            self._world_size = dist.get_world_size(self.process_group)
            self._rank = dist.get_rank(self.process_group)
            local_rank = int(env.get("LOCAL_RANK", self._rank % max(1, torch.cuda.device_count()) if cuda else 0))
            if cuda:
                torch.cuda.set_device(local_rank)
        elif _launcher_env():
            self._rank, self._world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", "0"))
            if cuda:
                torch.cuda.set_device(local_rank)  # before init: nccl binds to the current device
            backend = self.backend or ("nccl" if cuda else "gloo")
            timeout = timedelta(seconds=self.timeout)
            store_path = env.get(STORE_ENV)
            if store_path:  # workers this plugin spawned
                store = dist.FileStore(store_path, self._world_size)  # type: ignore[attr-defined]
                store.set_timeout(timeout)
                dist.init_process_group(backend, store=store, rank=self._rank, world_size=self._world_size,
                                        timeout=timeout)
            else:
                missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
                if missing:
                    raise MisconfigurationError(
                        f"{type(self).__name__} (torchplug-ddp): RANK and WORLD_SIZE are set but "
                        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; launch with torchrun, "
                        "or set all four (env:// rendezvous)."
                    )
                dist.init_process_group(backend, init_method="env://", rank=self._rank,
                                        world_size=self._world_size, timeout=timeout)
            self._created_group = True
        else:
            self._rank, self._world_size, local_rank = 0, 1, 0
        self._device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    def world_size(self) -> int:
        return self._world_size

    def global_rank(self) -> int:
        return self._rank

    def root_device(self) -> torch.device | None:
        return self._device  # None before setup_environment (Trainer.validate): the core decides

    def on_exception(self) -> None:
        self._failed = True

    def teardown_environment(self) -> None:
        if self._created_group and dist.is_initialized():
            try:
                if not self._failed:
                    # Leave together: gloo aborts a rank ("terminate called without an active
                    # exception") whose peer tears its connections down while it still uses them.
                    dist.barrier(group=self.process_group)
                dist.destroy_process_group()
            except Exception as exc:  # never hide the error that ended the run
                log.warning("destroy_process_group failed: %s: %s", type(exc).__name__, exc)
        self._reset()

    # -- 2. setup -----------------------------------------------------------------------------

    def setup_optimizers(self, optimizers: list[Optimizer]) -> list[Optimizer] | None:
        if not self.zero_redundancy or self._world_size <= 1:
            return None
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return [ZeroRedundancyOptimizer([dict(group) for group in opt.param_groups], optimizer_class=type(opt),
                                        process_group=self.process_group, **opt.defaults)
                for opt in optimizers]

    def on_after_setup_optimizers(self, trainer: Trainer) -> None:
        """Called in every process once the optimizers exist (Lightning 1.1's hook); override it."""

    def configure_ddp(self, model: nn.Module, device_ids: list[int] | None) -> nn.Module:
        if self._world_size <= 1:
            return model  # a one-rank DDP wrapper only costs time (~14% per step on an H200)
        return DistributedDataParallel(TrainingStepModule(model), device_ids=device_ids,
                                       process_group=self.process_group, **self.ddp_kwargs)

    def get_model_from_plugin(self, model: nn.Module) -> nn.Module:
        while isinstance(model, (DistributedDataParallel, TrainingStepModule)):
            model = model.module
        return model

    # -- 3. step ------------------------------------------------------------------------------

    def on_before_forward(self, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        device = self._device
        if device is None or device.type == "cpu":
            return None  # batches are CPU tensors already; the core's default checks the rest
        return move_to_device(args, device)  # type: ignore[no-any-return]

    def block_backward_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        # Returned, not entered: the core enters it around forward AND backward.
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return nullcontext()

    # -- checkpoints -------------------------------------------------------------------------

    def collect_state(self, trainer: Trainer) -> None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        for optimizer in trainer.optimizers:
            if isinstance(optimizer, ZeroRedundancyOptimizer):
                optimizer.consolidate_state_dict(to=0)  # every rank sends its shard's state to rank 0

    # -- 4. collectives -----------------------------------------------------------------------

    def data_parallel_group(self) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def barrier(self, name: str) -> None:
        if self._world_size <= 1:
            return
        if dist.get_backend(self.process_group) == "gloo":
            # Names the ranks that did not arrive, instead of a bare timeout.
            try:
                dist.monitored_barrier(self.process_group, timeout=timedelta(seconds=self.timeout), wait_all_ranks=True)
            except RuntimeError as exc:
                raise RuntimeError(f"barrier {name!r}: {exc}") from exc
        else:
            dist.barrier(self.process_group)

    @hookimpl(wrapper=True)
    def broadcast(self, obj: Any, src: int) -> Generator[None, Any, Any]:
        # A wrapper, because a plain firstresult implementation cannot return None: pluggy would
        # take that for "not handled" and rank 1 would get its own object from the default.
        result = yield
        if self._world_size <= 1:
            return result
        holder = [obj]
        dist.broadcast_object_list(holder, src=src, group=self.process_group)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any] | None:
        if self._world_size <= 1:
            return None
        gathered: list[Any] = [None] * self._world_size
        dist.all_gather_object(gathered, obj, group=self.process_group)
        return gathered

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor | None:
        if op not in ("mean", "sum"):
            raise ValueError(f"reduce(op={op!r}): use 'mean' or 'sum'")
        if self._world_size <= 1:
            return None
        result = tensor.clone()
        dist.all_reduce(result, op=dist.ReduceOp.SUM, group=self.process_group)
        if op == "mean":
            result /= self._world_size
        return result


class DDPZeroPlugin(DDPPlugin):
    """``DDPPlugin(zero_redundancy=True)``: DDP with ZeRO-1 sharded optimizer state (entry point ``ddp_zero``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("zero_redundancy", True)
        super().__init__(**kwargs)


def _launcher_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _cuda_run(trainer: Trainer) -> bool:
    if trainer.accelerator is not None:
        return trainer.accelerator == "cuda"
    return torch.cuda.is_available()


def _local_processes(trainer: Trainer) -> int:
    if isinstance(trainer.devices, int):
        return trainer.devices
    return max(1, torch.cuda.device_count()) if _cuda_run(trainer) else 1
