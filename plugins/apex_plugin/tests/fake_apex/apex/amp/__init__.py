"""FAKE of NVIDIA apex 25.05 apex.amp for CPU contract tests; not apex.

Written from a reading of apex tag 25.05 (commit 379937e), not copied from it. It
reproduces the observable behaviour of the public ``apex.amp`` API, and the private
attributes a plugin may legitimately inspect, so that torchplug's apex plugin can be
contract-tested on a CPU. What mirrors what:

- ``initialize``, ``Properties``, O0-O3 defaults and override checks,
  ``state_dict``/``load_state_dict``: apex/amp/frontend.py
- model/optimizer shape handling, ``check_models`` (DDP/DataParallel refused),
  ``check_params_fp32`` (Half check only), output-cast forward patch, O1 step patch:
  apex/amp/_initialize.py
- ``_amp_state`` (AmpState), ``warn_or_err``, ``maybe_print``, ``master_params``:
  apex/amp/_amp_state.py
- ``scale_loss`` (short cut, grad stash, unscale, skip-step patch), ``disable_casts``:
  apex/amp/handle.py
- ``LossScaler`` (dynamic/static scale, python unscale fallback, update_scale):
  apex/amp/scaler.py (the no-``amp_C`` path, which is what a python-only apex uses)
- optimizer patching (``_amp_stash``, lazy O2 fp32 master params, patched
  ``step``/``zero_grad``/``add_param_group``): apex/amp/_process_optimizer.py

Deliberate differences (see REAL_APEX_NOTES.md): CPU tensors are accepted (apex
raises for non-CUDA params); nothing is really cast to fp16 -- params that apex
would cast are only *marked* half (attribute ``_fake_apex_half``) and stay float32,
inputs are not cast; torch functions are not patched for O1; ``apex.parallel`` DDP
and FusedSGD special cases do not exist here.

Fake-only helpers (not in apex): ``_fake_calls`` and ``_reset_fake_state()``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "disable_casts",
    "float_function",
    "half_function",
    "initialize",
    "load_state_dict",
    "master_params",
    "promote_function",
    "register_float_function",
    "register_half_function",
    "register_promote_function",
    "scale_loss",
    "state_dict",
]

# --- FAKE-ONLY ------------------------------------------------------------------
# Record of public-API calls, in order: (name, kwargs). "skip_step" is appended when
# a patched optimizer.step skips because of an overflow. Not part of apex.
_fake_calls: list[tuple[str, dict[str, Any]]] = []


def _record(name: str, **kwargs: Any) -> None:
    _fake_calls.append((name, kwargs))


def _reset_fake_state() -> None:
    """FAKE-ONLY: forget every initialize() (apex has no way to do this)."""
    _fake_calls.clear()
    _USER_REGISTRY.clear()
    LossScaler.warned_no_fused_kernel = False
    LossScaler.warned_unscaling_non_fp32_grad = False
    _amp_state.__dict__.clear()
    _amp_state.__init__()  # type: ignore[misc]


# --- apex/amp/_amp_state.py ------------------------------------------------------
class AmpState:
    """Global "header object". The annotated attributes appear only once set (apex
    relies on ``hasattr(_amp_state, "opt_properties")`` to detect initialize())."""

    opt_properties: Properties
    loss_scalers: list[LossScaler]
    handle: _FakeAmpHandle
    min_loss_scale: float | None
    max_loss_scale: float

    def __init__(self) -> None:
        self.hard_override = False
        self.allow_incoming_model_not_fp32 = False
        self.verbosity = 1


# apex.amp re-exports the *instance* (amp/__init__.py: from ._amp_state import _amp_state)
_amp_state = AmpState()


def warn_or_err(msg: str) -> None:
    if _amp_state.hard_override:
        print("Warning:  " + msg)
    else:
        raise RuntimeError(msg)


def maybe_print(msg: str, rank0: bool = False) -> None:
    if _amp_state.verbosity <= 0:
        return
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if rank0 and distributed and dist.get_rank() != 0:
        return
    print(msg)


def master_params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every param the optimizer owns; under O2 (after lazy init) the fp32 masters.
    A generator like apex's, so the fake records the call when iteration starts."""
    _record("master_params", optimizer=optimizer)
    for group in optimizer.param_groups:
        yield from group["params"]


