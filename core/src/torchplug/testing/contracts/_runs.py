"""What the contracts share: the Trainer arguments of a contract run, the three in-process runs
(fit, resume, failing fit) and the hooks the core fires without a plugin, per-session caching of
expensive runs, failure messages, and the multi-process runner with its gradient-sync probe.

Everything a spawned process unpickles (``_SyncProbe``, ``_preinit_worker``) lives here at module
level, so that the workers can import it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from torchplug.hookspecs import hookimpl
from torchplug.plugin import Plugin
from torchplug.testing.models import TinyMLP, tiny_loader
from torchplug.testing.recorder import HookRecorder
from torchplug.trainer import Trainer

#: Seconds a multi-process contract run may take before its processes are killed.
PROCESS_TIMEOUT_S = 180.0
#: Process-group timeout inside those runs: a lost peer fails fast instead of hanging.
PG_TIMEOUT_S = 60.0
#: Hooks only global rank 0 calls (it alone writes checkpoints and metrics rows).
RANK_ZERO_ONLY = frozenset({"on_save_checkpoint", "get_state_dicts", "on_log_metrics"})
#: Hooks of the launching process and of Trainer construction, not of one process's fit.
LAUNCHER_ONLY = frozenset({"launch", "check_configuration"})

_has_timeout_plugin = importlib.util.find_spec("pytest_timeout") is not None


def _timeout(seconds: int) -> Callable[[Any], Any]:
    return pytest.mark.timeout(seconds) if _has_timeout_plugin else (lambda f: f)


def _broken(contract: str, plugin: object, detail: str) -> None:
    """Fail the test with a message naming the broken contract and the plugin."""
    pytest.fail(f"Contract broken: {contract}\n  plugin: {_describe(plugin)}\n  {detail}", pytrace=False)


def _describe(plugin: object) -> str:
    module = type(plugin).__module__
    top = module.partition(".")[0]
    try:
        import importlib.metadata

        dists = importlib.metadata.packages_distributions().get(top) or []
    except Exception:
        dists = []
    where = f", distribution {dists[0]}" if dists else ""
    return f"{plugin!r} ({module}.{type(plugin).__qualname__}{where})"


def _fit_kwargs(root: Path, trainer_kwargs: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """The Trainer arguments of a contract run: accumulation, clipping, validation and
    checkpoints all on, so that every hook the core has has a reason to fire; then the
    subclass's ``trainer_kwargs``; then what the contract itself needs (``overrides``)."""
    kwargs: dict[str, Any] = {
        "max_epochs": 1,
        "limit_train_batches": 4,
        "accumulate_grad_batches": 2,
        "gradient_clip_val": 1.0,
        "enable_progress_bar": False,
        "logger": False,
        "enable_checkpointing": True,
        "default_root_dir": root,
        "autoload_plugins": False,
    }
    kwargs.update(trainer_kwargs or {})
    kwargs.update(overrides)
    return kwargs


class _ContractProbeError(RuntimeError):
    """Raised on purpose by the failing-fit run."""


