"""Conformance suite: the contracts a torchplug plugin keeps, as pytest classes to subclass.

A plugin project runs it in its own CI. In a test module::

    import pytest
    from torchplug.testing.conformance import PrecisionPluginContract

    from my_plugin import MyPrecision

    class TestMyPrecision(PrecisionPluginContract):
        @pytest.fixture
        def plugin_factory(self):
            return MyPrecision                     # called with no arguments for each run

        @pytest.fixture
        def trainer_kwargs(self):
            return {"precision": "bf16"}           # what a user passes along with the plugin

pytest collects the inherited tests. Each failure names the contract that broke, the plugin
and what was observed. Plugin classes must live in an importable module (not inside a test
function): strategy contracts pickle them into worker processes.

* :class:`PluginContract` (every plugin): registers cleanly; survives pickling into workers;
  every hook the core calls still fires with the plugin active (fit, resume, failing fit);
  no process group is left behind; no host read (``.item()``, ``float(t)``, ``.cpu()``, ...)
  per step beyond the ``host_reads_per_step`` fixture's allowance (default 0; precision
  contracts allow fp16's one overflow check), since on a GPU each one stalls the host.
* :class:`PrecisionPluginContract`: declares ``role = "precision"``; autocast is really active
  inside ``training_step`` (a matmul computes in the plugin's dtype); gradients are unscaled
  exactly once before clipping (at their true scale, compared with an fp32 recomputation, and a
  second ``unscale_gradients`` changes nothing); ``clip_gradients`` returns the total norm and
  honours ``norm_type`` (2 and inf).
* :class:`StrategyPluginContract`: declares ``role = "strategy"``; on 2 gloo ranks no gradient
  all-reduce happens inside ``block_backward_sync`` and each gradient is all-reduced exactly once
  after it; ``get_model_from_plugin`` undoes ``configure_ddp``; replicas stay identical; every
  hook fires in each launch mode (in-process, ``devices=2`` workers, an already initialised
  process group), which the plugin leaves initialised.

Multi-process contracts use real processes, a ``FileStore`` in a temporary folder (no TCP
port), explicit timeouts and ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from torchplug.hookspecs import hookimpl
from torchplug.loop import FitRun
from torchplug.manager import get_plugin_manager, role_of
from torchplug.plugin import Plugin
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader
from torchplug.testing.recorder import HookRecorder
from torchplug.testing.syncs import reads_per_step
from torchplug.trainer import Trainer
from torchplug.utils import move_to_device, optimizer_params

__all__ = ["PluginContract", "PrecisionPluginContract", "StrategyPluginContract"]

#: Seconds a multi-process contract run may take before its processes are killed.
PROCESS_TIMEOUT_S = 180.0
#: Process-group timeout inside those runs: a lost peer fails fast instead of hanging.
PG_TIMEOUT_S = 60.0
#: Hooks only global rank 0 calls (it alone writes checkpoints).
RANK_ZERO_ONLY = frozenset({"on_save_checkpoint"})
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


class _DtypeProbeMLP(TinyMLP):
    """Records the dtype of its first Linear's output (a matmul) in every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.observed: list[tuple[str, bool]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        hidden = self.net[0](x)
        self.observed.append((str(hidden.dtype).removeprefix("torch."), torch.is_autocast_enabled(x.device.type)))
        logits = self.net[2](self.net[1](hidden))
        return nn.functional.cross_entropy(logits.float(), y)


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
# Every plugin
# ----------------------------------------------------------------------------------------------