# --- apex/amp/frontend.py: Properties and opt levels ----------------------------
class Properties:
    """Option table; assignments run apex's consistency checks (warn_or_err)."""

    def __init__(self) -> None:
        self.__dict__["options"] = {
            "enabled": False,
            "opt_level": None,
            "cast_model_type": None,
            "patch_torch_functions": False,
            "keep_batchnorm_fp32": None,
            "master_weights": None,
            "loss_scale": 1.0,
        }

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.options:
            object.__setattr__(self, name, value)
            return
        o1 = self.opt_level == "O1"
        if name == "cast_model_type":
            if o1 and value is not None and value is not False and value is not torch.float32:
                warn_or_err(
                    "O1 inserts casts around Torch functions rather than model weights, so with "
                    "O1, the model weights themselves should remain FP32. If you wish to cast the "
                    "model to a different type, use opt_level='O2' or 'O3'. "
                    f"cast_model_type was {value}"
                )
        elif name == "patch_torch_functions":
            if self.opt_level != "O1" and value:
                warn_or_err("Currently, patch_torch_functions=True should only be set by selecting opt_level='O1'.")
        elif name == "keep_batchnorm_fp32":
            if o1 and value is not None:
                warn_or_err(
                    "With opt_level O1, batchnorm functions are automatically patched to run in "
                    "FP32, so keep_batchnorm_fp32 should be None. "
                    f"keep_batchnorm_fp32 was {value}"
                )
            if value in ("True", "False"):
                value = value == "True"
            else:
                assert value is True or value is False or value is None, (
                    "keep_batchnorm_fp32 must be a boolean, the string 'True' or 'False', or "
                    f"None, found keep_batchnorm_fp32={value}"
                )
        elif name == "master_weights":
            if o1 and value is not None:
                warn_or_err(
                    "It doesn't make sense to use master_weights with O1. With O1, your model "
                    "weights themselves should be FP32."
                )
        elif name == "loss_scale":
            value = value if value == "dynamic" else float(value)
        self.options[name] = value


# (brief, defaults in the order apex assigns them)
_OPT_LEVELS: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {
    "O3": (
        "O3:  Pure FP16 training.",
        (
            ("cast_model_type", torch.float16),
            ("patch_torch_functions", False),
            ("keep_batchnorm_fp32", False),
            ("master_weights", False),
            ("loss_scale", 1.0),
        ),
    ),
    "O2": (
        "O2:  FP16 training with FP32 batchnorm and FP32 master weights.\n",
        (
            ("cast_model_type", torch.float16),
            ("patch_torch_functions", False),
            ("keep_batchnorm_fp32", True),
            ("master_weights", True),
            ("loss_scale", "dynamic"),
        ),
    ),
    "O1": (
        "O1:  Insert automatic casts around Pytorch functions and Tensor methods.\n",
        (
            ("cast_model_type", None),
            ("patch_torch_functions", True),
            ("keep_batchnorm_fp32", None),
            ("master_weights", None),
            ("loss_scale", "dynamic"),
        ),
    ),
    "O0": (
        "O0:  Pure FP32 training.\n",
        (
            ("cast_model_type", torch.float32),
            ("patch_torch_functions", False),
            ("keep_batchnorm_fp32", None),
            ("master_weights", False),
            ("loss_scale", 1.0),
        ),
    ),
}


def _print_options(props: Properties) -> None:
    for k, v in props.options.items():
        maybe_print(f"{k:22} : {v}", True)


# --- apex/amp/scaler.py ----------------------------------------------------------
def _overflowed(grad: torch.Tensor) -> bool:
    # apex's python fallback: one host sum, inf/-inf/nan means overflow
    s = float(grad.float().sum())
    return math.isinf(s) or math.isnan(s)


def _warn_if_non_fp32(grad: torch.Tensor) -> None:
    if not LossScaler.warned_unscaling_non_fp32_grad and _amp_type(grad) != "torch.cuda.FloatTensor":
        maybe_print(
            f"Attempting to unscale a grad with type {_amp_type(grad)} Unscaling non-fp32 grads may "
            "indicate an error. When using Amp, you don't need to call .half() on your model."
        )
        LossScaler.warned_unscaling_non_fp32_grad = True


