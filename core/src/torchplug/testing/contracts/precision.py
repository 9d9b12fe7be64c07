"""The contracts of a precision plugin: :class:`PrecisionPluginContract` (see
:mod:`torchplug.testing.conformance`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torchplug.hookspecs import hookimpl
from torchplug.manager import role_of
from torchplug.plugin import Plugin
from torchplug.testing.contracts._runs import _broken, _fit_kwargs
from torchplug.testing.contracts.plugin import PluginContract
from torchplug.testing.models import TinyMLP, tiny_loader
from torchplug.trainer import Trainer
from torchplug.utils import move_to_device, optimizer_params

__all__ = ["PrecisionPluginContract"]

_DTYPES = {16: torch.float16, "16": torch.float16, "16-mixed": torch.float16,
           "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


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