class PluginContract:
    """Contracts every plugin keeps. Subclass it (or a role's contract) as ``Test<Something>``
    and define the ``plugin_factory`` fixture."""

    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        """Return a callable taking no arguments that makes a new plugin object (e.g. the class)."""
        raise NotImplementedError(
            f"{type(self).__name__}: define a `plugin_factory` fixture returning a zero-argument callable "
            "that makes a new plugin, e.g. `return MyPlugin`."
        )

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        """Extra Trainer arguments of every contract run (e.g. ``{"precision": "bf16"}``)."""
        return {}

    @pytest.fixture
    def host_reads_per_step(self) -> float:
        """Host reads per optimizer step the plugin may add: what a hand-written loop using the
        same library makes (e.g. GradScaler.step's overflow check). Default 0."""
        return 0.0

    @pytest.fixture(autouse=True)
    def _contract_environment(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        # Installed plugins and the user's environment must not take part in a contract run.
        for name in ("TORCHPLUG_PLUGINS", "TORCHPLUG_BLOCK_PLUGINS", "TORCHPLUG_TRACE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        group_before = dist.is_available() and dist.is_initialized()
        yield
        if not group_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            pytest.fail("a process group was left initialised in the test process after the contract run "
                        "(teardown_environment must destroy the group setup_environment created)", pytrace=False)

    # -- tests -------------------------------------------------------------------------------
    def test_registers_cleanly(self, plugin_factory: Callable[[], object]) -> None:
        plugin = plugin_factory()
        try:
            pm = get_plugin_manager([plugin], autoload=False, env={})
        except Exception as exc:
            _broken("the plugin registers with a torchplug plugin manager", plugin, f"{type(exc).__name__}: {exc}")
        if not pm.get_hookcallers(plugin):
            _broken("the plugin implements at least one hook", plugin,
                    "no method or function was registered as a hook implementation (torchplug.hookspecs lists them)")

    def test_survives_pickling_into_workers(self, plugin_factory: Callable[[], object],
                                            trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
        plugin = plugin_factory()
        try:
            trainer = Trainer(plugins=[plugin], **_fit_kwargs(tmp_path, trainer_kwargs))
        except Exception as exc:
            _broken("a Trainer accepts the plugin (with trainer_kwargs)", plugin, f"{type(exc).__name__}: {exc}")
        try:
            copy_ = pickle.loads(pickle.dumps(trainer))
        except Exception as exc:
            _broken("the plugin can be pickled (a Trainer pickles its plugins into worker processes)", plugin,
                    f"pickling a Trainer with it raised {type(exc).__name__}: {exc}. Define the class at module level "
                    "and drop per-process state (process groups, open files) in __getstate__.")
        rebuilt = [rec.plugin for rec in copy_.pm.records if type(rec.plugin) is type(plugin)]
        if not rebuilt:
            _broken("the plugin can be pickled", plugin, "the unpickled Trainer has no plugin of this class")

    def test_every_hook_fires_in_process(self, request: pytest.FixtureRequest, plugin_factory: Callable[[], object],
                                         trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
        reference = _reference_hooks(request, tmp_path / "reference")
        plugin = plugin_factory()
        try:
            recs = _three_runs(plugin_factory, trainer_kwargs, tmp_path / "plugin")
        except Exception as exc:
            _broken("a fit with the plugin runs in-process", plugin,
                    f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}")
        for run, expected in reference.items():
            missing = sorted(expected - recs[run].fired())
            if missing:
                _broken("every hook fires (in-process)", plugin,
                        f"in the {run!r} run these hooks never fired with the plugin active, but do without it: "
                        f"{', '.join(missing)}")
        if not recs["error"].raised:  # type: ignore[attr-defined]
            _broken("a fit that fails raises", plugin,
                    "training_step raised, and fit returned normally: the plugin swallowed the exception")

    def test_no_host_read_per_step(self, plugin_factory: Callable[[], object], trainer_kwargs: dict[str, Any],
                                   host_reads_per_step: float, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
        # The run takes the accelerator's path (the loss check queued on the device), so the
        # count is what a GPU run would sync on; 12 steps minus 4 cancels setup and teardown.
        monkeypatch.setattr(FitRun, "_defer_loss_checks", lambda self: True)
        plugin = plugin_factory()

        def fit_for(steps: int) -> None:
            kwargs = _fit_kwargs(tmp_path / str(steps), trainer_kwargs, max_steps=steps, limit_train_batches=None,
                                 accumulate_grad_batches=1, enable_checkpointing=False, log_every_n_steps=1000)
            Trainer(plugins=[plugin_factory()], **kwargs).fit(TinyMLP(), tiny_loader(n=64, batch_size=4))

        try:
            per_step, reads = reads_per_step(fit_for)
        except Exception as exc:
            _broken("a fit with the plugin runs in-process", plugin, f"{type(exc).__name__}: {exc}")
        if per_step > host_reads_per_step:
            _broken("no host read per step", plugin,
                    f"{per_step:g} host reads per optimizer step (.item(), float(t), bool(t), .tolist(), .cpu(), ...), "
                    f"{host_reads_per_step:g} allowed. On a GPU each one waits for all queued device work. Keep "
                    "values on the device (log tensors; torch.where instead of if), or read them at an interval. "
                    f"Call sites over 12 steps:\n{reads.report()}")


# ----------------------------------------------------------------------------------------------
# Precision plugins
# ----------------------------------------------------------------------------------------------

_DTYPES = {16: torch.float16, "16": torch.float16, "16-mixed": torch.float16,
           "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


class _PrecisionProbe(Plugin):
    """Observes one precision plugin at each window's end (in-process runs only)."""

    plugin_name = "conformance_precision_probe"

    def __init__(self) -> None:
        self.windows: list[dict[str, Any]] = []
        self.clips: list[dict[str, Any]] = []
        self._window_args: list[tuple[Any, ...]] = []
        self._trainer: Any = None
        self._module: nn.Module | None = None

    def on_fit_start(self, trainer: Any, model: nn.Module) -> None:
        self._trainer, self._module = trainer, model

    @hookimpl(tryfirst=True)
    def on_before_forward(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        if model.training:
            if args[1] % self._trainer.accumulate_grad_batches == 0:
                self._window_args = []
            self._window_args.append(args)

    def on_before_optimizer_step(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
        params = [p for p in optimizer_params(optimizer) if p.grad is not None]
        grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        window: dict[str, Any] = {"finite": finite, "norm": _total_norm(grads, 2.0)}
        if finite:
            window["fp32_norm"] = self._fp32_norm()
        try:
            trainer.hooks.unscale_gradients(optimizer=optimizer)
            window["second_unscale_error"] = None
        except Exception as exc:
            window["second_unscale_error"] = f"{type(exc).__name__}: {exc}"
        after = [p.grad.detach() for p in params]  # type: ignore[union-attr]
        window["second_unscale_change"] = max(
            (float(((a.double() - g.double()).abs().max() / g.double().abs().max().clamp_min(1e-30)).item())
             for a, g in zip(after, grads) if bool(torch.isfinite(g).all())), default=0.0)
        self.windows.append(window)

    def _fp32_norm(self) -> float:
        """The window's gradient norm recomputed in fp32 on a fresh copy of the model (not a
        deepcopy: apex patches ``forward`` with closures over the original module)."""
        assert self._module is not None
        device = next(self._module.parameters()).device
        clone = TinyMLP().to(device)
        clone.load_state_dict({k: v.float() for k, v in self._module.state_dict().items()})
        with torch.autocast(device.type, enabled=False):
            for args in self._window_args:
                out = clone.training_step(*move_to_device(args, device))
                (out.float() / len(self._window_args)).backward()  # type: ignore[no-untyped-call]
        return _total_norm([p.grad for p in clone.parameters() if p.grad is not None], 2.0)

    @hookimpl(wrapper=True)
    def clip_gradients(self, grad_clip_val: float, optimizer: torch.optim.Optimizer, norm_type: float) -> Iterator[Any]:
        grads = [p.grad.detach().clone() for p in optimizer_params(optimizer) if p.grad is not None]
        result = yield
        after = [p.grad.detach().clone() for p in optimizer_params(optimizer) if p.grad is not None]
        flat_before = torch.cat([g.double().flatten() for g in grads])
        flat_after = torch.cat([g.double().flatten() for g in after])
        cos = float(torch.nn.functional.cosine_similarity(flat_before, flat_after, dim=0))
        self.clips.append({
            "clip": grad_clip_val, "norm_type": norm_type, "given_norm": _total_norm(grads, norm_type),
            "returned": float(result) if isinstance(result, (torch.Tensor, float, int)) else None,
            "returned_type": type(result).__name__, "after_norm": _total_norm(after, norm_type), "cosine": cos,
            "finite": bool(torch.isfinite(flat_before).all()),
        })
        return result


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> float:
    if not grads:
        return 0.0
    flat = torch.cat([g.detach().double().flatten() for g in grads])
    return float(flat.abs().max()) if math.isinf(norm_type) else float(flat.norm(norm_type))


class PrecisionPluginContract(PluginContract):
    """Contracts of a precision plugin (``role = "precision"``), checked in-process.

    Fixtures to define: ``plugin_factory``; optionally ``trainer_kwargs`` (e.g.
    ``{"precision": 16}``) and ``expected_dtype`` (default: from ``trainer_kwargs["precision"]``;
    return ``None`` to skip the autocast contract where the plugin cannot autocast, saying why).
    """

    @pytest.fixture
    def expected_dtype(self, trainer_kwargs: dict[str, Any]) -> torch.dtype | None:
        """The dtype a matmul computes in inside ``training_step`` with the plugin active."""
        precision = trainer_kwargs.get("precision")
        if precision not in _DTYPES:
            raise NotImplementedError(
                f"{type(self).__name__}: define an `expected_dtype` fixture (e.g. torch.bfloat16), or pass "
                "precision=16 or 'bf16' in `trainer_kwargs`."
            )
        return _DTYPES[precision]

    @pytest.fixture
    def host_reads_per_step(self, expected_dtype: torch.dtype | None) -> float:
        """fp16 loss scaling reads its overflow flag once per step (GradScaler.step does, in a
        hand-written loop too); bf16 reads nothing."""
        return 1.0 if expected_dtype == torch.float16 else 0.0

    def _fit(self, plugin: object, trainer_kwargs: dict[str, Any], root: Path, module: nn.Module,
             **overrides: Any) -> tuple[_PrecisionProbe, Trainer]:
        probe = _PrecisionProbe()
        kwargs = _fit_kwargs(root, trainer_kwargs, max_steps=6, max_epochs=1, limit_train_batches=None,
                             enable_checkpointing=False, **overrides)
        trainer = Trainer(plugins=[plugin, probe], **kwargs)
        trainer.fit(module, tiny_loader(n=48, batch_size=4))
        return probe, trainer

    def test_declares_precision_role(self, plugin_factory: Callable[[], object]) -> None:
        plugin = plugin_factory()
        if role_of(plugin) != "precision":
            _broken("a precision plugin declares role = 'precision'", plugin,
                    f"role is {role_of(plugin)!r}; without it two precision plugins are not refused together")

    def test_autocast_active_in_forward(self, plugin_factory: Callable[[], object], trainer_kwargs: dict[str, Any],
                                        expected_dtype: torch.dtype | None, tmp_path: Path) -> None:
        if expected_dtype is None:
            pytest.skip("expected_dtype is None: this plugin does not autocast in this environment")
        plugin = plugin_factory()
        module = _DtypeProbeMLP()
        try:
            self._fit(plugin, trainer_kwargs, tmp_path, module)
        except Exception as exc:
            _broken("autocast is active inside the forward", plugin, f"the fit raised {type(exc).__name__}: {exc}")
        want = str(expected_dtype).removeprefix("torch.")
        wrong = sorted({dtype for dtype, _ in module.observed if dtype != want})
        if not module.observed or wrong:
            _broken("autocast is active inside the forward", plugin,
                    f"a Linear (matmul) inside training_step computed in {', '.join(wrong) or 'nothing'}, expected "
                    f"{want}: forward_context must return an active autocast context (torch.autocast) for the "
                    f"model's device. Observed (dtype, autocast enabled): {module.observed[:4]}")
        device_type = next(module.parameters()).device.type
        if torch.is_autocast_enabled(device_type):
            _broken("autocast is active inside the forward, and only there", plugin,
                    f"autocast is still enabled for {device_type!r} after fit returned")

    @pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["norm2", "inf"])
    def test_clip_gradients_returns_total_norm(self, plugin_factory: Callable[[], object],
                                               trainer_kwargs: dict[str, Any], tmp_path: Path,
                                               norm_type: float) -> None:
        plugin = plugin_factory()
        clip = 1e-3  # below any gradient norm of the tiny model: every window is clipped
        contract = f"clip_gradients returns the total norm and honours norm_type={norm_type}"
        try:
            probe, _ = self._fit(plugin, trainer_kwargs, tmp_path, TinyMLP(), gradient_clip_val=clip,
                                 gradient_clip_norm_type=norm_type)
        except Exception as exc:
            _broken(contract, plugin, f"the fit raised {type(exc).__name__}: {exc}")
        finite = [c for c in probe.clips if c["finite"]]
        if not finite:
            _broken(contract, plugin, f"no window had finite gradients to clip ({len(probe.clips)} clip calls)")
        for i, c in enumerate(finite):
            if c["returned_type"] != "Tensor":
                _broken(contract, plugin,
                        f"clip_gradients returned {c['returned_type']}, expected the total norm as a tensor")
            if not math.isclose(c["returned"], c["given_norm"], rel_tol=1e-3, abs_tol=1e-7):
                _broken(contract, plugin,
                        f"window {i}: returned norm {c['returned']:.6g}, but the {norm_type}-norm of the gradients it "
                        f"was given is {c['given_norm']:.6g} (norm_type ignored, or the norm of other tensors)")
            if c["after_norm"] > clip * (1 + 1e-2) + 1e-7:
                _broken(contract, plugin,
                        f"window {i}: after clipping to {clip}, the gradients' {norm_type}-norm is "
                        f"{c['after_norm']:.6g}")
            if c["cosine"] < 0.999:
                _broken(contract, plugin,
                        f"window {i}: clipping changed the gradients' direction (cosine {c['cosine']:.4f})")

    def test_unscale_exactly_once_before_clipping(self, plugin_factory: Callable[[], object],
                                                  trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
        plugin = plugin_factory()
        contract = "gradients are unscaled exactly once, before on_before_optimizer_step and clip_gradients"
        try:
            probe, _ = self._fit(plugin, trainer_kwargs, tmp_path, TinyMLP(), gradient_clip_val=1e6)
        except Exception as exc:
            _broken(contract, plugin, f"the fit raised {type(exc).__name__}: {exc} (after a second unscale_gradients, "
                    "clip_gradients must not unscale again)")
        finite = [w for w in probe.windows if w["finite"]]
        if not finite:
            _broken(contract, plugin, f"every one of {len(probe.windows)} windows had non-finite gradients")
        for i, w in enumerate(finite):
            ratio = w["norm"] / w["fp32_norm"] if w["fp32_norm"] else float("nan")
            if not 0.9 <= ratio <= 1.1:
                _broken(contract, plugin,
                        f"window {i}: the optimizer's gradient norm is {w['norm']:.6g}, the same window "
                        f"recomputed in fp32 gives {w['fp32_norm']:.6g} (ratio {ratio:.4g}): gradients were not "
                        "brought to their true scale by unscale_gradients (or were unscaled twice)")
            if w["second_unscale_error"]:
                _broken(contract, plugin,
                        f"a second unscale_gradients in the same step raised {w['second_unscale_error']}")
            if w["second_unscale_change"] > 1e-6:
                _broken(contract, plugin,
                        f"a second unscale_gradients in the same step changed the gradients (max relative change "
                        f"{w['second_unscale_change']:.3g}); it must be a no-op once they are unscaled")


# ----------------------------------------------------------------------------------------------
# Strategy plugins
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

    def __getstate__(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["out_dir"])  # type: ignore[misc]

    def on_fit_start(self, trainer: Any, model: nn.Module) -> None:
        self._trainer, self._module = trainer, model

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
        }
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
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                 for p in self._module.parameters() if p.requires_grad]
        flat = torch.cat(grads)
        if dist.get_backend() != "nccl":
            flat = flat.cpu()
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        return max(float((g - gathered[0]).abs().max()) for g in gathered[1:])

    def on_fit_end(self, trainer: Any, model: nn.Module) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        report = {
            "pid": os.getpid(),
            "rank": dist.get_rank() if initialised else trainer.global_rank,
            "world_size": trainer.world_size,
            "wrapped": self._wrapped, "roundtrip": self._roundtrip, "ddp_found": self._ddp_found,
            "comm_hook_error": self._comm_hook_error,
            "n_params": sum(1 for p in model.parameters() if p.requires_grad),
            "batches": self._batches, "windows": self._windows,
            "params": parameters_vector(model).tolist(),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"probe-{os.getpid()}.json").write_text(json.dumps(report), encoding="utf-8")


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


class StrategyPluginContract(PluginContract):
    """Contracts of a strategy plugin (``role = "strategy"``), checked on 2 gloo ranks on the CPU
    (plus the in-process contracts of every plugin).

    Fixtures to define: ``plugin_factory``; optionally ``trainer_kwargs`` and ``world_size``.
    """

    @pytest.fixture
    def world_size(self) -> int:
        """Processes of the multi-process runs."""
        return 2

    @pytest.fixture
    def preinitialised_run(self, request: pytest.FixtureRequest, plugin_factory: Callable[[], object],
                           trainer_kwargs: dict[str, Any], world_size: int,
                           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        """Each rank initialises a gloo group (FileStore) and then fits with the plugin."""
        def make() -> dict[str, Any]:
            plugin = plugin_factory()
            run = tmp_path_factory.mktemp("preinit")
            try:
                _run_preinitialised(plugin, trainer_kwargs, run, world_size)
            except Exception as exc:
                _broken("the plugin trains in an already initialised process group (Ray Train, torchrun fixtures)",
                        plugin, f"{type(exc).__name__}: {exc}")
            results = [json.loads((run / f"result-{r}.json").read_text(encoding="utf-8")) for r in range(world_size)]
            return {"plugin": plugin, "results": results, "probes": _read_probes(run / "probes"),
                    "calls": HookRecorder(run / "hookcalls").by_process()}
        return _cached(request, "preinit", make)  # type: ignore[no-any-return]

    @pytest.fixture
    def spawned_run(self, request: pytest.FixtureRequest, plugin_factory: Callable[[], object],
                    trainer_kwargs: dict[str, Any], world_size: int,
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        """``Trainer(devices=world_size)``: the plugin starts the worker processes itself."""
        def make() -> dict[str, Any]:
            plugin = plugin_factory()
            run = tmp_path_factory.mktemp("spawned")
            recorder = HookRecorder(run / "hookcalls")
            module = TinyMLP()
            before = parameters_vector(module)
            trainer = Trainer(plugins=[plugin, _SyncProbe(run / "probes"), recorder],
                              **_fit_kwargs(run / "root", trainer_kwargs, devices=world_size))
            try:
                trainer.fit(module, tiny_loader(n=64, batch_size=4), tiny_loader(n=16))
            except Exception as exc:
                _broken(f"the plugin trains in {world_size} processes it starts itself (devices={world_size})", plugin,
                        f"{type(exc).__name__}: {exc}")
            return {"plugin": plugin, "probes": _read_probes(run / "probes"), "calls": recorder.by_process(),
                    "before": before, "after": parameters_vector(module), "parent": os.getpid()}
        return _cached(request, "spawned", make)  # type: ignore[no-any-return]

    # -- tests -------------------------------------------------------------------------------
    def test_declares_strategy_role(self, plugin_factory: Callable[[], object]) -> None:
        plugin = plugin_factory()
        if role_of(plugin) != "strategy":
            _broken("a strategy plugin declares role = 'strategy'", plugin,
                    f"role is {role_of(plugin)!r}; without it two strategy plugins are not refused together")

    @_timeout(300)
    def test_no_gradient_sync_inside_block_backward_sync(self, preinitialised_run: dict[str, Any]) -> None:
        plugin, contract = preinitialised_run["plugin"], "no gradient all-reduce inside block_backward_sync"
        inside = 0
        for probe in preinitialised_run["probes"]:
            for batch in probe["batches"]:
                if batch["window_end"]:
                    continue
                inside += 1
                if batch["params_reduced"]:
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: micro-batch {batch['batch_idx']} (not the last of its accumulation "
                            f"window, so run inside block_backward_sync) all-reduced the gradients of "
                            f"{batch['params_reduced']} parameters through DDP. Return model.no_sync() from "
                            "block_backward_sync without entering it: the core enters it around forward AND backward.")
                if batch["grad_spread"] is not None and batch["grad_spread"] <= 1e-7:
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: after micro-batch {batch['batch_idx']} inside block_backward_sync "
                            "the ranks' gradients are identical although their data differ: they were synchronised")
        if not inside:
            _broken(contract, plugin, "no micro-batch ran inside block_backward_sync (accumulate_grad_batches=2)")

    @_timeout(300)
    def test_exactly_one_gradient_sync_after_block_backward_sync(self, preinitialised_run: dict[str, Any]) -> None:
        plugin = preinitialised_run["plugin"]
        contract = "each gradient is all-reduced exactly once per accumulation window, after block_backward_sync"
        for probe in preinitialised_run["probes"]:
            error = probe["comm_hook_error"]
            if error and "only be called once" not in error:
                raise AssertionError(f"conformance suite: could not count DDP all-reduces: {error}")
            counted = probe["ddp_found"] and not error
            for batch in probe["batches"]:
                if batch["window_end"] and counted and (
                        batch["params_reduced"] != probe["n_params"] or batch["max_reductions"] != 1):
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: the last micro-batch of the window ending at batch "
                            f"{batch['batch_idx']} all-reduced {batch['params_reduced']} of {probe['n_params']} "
                            f"parameters, some {batch['max_reductions']} times; expected each once")
            for i, window in enumerate(probe["windows"]):
                if window["grad_spread"] is None or window["grad_spread"] > 1e-6:
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: at the end of window {i} the ranks' gradients differ by up to "
                            f"{window['grad_spread']}: they were not averaged across processes")

    @_timeout(300)
    def test_get_model_from_plugin_round_trips(self, preinitialised_run: dict[str, Any]) -> None:
        plugin = preinitialised_run["plugin"]
        for probe in preinitialised_run["probes"]:
            if probe["roundtrip"] != "same":
                _broken("get_model_from_plugin(configure_ddp(model)) is the user's module", plugin,
                        f"rank {probe['rank']}: configure_ddp returned {probe['wrapped']}, and get_model_from_plugin "
                        f"of it returned {probe['roundtrip']} instead of the module given to fit")

    @_timeout(300)
    def test_every_hook_fires_with_initialised_process_group(self, request: pytest.FixtureRequest,
                                                             preinitialised_run: dict[str, Any],
                                                             world_size: int, tmp_path: Path) -> None:
        plugin, contract = preinitialised_run["plugin"], "every hook fires (already initialised process group)"
        expected = _reference_hooks(request, tmp_path / "reference")["fit"]
        for result in preinitialised_run["results"]:
            if result["world_size"] != world_size:
                _broken(contract, plugin, f"rank {result['rank']}: trainer.world_size was {result['world_size']} in a "
                        f"process group of {world_size}: the plugin must use the group it finds initialised")
            if not result["group_initialised_after_fit"]:
                _broken("the plugin leaves a process group it did not create initialised", plugin,
                        f"rank {result['rank']}: the group was destroyed by the fit")
        _check_processes(contract, plugin, preinitialised_run["calls"], expected, world_size, parent=None)
        _check_replicas(plugin, preinitialised_run["probes"], "already initialised process group")

    @_timeout(300)
    def test_every_hook_fires_in_spawned_workers(self, request: pytest.FixtureRequest, spawned_run: dict[str, Any],
                                                 world_size: int, tmp_path: Path) -> None:
        plugin, contract = spawned_run["plugin"], f"every hook fires (devices={world_size}, workers the plugin starts)"
        expected = _reference_hooks(request, tmp_path / "reference")["fit"]
        _check_processes(contract, plugin, spawned_run["calls"], expected, world_size, parent=spawned_run["parent"])
        _check_replicas(plugin, spawned_run["probes"], f"devices={world_size}")

    @_timeout(300)
    def test_spawned_fit_returns_trained_weights(self, spawned_run: dict[str, Any]) -> None:
        plugin = spawned_run["plugin"]
        contract = "after a fit in worker processes, the model given to fit holds rank 0's trained weights"
        rank0 = next((p for p in spawned_run["probes"] if p["rank"] == 0), None)
        if rank0 is None:
            _broken(contract, plugin, "no rank 0 reported")
            return
        after, before = spawned_run["after"], spawned_run["before"]
        if torch.equal(after, before):
            _broken(contract, plugin, "the parent's model still has its initial weights")
        if not torch.allclose(after, torch.tensor(rank0["params"], dtype=torch.float64), rtol=0, atol=1e-6):
            _broken(contract, plugin, "the parent's model weights differ from rank 0's at on_fit_end")


def _check_processes(contract: str, plugin: object, calls: dict[int, list[Any]], expected: set[str],
                     world_size: int, parent: int | None) -> None:
    fitting = {pid: {c.name for c in cs} for pid, cs in calls.items() if any(c.name == "setup_environment" for c in cs)}
    if len(fitting) != world_size:
        _broken(contract, plugin, f"{len(fitting)} process(es) ran a fit (setup_environment), expected {world_size}")
    per_process = expected - LAUNCHER_ONLY - RANK_ZERO_ONLY
    for pid, fired in fitting.items():
        missing = sorted(per_process - fired)
        if missing:
            _broken(contract, plugin, f"process {pid} never called: {', '.join(missing)}")
    for hook in sorted(expected & RANK_ZERO_ONLY):
        if not any(hook in fired for fired in fitting.values()):
            _broken(contract, plugin, f"no process called {hook} (global rank 0 should)")
    if parent is not None:
        launched = {c.name for c in calls.get(parent, [])}
        if "launch" in expected and "launch" not in launched:
            _broken(contract, plugin, "the launch hook did not fire in the process that called fit")
    elif "launch" in expected:
        missing_launch = [pid for pid, fired in fitting.items() if "launch" not in fired]
        if missing_launch:
            _broken(contract, plugin, f"launch did not fire in process(es) {missing_launch}")


def _check_replicas(plugin: object, probes: list[dict[str, Any]], mode: str) -> None:
    if len(probes) < 2:
        _broken(f"replicas stay identical ({mode})", plugin, f"{len(probes)} rank(s) reached on_fit_end")
    first = torch.tensor(probes[0]["params"], dtype=torch.float64)
    for probe in probes[1:]:
        diff = float((torch.tensor(probe["params"], dtype=torch.float64) - first).abs().max())
        if diff > 1e-6:
            _broken(f"replicas stay identical ({mode})", plugin,
                    f"rank {probe['rank']}'s weights differ from rank {probes[0]['rank']}'s by up to {diff:.3g} "
                    "at on_fit_end")