class LossScaler:
    """Per-loss scaler. Attribute names match apex because plugins read them
    (``_loss_scale``, ``_unskipped``, ``_has_overflow``, ``dynamic``)."""

    warned_no_fused_kernel = False
    warned_unscaling_non_fp32_grad = False
    has_fused_kernel = False  # the fake always takes apex's python fallback

    def __init__(
        self,
        loss_scale: float | str,
        init_scale: float = 2.0**16,
        scale_factor: float = 2.0,  # unused by apex too: factor 2 is hard-coded
        scale_window: int = 2000,
        min_loss_scale: float | None = None,
        max_loss_scale: float = 2.0**24,
    ) -> None:
        self.dynamic = loss_scale == "dynamic"
        self._loss_scale: float = (
            min(max_loss_scale, init_scale) if self.dynamic else loss_scale  # type: ignore[assignment]
        )
        self._max_loss_scale = max_loss_scale
        self._min_loss_scale = min_loss_scale
        self._scale_seq_len = scale_window
        self._unskipped = 0
        self._has_overflow = False
        if not LossScaler.warned_no_fused_kernel:
            # What a python-only apex (no amp_C, as on the verified GPU setup) prints once.
            maybe_print(
                "Warning:  multi_tensor_applier fused unscale kernel is unavailable, possibly "
                "because apex was installed without --cuda_ext --cpp_ext. Using Python fallback.  "
                "Original ImportError was: ModuleNotFoundError(\"No module named 'amp_C'\")",
                True,
            )
            LossScaler.warned_no_fused_kernel = True

    def loss_scale(self) -> float:
        return self._loss_scale

    def unscale(
        self,
        model_grads: list[Any],
        master_grads: list[Any],
        unused_scale: Any = None,
        models_are_masters: bool = False,
        scale_override: float | None = None,
    ) -> None:
        """master = model / scale; stops at the first overflow (python fallback)."""
        if self._has_overflow:
            return
        scale = self._loss_scale if scale_override is None else scale_override
        if scale == 1.0 and models_are_masters and not self.dynamic:
            return
        for model, master in zip(model_grads, master_grads):
            if model is None:
                continue
            _warn_if_non_fp32(master)
            # overflow is only checked for dynamic scalers, as in apex
            self._has_overflow = self.dynamic and _overflowed(model)
            if self._has_overflow:
                break
            if master is not model:
                master.copy_(model)
            if scale != 1.0:
                master.mul_(1.0 / scale)

    def unscale_with_stashed(
        self,
        model_grads: list[Any],
        stashed_master_grads: list[Any],
        master_grads: list[Any],
        scale_override: tuple[float, float, float] | None = None,
    ) -> None:
        """master = model*out/grads_scale + stashed*out/stashed_scale (accumulation)."""
        if self._has_overflow:
            return
        grads_scale, stashed_scale, out_scale = (
            (self._loss_scale, 1.0, 1.0) if scale_override is None else scale_override
        )
        a, b = out_scale / grads_scale, out_scale / stashed_scale
        for model, stashed, master in zip(model_grads, stashed_master_grads, master_grads):
            if model is None and stashed is None:
                continue
            _warn_if_non_fp32(master)
            self._has_overflow = self.dynamic and _overflowed(model)
            if self._has_overflow:
                break
            master.data = a * model.data.to(master.dtype) + b * stashed.data

    def clear_overflow_state(self) -> None:
        self._has_overflow = False

    def update_scale(self) -> bool:
        """Returns should_skip. Halves on overflow (floored at min), doubles after
        ``_scale_seq_len`` clean steps (capped at max); static scalers never skip."""
        should_skip = self._has_overflow and self.dynamic
        if should_skip:
            halved = self._loss_scale / 2.0
            self._loss_scale = max(self._min_loss_scale, halved) if self._min_loss_scale else halved
            self._unskipped = 0
        else:
            self._unskipped += 1
        if self._unskipped == self._scale_seq_len and self.dynamic:
            self._loss_scale = min(self._max_loss_scale, self._loss_scale * 2.0)
            self._unskipped = 0
        return should_skip


# --- apex/amp/handle.py: O1 handle ------------------------------------------------
class _FakeAmpHandle:
    """Stand-in for AmpHandle: the fake patches no torch functions, so only the
    activity flag and the cast cache scale_loss clears are kept."""

    def __init__(self) -> None:
        self._is_active = True
        self._cache: dict[Any, Any] = {}

    def is_active(self) -> bool:
        return self._is_active

    def _clear_cache(self) -> None:
        self._cache.clear()


@contextlib.contextmanager
def disable_casts() -> Iterator[None]:
    # Like apex: needs an O1 handle (AttributeError otherwise), not exception-safe.
    _amp_state.handle._is_active = False
    yield
    _amp_state.handle._is_active = True


# --- apex/amp/_process_optimizer.py ------------------------------------------------
def _is_half(t: torch.Tensor) -> bool:
    return t.dtype == torch.float16 or getattr(t, "_fake_apex_half", False)


def _amp_type(t: torch.Tensor) -> str:
    # The fake treats CPU float32 as apex's 'torch.cuda.FloatTensor' and marked/real
    # fp16 as 'torch.cuda.HalfTensor'; anything else is rejected like apex does.
    if _is_half(t):
        return "torch.cuda.HalfTensor"
    if t.dtype == torch.float32:
        return "torch.cuda.FloatTensor"
    return t.type()


def _bad_type(t: torch.Tensor) -> TypeError:
    return TypeError(
        f"Optimizer's parameters must be either torch.cuda.FloatTensor or torch.cuda.HalfTensor. Received {t.type()}"
    )


class AmpOptimizerState:
    """``optimizer._amp_stash``; attributes are added as apex adds them."""


# An optimizer after _process_optimizer: apex hangs methods and ``_amp_stash`` on it.
_AmpOptimizer = Any