class _FailingMLP(TinyMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 1:
            raise _ContractProbeError("raised on purpose by the conformance suite")
        return super().training_step(batch, batch_idx)


def _reference_hooks(request: pytest.FixtureRequest, root: Path) -> dict[str, set[str]]:
    """Hooks the core fires with no plugin at all, for the contract runs (cached per session)."""
    key = _stash_key("reference")
    cache = request.config.stash.get(key, None)
    if cache is None:
        cache = {name: rec.fired() for name, rec in _three_runs(None, {}, root).items()}
        request.config.stash[key] = cache
    return cache


def _three_runs(factory: Callable[[], object] | None, trainer_kwargs: dict[str, Any], root: Path
                ) -> dict[str, HookRecorder]:
    """A fit, a resume from its checkpoint, and a fit whose training_step raises."""
    def plugins(rec: HookRecorder) -> list[object]:
        return [factory(), rec] if factory is not None else [rec]

    recs = {"fit": HookRecorder(), "resume": HookRecorder(), "error": HookRecorder()}
    trainer = Trainer(plugins=plugins(recs["fit"]), **_fit_kwargs(root / "fit", trainer_kwargs))
    trainer.fit(TinyMLP(), tiny_loader(n=32, batch_size=4), tiny_loader(n=16))
    if trainer.checkpoint_path is not None:  # else the resume's hooks are reported missing
        resumed = Trainer(plugins=plugins(recs["resume"]), **_fit_kwargs(root / "resume", trainer_kwargs, max_epochs=2))
        resumed.fit(TinyMLP(), tiny_loader(n=32, batch_size=4), tiny_loader(n=16), ckpt_path=trainer.checkpoint_path)
    failing = Trainer(plugins=plugins(recs["error"]), **_fit_kwargs(root / "error", trainer_kwargs))
    try:
        failing.fit(_FailingMLP(), tiny_loader(n=32, batch_size=4))
    except BaseException as exc:
        chain: list[BaseException] = []
        while exc is not None and exc not in chain:
            chain.append(exc)
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        if not any(isinstance(e, _ContractProbeError) for e in chain):
            raise
        recs["error"].raised = True  # type: ignore[attr-defined]
    else:
        recs["error"].raised = False  # type: ignore[attr-defined]
    return recs


_STASH_KEYS: dict[str, pytest.StashKey[Any]] = {}


def _stash_key(name: str) -> pytest.StashKey[Any]:
    if name not in _STASH_KEYS:
        _STASH_KEYS[name] = pytest.StashKey[Any]()
    return _STASH_KEYS[name]


def _cached(request: pytest.FixtureRequest, name: str, make: Callable[[], Any]) -> Any:
    """One result per test class and name, for the expensive multi-process runs."""
    key = _stash_key("runs")
    cache: dict[tuple[Any, str], Any] = request.config.stash.setdefault(key, {})
    slot = (request.node.cls, name)
    if slot not in cache:
        try:
            cache[slot] = ("ok", make())
        except BaseException as exc:
            if not isinstance(exc, Exception) and not isinstance(exc, pytest.fail.Exception):
                raise
            cache[slot] = ("error", exc)
    status, value = cache[slot]
    if status == "error":
        raise value
    return value


# ----------------------------------------------------------------------------------------------
# Multi-process runs
# ----------------------------------------------------------------------------------------------


class _SyncProbe(Plugin):
    """Observes gradient synchronisation on every rank of a multi-process fit; writes what it
    saw to ``out_dir/probe-<pid>.json`` at ``on_fit_end``."""

    plugin_name = "conformance_sync_probe"

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self._trainer: Any = None
        self._module: nn.Module | None = None
        self._wrapped: str | None = None
        self._roundtrip: str | None = None
        self._ddp_found = False
        self._comm_hook_error: str | None = None
        self._reduced: Counter[int] = Counter()
        self._batches: list[dict[str, Any]] = []
        self._windows: list[dict[str, Any]] = []
        self._collectives = 0
        self._restore: dict[str, Any] = {}
        self._optimizer_params: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["out_dir"])  # type: ignore[misc]

    def on_fit_start(self, trainer: Any, model: nn.Module) -> None:
        self._trainer, self._module = trainer, model
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        trained = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        self._optimizer_params = {"missing": trained, "optimizers": len(trainer.optimizers)}
        # Gradient collectives issued from Python (FSDP2's reduce-scatter, a strategy's own
        # all-reduce), counted per micro-batch: DDP's own go through its comm hook below.
        for name in _GRADIENT_COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._restore[name] = original

            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self._collectives += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    @hookimpl(tryfirst=True)
    def on_before_forward(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        if self._wrapped is not None or not model.training or self._trainer is None:
            return
        self._wrapped = type(model).__qualname__
        unwrapped = self._trainer.hooks.get_model_from_plugin(model=model)
        self._roundtrip = "same" if unwrapped is self._module else type(unwrapped).__qualname__
        from torch.nn.parallel import DistributedDataParallel

        ddp = next((m for m in model.modules() if isinstance(m, DistributedDataParallel)), None)
        if ddp is None:
            return
        self._ddp_found = True
        # DDP inspects the hook's annotations, which ``from __future__ import annotations`` turns
        # into strings: hand it an unannotated lambda.
        hook = lambda state, bucket: self._count_and_allreduce(state, bucket)  # noqa: E731
        try:
            ddp.register_comm_hook(getattr(ddp, "process_group", None), hook)
        except Exception as exc:  # the plugin registered its own hook: counts are not available
            self._comm_hook_error = f"{type(exc).__name__}: {exc}"

    def _count_and_allreduce(self, state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        for param in bucket.parameters():
            self._reduced[id(param)] += 1
        return default_hooks.allreduce_hook(state, bucket)

    def on_train_batch_end(self, trainer: Any, batch_idx: int) -> None:
        window_end = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        reduced, self._reduced = self._reduced, Counter()
        entry: dict[str, Any] = {
            "batch_idx": batch_idx, "window_end": window_end,
            "params_reduced": len(reduced), "max_reductions": max(reduced.values(), default=0),
            "collectives": self._collectives,
        }
        self._collectives = 0
        if not window_end:  # gradients are still there: compare them across ranks
            entry["grad_spread"] = self._spread()
        self._batches.append(entry)

    def on_before_optimizer_step(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
        self._windows.append({"step": trainer.global_step if hasattr(trainer, "global_step") else None,
                              "grad_spread": self._spread()})

    def _spread(self) -> float | None:
        """Max absolute difference of the gradients between ranks (None on one process)."""
        if self._module is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        grads = []
        for p in self._module.parameters():
            if not p.requires_grad:
                continue
            if _is_dtensor(p):
                if p.grad is None:
                    return None  # sharded and not reduced yet (FSDP2 keeps unsharded grads inside no-sync)
                grads.append(_full(p.grad).detach().float().flatten())
            else:
                grads.append((p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten())
        flat = torch.cat(grads)
        if dist.get_backend() != "nccl":
            flat = flat.cpu()
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        return max(float((g - gathered[0]).abs().max()) for g in gathered[1:])

    def on_fit_end(self, trainer: Any, model: nn.Module) -> None:
        for name, original in self._restore.items():
            setattr(dist, name, original)
        self._restore.clear()
        initialised = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialised else trainer.global_rank
        # what the plan handshake relies on: every rank's object, in rank order (a collective: all ranks run it)
        gathered = trainer.hooks.all_gather_object(obj={"rank": rank})
        report = {
            "pid": os.getpid(),
            "rank": rank,
            "world_size": trainer.world_size,
            "gathered": gathered,
            "wrapped": self._wrapped, "roundtrip": self._roundtrip, "ddp_found": self._ddp_found,
            "comm_hook_error": self._comm_hook_error,
            "n_params": sum(1 for p in model.parameters() if p.requires_grad),
            "batches": self._batches, "windows": self._windows, "optimizer_params": self._optimizer_params,
            "params": _full_vector(model).tolist(),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"probe-{os.getpid()}.json").write_text(json.dumps(report), encoding="utf-8")


#: The torch.distributed functions through which a strategy reduces gradients from Python.
_GRADIENT_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single")


def _is_dtensor(tensor: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor: nothing is sharded
        return False
    return isinstance(tensor, DTensor)


def _full_vector(module: nn.Module) -> torch.Tensor:
    """The parameters as one float64 CPU vector, sharded ones gathered (a collective on every rank)."""
    return torch.cat([_full(p).detach().to("cpu", torch.float64).flatten() for p in module.parameters()])


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _read_probes(out_dir: Path) -> list[dict[str, Any]]:
    return sorted((json.loads(p.read_text(encoding="utf-8")) for p in out_dir.glob("probe-*.json")),
                  key=lambda r: r["rank"])


def _preinit_worker(rank: int, world_size: int, run_dir: str) -> None:
    """One rank of the "already initialised process group" launch mode (module level: spawned)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    run = Path(run_dir)
    timeout = timedelta(seconds=PG_TIMEOUT_S)
    store = dist.FileStore(str(run / "store"), world_size)  # type: ignore[attr-defined]
    store.set_timeout(timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        with open(run / "payload.pkl", "rb") as f:
            plugin, trainer_kwargs = pickle.load(f)
        recorder = HookRecorder(run / "hookcalls")
        probe = _SyncProbe(run / "probes")
        trainer = Trainer(plugins=[plugin, probe, recorder], **_fit_kwargs(run / f"rank{rank}", trainer_kwargs))
        trainer.fit(TinyMLP(), tiny_loader(n=64, batch_size=4), tiny_loader(n=16))
        result = {"rank": rank, "world_size": trainer.world_size,
                  "group_initialised_after_fit": dist.is_initialized()}
        (run / f"result-{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_preinitialised(plugin: object, trainer_kwargs: dict[str, Any], run_dir: Path, world_size: int) -> Path:
    import torch.multiprocessing as mp

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "payload.pkl", "wb") as f:
        pickle.dump((plugin, trainer_kwargs), f)
    context = mp.start_processes(  # type: ignore[attr-defined,no-untyped-call]
        _preinit_worker, args=(world_size, str(run_dir)), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world_size} ranks did not finish within {PROCESS_TIMEOUT_S:g} s")
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    return run_dir