def _split_group_with_masters(
    params: list[torch.Tensor], optimizer: _AmpOptimizer | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Replace each (virtually) fp16 param in ``params`` by a new fp32 master, in place."""
    fp16, fp32, masters = [], [], []
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        kind = _amp_type(p)
        if kind == "torch.cuda.HalfTensor":
            master = p.detach().clone().float()
            master.requires_grad = True
            params[i] = master
            fp16.append(p)
            masters.append(master)
            if optimizer is not None and p in optimizer.state:
                optimizer.state[master] = optimizer.state.pop(p)
        elif kind == "torch.cuda.FloatTensor":
            fp32.append(p)
        else:
            raise _bad_type(p)
    return fp16, fp32, masters


def _lazy_init_with_master_weights(self: _AmpOptimizer) -> None:
    stash = self._amp_stash
    stash.fp16_groups, stash.fp32_from_fp16_groups, stash.fp32_from_fp32_groups = [], [], []
    for group in self.param_groups:
        fp16, fp32, masters = _split_group_with_masters(group["params"], self)
        stash.fp16_groups.append(fp16)
        stash.fp32_from_fp16_groups.append(masters)
        stash.fp32_from_fp32_groups.append(fp32)
    stash.all_fp16_params = [p for g in stash.fp16_groups for p in g]
    stash.all_fp32_from_fp16_params = [p for g in stash.fp32_from_fp16_groups for p in g]
    stash.all_fp32_from_fp32_params = [p for g in stash.fp32_from_fp32_groups for p in g]
    stash.all_fp16_grad_stash = [None] * len(stash.all_fp16_params)
    stash.all_fp32_from_fp32_grad_stash = [None] * len(stash.all_fp32_from_fp32_params)
    for p in stash.all_fp32_from_fp16_params + stash.all_fp32_from_fp32_params:
        p.grad = None
    # apex re-loads its own state dict so per-param state follows the new masters
    self.load_state_dict(self.state_dict())


def _lazy_init_no_master_weights(self: _AmpOptimizer) -> None:
    stash = self._amp_stash
    stash.all_fp16_params, stash.all_fp32_params = [], []
    for group in self.param_groups:
        for p in group["params"]:
            kind = _amp_type(p)
            if kind == "torch.cuda.HalfTensor":
                stash.all_fp16_params.append(p)
            elif kind == "torch.cuda.FloatTensor":
                stash.all_fp32_params.append(p)
            else:
                raise _bad_type(p)
    stash.all_fp16_grad_stash = [None] * len(stash.all_fp16_params)
    stash.all_fp32_grad_stash = [None] * len(stash.all_fp32_params)


def _amp_lazy_init(self: _AmpOptimizer) -> None:
    if not self._amp_stash.lazy_init_called:
        self._lazy_init_maybe_master_weights()
        self._amp_stash.lazy_init_called = True


def _stash_grads(params: list[torch.Tensor], stash: list[Any]) -> None:
    # Keep already-unscaled grads aside so this backward writes fresh (scaled) ones.
    for i, p in enumerate(params):
        stash[i] = p.grad
        p.grad = None


def _post_backward_models_are_masters(scaler: LossScaler, params: list[torch.Tensor], stashed: list[Any]) -> None:
    """Unscale grads in place, adding back any stashed (accumulated) grads."""
    if scaler.loss_scale() == 1.0 and not scaler.dynamic:
        # apex drops the stash here without restoring it
        stashed[:] = [None] * len(stashed)
        return
    plain, with_stash, stash_vals = [], [], []
    for p, s in zip(params, stashed):
        if p.grad is not None and _is_half(p):
            p.grad._fake_apex_half = True  # type: ignore[attr-defined]  # the grad of an fp16 param is fp16 in apex
        if p.grad is None and s is not None:
            p.grad = s
        elif p.grad is not None and s is None:
            plain.append(p.grad)
        elif p.grad is not None:
            with_stash.append(p.grad)
            stash_vals.append(s)
    if plain:
        scaler.unscale(plain, plain, None, models_are_masters=True, scale_override=scaler.loss_scale())
    if with_stash:
        scaler.unscale_with_stashed(with_stash, stash_vals, with_stash, scale_override=(scaler.loss_scale(), 1.0, 1.0))
    stashed[:] = [None] * len(stashed)


def _prepare_backward_no_master_weights(self: _AmpOptimizer) -> None:
    stash = self._amp_stash
    self._amp_lazy_init()
    _stash_grads(stash.all_fp16_params, stash.all_fp16_grad_stash)
    _stash_grads(stash.all_fp32_params, stash.all_fp32_grad_stash)


def _post_backward_no_master_weights(self: _AmpOptimizer, scaler: LossScaler) -> None:
    stash = self._amp_stash
    self._amp_lazy_init()
    _post_backward_models_are_masters(scaler, stash.all_fp16_params, stash.all_fp16_grad_stash)
    _post_backward_models_are_masters(scaler, stash.all_fp32_params, stash.all_fp32_grad_stash)


def _prepare_backward_with_master_weights(self: _AmpOptimizer) -> None:
    stash = self._amp_stash
    self._amp_lazy_init()
    for p in stash.all_fp16_params:
        p.grad = None  # model grads hold only this backward's (scaled) grads
    _stash_grads(stash.all_fp32_from_fp32_params, stash.all_fp32_from_fp32_grad_stash)


def _post_backward_with_master_weights(self: _AmpOptimizer, scaler: LossScaler) -> None:
    """Model (fp16) grads -> master grads / scale; model grads stay scaled."""
    stash = self._amp_stash
    self._amp_lazy_init()
    new_model, new_master, acc_model, acc_master = [], [], [], []
    for model_p, master_p in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params):
        if model_p.grad is None:
            continue
        if master_p.grad is None:
            master_p.grad = torch.empty_like(master_p)
            new_model.append(model_p.grad)
            new_master.append(master_p.grad)
        else:
            acc_model.append(model_p.grad)
            acc_master.append(master_p.grad)
    if new_model:
        scaler.unscale(new_model, new_master, scaler.loss_scale(), models_are_masters=False)
    if acc_model:
        scaler.unscale_with_stashed(acc_model, acc_master, acc_master)
    _post_backward_models_are_masters(scaler, stash.all_fp32_from_fp32_params, stash.all_fp32_from_fp32_grad_stash)


def _master_params_to_model_params(self: _AmpOptimizer) -> None:
    stash = self._amp_stash
    for model_g, master_g in zip(stash.fp16_groups, stash.fp32_from_fp16_groups):
        for model_p, master_p in zip(model_g, master_g):
            model_p.data.copy_(master_p.data)


_AMP_METHOD_NAMES = (
    "_lazy_init_maybe_master_weights",
    "_master_params_to_model_params",
    "_prepare_amp_backward",
    "_post_amp_backward",
    "_amp_lazy_init",
)


def _process_optimizer(optimizer: _AmpOptimizer, properties: Properties) -> _AmpOptimizer:
    if hasattr(optimizer, "_amp_stash"):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")
    optimizer._amp_stash = AmpOptimizerState()
    optimizer._amp_stash.lazy_init_called = False
    optimizer._amp_stash.already_patched = False
    optimizer._amp_stash.params_have_scaled_gradients = False
    for name in _AMP_METHOD_NAMES:
        if hasattr(optimizer, name):
            raise RuntimeError(f"Incoming optimizer already has {name} defined.")

    def bind(fn: Callable[..., Any]) -> types.MethodType:
        return types.MethodType(fn, optimizer)

    if properties.master_weights:
        optimizer._lazy_init_maybe_master_weights = bind(_lazy_init_with_master_weights)
        optimizer._master_params_to_model_params = bind(_master_params_to_model_params)
        old_step = optimizer.step

        def new_step(self: _AmpOptimizer, closure: Any = None) -> Any:
            if closure is not None:
                raise RuntimeError("Currently, Amp does not support closure use with optimizers.")
            retval = old_step()
            self._master_params_to_model_params()
            for p in self._amp_stash.all_fp32_from_fp16_params:
                p.grad = None  # model.zero_grad() cannot reach master grads
            return retval

        optimizer.step = bind(new_step)

        # apex's replacement takes no set_to_none argument: zero_grad(set_to_none=...)
        # raises TypeError under master weights, on real apex as here.
        def new_zero_grad(self: _AmpOptimizer) -> None:
            stash = self._amp_stash
            self._amp_lazy_init()
            for p in stash.all_fp16_params + stash.all_fp32_from_fp32_params:
                if p.grad is not None:
                    p.grad.detach_()
                    p.grad.zero_()
            for p in stash.all_fp32_from_fp16_params:
                p.grad = None

        optimizer.zero_grad = bind(new_zero_grad)
        optimizer._prepare_amp_backward = bind(_prepare_backward_with_master_weights)
        optimizer._post_amp_backward = bind(_post_backward_with_master_weights)
    else:
        optimizer._lazy_init_maybe_master_weights = bind(_lazy_init_no_master_weights)
        optimizer._prepare_amp_backward = bind(_prepare_backward_no_master_weights)
        optimizer._post_amp_backward = bind(_post_backward_no_master_weights)
    optimizer._amp_lazy_init = bind(_amp_lazy_init)

    old_add_param_group = optimizer.add_param_group

    def new_add_param_group(self: _AmpOptimizer, new_group: dict[str, Any]) -> None:
        stash = self._amp_stash
        self._amp_lazy_init()
        assert isinstance(new_group, dict), "param group must be a dict"
        params = new_group["params"]
        if isinstance(params, torch.Tensor):
            new_group["params"] = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list instead."
            )
        else:
            new_group["params"] = list(params)
        if properties.master_weights:
            fp16, fp32, masters = _split_group_with_masters(new_group["params"], None)
            stash.fp16_groups.append(fp16)
            stash.fp32_from_fp16_groups.append(masters)
            stash.fp32_from_fp32_groups.append(fp32)
            stash.all_fp16_params += fp16
            stash.all_fp32_from_fp16_params += masters
            stash.all_fp32_from_fp32_params += fp32
            stash.all_fp32_from_fp32_grad_stash += [None] * len(fp32)
        else:
            for p in new_group["params"]:
                kind = _amp_type(p)
                if kind == "torch.cuda.HalfTensor":
                    stash.all_fp16_params.append(p)
                    stash.all_fp16_grad_stash.append(None)
                elif kind == "torch.cuda.FloatTensor":
                    stash.all_fp32_params.append(p)
                    stash.all_fp32_grad_stash.append(None)
                else:
                    raise _bad_type(p)
        old_add_param_group(new_group)

    optimizer.add_param_group = bind(new_add_param_group)
    return optimizer


# --- apex/amp/_initialize.py ---------------------------------------------------------
def check_models(models: list[torch.nn.Module]) -> None:
    for model in models:
        parallel_type = None
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            parallel_type = "torch.nn.parallel.DistributedDataParallel"
        if isinstance(model, torch.nn.parallel.DataParallel):
            parallel_type = "torch.nn.parallel.DataParallel"
        if parallel_type is not None:
            raise RuntimeError(
                f"Incoming model is an instance of {parallel_type}. "
                "Parallel wrappers should only be applied to the model(s) AFTER \n"
                "the model(s) have been returned from amp.initialize."
            )


def check_params_fp32(models: list[torch.nn.Module]) -> None:
    # Only apex's "already Half" check; its "not CUDA" check is what the fake drops.
    for model in models:
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                if t.is_floating_point() and "Half" in _amp_type(t):
                    warn_or_err(
                        f"Found {kind} {name} with type {_amp_type(t)}, expected "
                        "torch.cuda.FloatTensor.\nWhen using amp.initialize, you do not need to "
                        "call .half() on your model\nbefore passing it, no matter what "
                        "optimization level you choose."
                    )


def _mark_cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Stand-in for casting a module's own params: fp16 is only marked (CPU fake);
    other non-fp32 dtypes are really cast, so apex's later TypeError still happens."""
    for p in module.parameters(recurse=False):
        if not p.is_floating_point() or dtype == torch.float32:
            continue
        if dtype == torch.float16:
            p._fake_apex_half = True  # type: ignore[attr-defined]
        else:
            p.data = p.data.to(dtype)


def _cast_outputs(value: Any, dtype: torch.dtype) -> Any:
    # Simplified apex `applier`: tensors, mappings, lists and tuples.
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: _cast_outputs(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_outputs(v, dtype) for v in value)
    return value


def _patch_forward(model: torch.nn.Module, out_dtype: torch.dtype) -> None:
    # apex also casts floating inputs to cast_model_type; the CPU fake keeps fp32 inputs.
    old_fwd = model.forward

    @functools.wraps(old_fwd)
    def new_fwd(*args: Any, **kwargs: Any) -> Any:
        return _cast_outputs(old_fwd(*args, **kwargs), out_dtype)

    model.forward = new_fwd


def _initialize(
    models: Any,
    optimizers: Any,
    properties: Properties,
    num_losses: int = 1,
    cast_model_outputs: torch.dtype | None = None,
) -> Any:
    optimizers_was_list = False
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    elif optimizers is None:
        optimizers = []
    elif isinstance(optimizers, list):
        optimizers_was_list = True
    else:
        raise TypeError("optimizers must be either a single optimizer or a list of optimizers.")

    if isinstance(models, torch.nn.Module):
        models_was_list = False
        models = [models]
    elif isinstance(models, list):
        models_was_list = True
    else:
        raise TypeError("models must be either a single model or a list of models.")

    check_models(models)
    if not _amp_state.allow_incoming_model_not_fp32:
        check_params_fp32(models)

    if properties.cast_model_type:
        for model in models:
            for module in model.modules():
                # keep_batchnorm_fp32 leaves affine batchnorms alone (fp16_utils.convert_network)
                is_bn = isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine
                if not (properties.keep_batchnorm_fp32 and is_bn):
                    _mark_cast(module, properties.cast_model_type)
            _patch_forward(model, cast_model_outputs or torch.float32)
        for optimizer in optimizers:
            optimizer.load_state_dict(optimizer.state_dict())  # apex: recast per-param state
    elif cast_model_outputs is not None:
        for model in models:
            _patch_forward(model, cast_model_outputs)

    for i, optimizer in enumerate(optimizers):
        optimizers[i] = _process_optimizer(optimizer, properties)

    _amp_state.loss_scalers = [
        LossScaler(
            properties.loss_scale, min_loss_scale=_amp_state.min_loss_scale, max_loss_scale=_amp_state.max_loss_scale
        )
        for _ in range(num_losses)
    ]

    if properties.patch_torch_functions:
        _amp_state.handle = _FakeAmpHandle()  # apex: amp.init() patches torch here
        for optimizer in optimizers:

            def patch_step(old_step: Callable[..., Any]) -> Callable[..., Any]:
                def new_step(self: _AmpOptimizer, *args: Any, **kwargs: Any) -> Any:
                    with disable_casts():
                        return old_step(*args, **kwargs)

                return new_step

            optimizer.step = types.MethodType(patch_step(optimizer.step), optimizer)

    model_out = models if models_was_list else models[0]
    if optimizers_was_list:
        return model_out, optimizers
    if not optimizers:
        return model_out
    return model_out, optimizers[0]


# --- apex/amp/frontend.py: public entry points --------------------------------------
def initialize(
    models: Any,
    optimizers: Any = None,
    enabled: bool = True,
    opt_level: str = "O1",
    cast_model_type: torch.dtype | None = None,
    patch_torch_functions: bool | None = None,
    keep_batchnorm_fp32: bool | str | None = None,
    master_weights: bool | None = None,
    loss_scale: float | str | None = None,
    cast_model_outputs: torch.dtype | None = None,
    num_losses: int = 1,
    verbosity: int = 1,
    min_loss_scale: float | None = None,
    max_loss_scale: float = 2.0**24,
) -> Any:
    """Fake ``apex.amp.initialize``.

    Calling it twice: apex 25.05 has no guard and no "already initialized" check. A
    second call silently rebuilds ``_amp_state.opt_properties`` and ``loss_scalers``
    (scales back to 2**16, counters to 0). It does, however, raise RuntimeError
    "A given optimizer should only be passed through amp.initialize once."
    (_process_optimizer.py:322-323) when the same optimizer is passed again. It also
    raises RuntimeError "Found param ... with type torch.cuda.HalfTensor, expected
    torch.cuda.FloatTensor ..." (_initialize.py:85-89) when an O2/O3 model, already
    cast to fp16, is passed again. For O1 apex would also patch torch functions a
    second time. ``enabled=False`` replaces opt_properties with a disabled table but
    keeps the previous loss_scalers. The fake does the same, minus the torch patching.
    """
    _record(
        "initialize",
        models=models,
        optimizers=optimizers,
        enabled=enabled,
        opt_level=opt_level,
        cast_model_type=cast_model_type,
        patch_torch_functions=patch_torch_functions,
        keep_batchnorm_fp32=keep_batchnorm_fp32,
        master_weights=master_weights,
        loss_scale=loss_scale,
        cast_model_outputs=cast_model_outputs,
        num_losses=num_losses,
        verbosity=verbosity,
        min_loss_scale=min_loss_scale,
        max_loss_scale=max_loss_scale,
    )
    from apex import deprecated_warning

    deprecated_warning(
        "apex.amp is deprecated and will be removed by the end of February 2023. "
        "Use [PyTorch AMP](https://pytorch.org/docs/stable/amp.html)"
    )
    _amp_state.opt_properties = Properties()
    _amp_state.verbosity = verbosity

    if not enabled:
        return models if optimizers is None else (models, optimizers)

    if not torch.backends.cudnn.enabled:
        raise RuntimeError("Amp requires torch.backends.cudnn.enabled = True")

    if opt_level not in _OPT_LEVELS:
        raise RuntimeError(
            f"Unexpected optimization level {opt_level}. Options are 'O0', 'O1', 'O2', 'O3'.  "
            "Note that in `O0`, `O1`, etc., the prefix O is the letter O, not the number zero."
        )
    props = _amp_state.opt_properties
    brief, defaults = _OPT_LEVELS[opt_level]
    props.enabled = True
    props.opt_level = opt_level
    for k, v in defaults:
        setattr(props, k, v)
    maybe_print(f"Selected optimization level {brief}", True)
    maybe_print("Defaults for this optimization level are:", True)
    _print_options(props)

    _amp_state.min_loss_scale = min_loss_scale
    _amp_state.max_loss_scale = max_loss_scale

    maybe_print("Processing user overrides (additional kwargs that are not None)...", True)
    overrides = (
        ("enabled", enabled),
        ("opt_level", opt_level),
        ("cast_model_type", cast_model_type),
        ("patch_torch_functions", patch_torch_functions),
        ("keep_batchnorm_fp32", keep_batchnorm_fp32),
        ("master_weights", master_weights),
        ("loss_scale", loss_scale),
    )
    for k, v in overrides:
        if v is not None:
            setattr(props, k, v)
    maybe_print("After processing overrides, optimization options are:", True)
    _print_options(props)

    return _initialize(models, optimizers, props, num_losses, cast_model_outputs)


def state_dict(destination: dict[str, Any] | None = None) -> dict[str, Any]:
    _record("state_dict")
    if destination is None:
        destination = OrderedDict()
    for idx, scaler in enumerate(_amp_state.loss_scalers):
        destination[f"loss_scaler{idx}"] = {
            "loss_scale": scaler.loss_scale(),
            "unskipped": scaler._unskipped,
        }
    return destination


def load_state_dict(state_dict: Mapping[str, Any]) -> None:
    _record("load_state_dict", state_dict=state_dict)
    scalers = _amp_state.loss_scalers
    if len(state_dict) != len(scalers):
        print(f"Warning: state_dict contains {len(state_dict)} entries, while {len(scalers)} loss_scalers are used")
    unexpected = []
    idx = 0  # counts only loss_scaler keys, in the dict's order (not by their number)
    for key in dict(state_dict):
        if "loss_scaler" not in key:
            unexpected.append(key)
            continue
        if idx > len(scalers) - 1:
            print(f"Skipping loss_scaler[{idx}], since num_losses was set to {len(scalers)}")
            break
        scalers[idx]._loss_scale = state_dict[key]["loss_scale"]
        scalers[idx]._unskipped = state_dict[key]["unskipped"]
        idx += 1
    if unexpected:
        raise RuntimeError(
            "Error(s) in loading state_dict. Unexpected key(s) in state_dict: "
            + ", ".join(f'"{k}"' for k in unexpected)
            + ". "
        )


# --- apex/amp/handle.py: scale_loss --------------------------------------------------
def _patch_skip_step(optimizer: _AmpOptimizer, scaler: LossScaler, loss_id: int) -> None:
    """Make the next optimizer.step() a no-op that restores the real step.
    Observable like apex: ``optimizer._amp_stash.already_patched`` is True until then."""
    real_step = optimizer.step

    def skip_step(closure: Any = None) -> None:
        if closure is not None:
            raise RuntimeError("Currently, Amp does not support closure use with optimizers.")
        maybe_print(
            f"Gradient overflow.  Skipping step, loss scaler {loss_id} reducing loss scale to {scaler.loss_scale()}"
        )
        _record("skip_step", optimizer=optimizer, loss_id=loss_id)
        if hasattr(optimizer._amp_stash, "all_fp32_from_fp16_params"):
            for p in optimizer._amp_stash.all_fp32_from_fp16_params:
                p.grad = None
        optimizer.step = real_step
        optimizer._amp_stash.already_patched = False

    optimizer.step = skip_step
    optimizer._amp_stash.already_patched = True


@contextlib.contextmanager
def scale_loss(
    loss: torch.Tensor,
    optimizers: Any,
    loss_id: int = 0,
    model: torch.nn.Module | None = None,
    delay_unscale: bool = False,
    delay_overflow_check: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield ``loss.float() * scale``; on exit unscale, check overflow, maybe skip.

    Like apex this is a plain generator context manager: if the body raises, the
    exit work (unscale, scale update, step patch) does not run.
    """
    _record(
        "scale_loss",
        loss=loss,
        optimizers=optimizers,
        loss_id=loss_id,
        model=model,
        delay_unscale=delay_unscale,
        delay_overflow_check=delay_overflow_check,
    )
    if not hasattr(_amp_state, "opt_properties"):
        raise RuntimeError(
            "Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized.  "
            "model, optimizer = amp.initialize(model, optimizer, opt_level=...) must be called "
            "before `with amp.scale_loss`."
        )
    props = _amp_state.opt_properties
    if not props.enabled:
        yield loss
        return

    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    scaler = _amp_state.loss_scalers[loss_id]
    loss_scale = scaler.loss_scale()

    if not props.master_weights and not scaler.dynamic and loss_scale == 1.0:
        # Nothing to unscale: no grad stash, no overflow check, never skips.
        yield loss.float()
        if props.patch_torch_functions:
            _amp_state.handle._clear_cache()
        return

    if not delay_unscale and isinstance(optimizers, list):
        for opt in optimizers:
            if not opt._amp_stash.params_have_scaled_gradients:
                opt._prepare_amp_backward()

    yield loss.float() * loss_scale

    if delay_unscale:
        for opt in optimizers:
            opt._amp_stash.params_have_scaled_gradients = True
    else:
        scaler.clear_overflow_state()
        for opt in optimizers:
            opt._post_amp_backward(scaler)
            opt._amp_stash.params_have_scaled_gradients = False
        should_skip = False if delay_overflow_check else scaler.update_scale()
        if should_skip:
            for opt in optimizers:
                if not opt._amp_stash.already_patched:
                    _patch_skip_step(opt, scaler, loss_id)

    if props.patch_torch_functions:
        _amp_state.handle._clear_cache()


# --- apex/amp/amp.py: decorators and registries (no-ops on the CPU fake) -------------
def _deprecated() -> None:
    from apex import deprecated_warning

    deprecated_warning(
        "apex.amp is deprecated and will be removed by the end of February 2023. "
        "Use [PyTorch AMP](https://pytorch.org/docs/stable/amp.html)"
    )


def _passthrough_decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
    _deprecated()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


half_function = float_function = promote_function = _passthrough_decorator

_USER_REGISTRY: set[tuple[Any, str]] = set()


def _register(module: Any, name: str) -> None:
    if not hasattr(module, name):
        raise ValueError(f"No function named {name} in module {module}.")
    _USER_REGISTRY.add((module, name))


register_half_function = register_float_function = register_promote_function = _register
