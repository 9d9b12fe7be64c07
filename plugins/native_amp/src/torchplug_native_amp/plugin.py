"""``NativeAMPPlugin``: ``torch.autocast`` for the forward pass, one ``torch.amp.GradScaler`` for fp16.

Per accumulation window the core calls, and this plugin does::

    every micro-batch:  forward_context → autocast(device_type, fp16 | bf16)
                        backward        → scaler.scale(loss).backward()   (bf16: loss.backward())
    window end:         unscale_gradients → scaler.unscale_(opt), at most once per optimizer
                        clip_gradients    → unscale (if not yet), clip_grad_norm_
                        optimizer_step    → scaler.step(opt) for each, scaler.update() once;
                                            False when the scaler skipped (inf/NaN gradients),
                                            told by a step post-hook: no extra host sync

The scale stays constant inside a window (``update`` runs only at its end), so accumulated
micro-batch gradients share one scale, as the PyTorch AMP recipe requires.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from torchplug import CheckpointError, MisconfigurationError, Plugin
from torchplug.lightning_plugins import warn_trainer_argument
from torchplug.trainer_api import PluginFacingTrainer
from torchplug.utils import optimizer_params, warn_at_caller

if TYPE_CHECKING:
    from torchplug.trainer import Trainer

DISTRIBUTION = "torchplug-native-amp"
#: The checkpoint key under which the GradScaler's ``state_dict()`` is saved.
CHECKPOINT_KEY = "native_amp"
PRECISIONS = {16: "16", "16": "16", "16-mixed": "16", "bf16": "bf16", "bf16-mixed": "bf16"}
DTYPES = {"16": torch.float16, "bf16": torch.bfloat16}


class NativeAMPPlugin(Plugin):
    """Mixed precision with ``torch.autocast`` and, for fp16, ``torch.amp.GradScaler``.

    :param precision: ``16`` (fp16 with dynamic loss scaling) or ``"bf16"`` (no scaler).
        ``None``: the Trainer's ``precision`` when it is 16 or ``"bf16"``, else 16.
    :param trainer: Lightning 1.1's constructor argument: accepted with a ``LightningSpellingWarning``, unused.
    :param init_scale: the GradScaler's first loss scale (fp16 only).
    :param growth_factor: factor the scale grows by after ``growth_interval`` clean steps (> 1).
    :param backoff_factor: factor the scale shrinks by after a step with inf/NaN gradients
        (strictly between 0 and 1).
    :param growth_interval: clean steps between two growths (>= 1).

    The autocast device type is the one of the model's parameters (CPU or CUDA). Autocast or a
    GradScaler that would disable itself there (e.g. CUDA requested where there is none) is a
    :class:`torchplug.MisconfigurationError`, never a silent fp32 run.
    """

    role = "precision"
    plugin_name = "native_amp"

    def __init__(
        self,
        precision: int | str | None = None,
        *,
        trainer: object = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if trainer is not None or isinstance(precision, PluginFacingTrainer):  # NativeAMPPlugin(trainer), Lightning 1.1
            warn_trainer_argument("NativeAMPPlugin", DISTRIBUTION)
            precision = None if trainer is None else precision
        self.requested_precision = None if precision is None else _parse_precision(precision)
        #: "16" or "bf16" once resolved against the Trainer (``check_configuration``).
        self.precision: str | None = self.requested_precision
        _check_positive("init_scale", init_scale)
        _check_positive("growth_factor", growth_factor)
        if growth_factor <= 1.0:
            raise MisconfigurationError(f"NativeAMPPlugin: growth_factor must be > 1, got {growth_factor}")
        _check_positive("backoff_factor", backoff_factor)
        if backoff_factor >= 1.0:
            raise MisconfigurationError(f"NativeAMPPlugin: backoff_factor must be < 1, got {backoff_factor}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise MisconfigurationError(
                f"NativeAMPPlugin: growth_interval must be an integer >= 1, got {growth_interval!r}"
            )
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        #: Set by ``connect_precision`` (or the first ``forward_context`` outside fit).
        self.device_type: str | None = None
        #: The run's one GradScaler (fp16), ``None`` for bf16 or before setup.
        self.scaler: torch.amp.GradScaler | None = None
        # ids of the optimizers unscaled since the last scaler.update(): GradScaler raises on a
        # second unscale_, and clipping and user hooks may each ask for unscaled gradients.
        self._unscaled: set[int] = set()

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision or "16"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision or self.requested_precision!r})"

    # A Trainer pickles its plugins into worker processes: send the options, not a run's state.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("device_type", "scaler", "_unscaled"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_run_state()

    # -- configuration and setup -------------------------------------------------------------
    def check_configuration(self, trainer: Trainer) -> None:
        self.precision = self.requested_precision or (trainer.precision if trainer.precision in DTYPES else "16")
        if self.precision not in DTYPES:
            raise MisconfigurationError(
                f"NativeAMPPlugin ({DISTRIBUTION}): precision must be 16 or 'bf16', got {self.precision!r}."
            )
        if trainer.accelerator == "cuda" and not torch.cuda.is_available():
            raise MisconfigurationError(
                f"NativeAMPPlugin ({DISTRIBUTION}): accelerator='cuda' was requested but torch.cuda.is_available() "
                f"is False (torch {torch.__version__}); CUDA autocast would silently run in fp32. Use "
                "accelerator='cpu' (CPU autocast supports fp16 and bf16) or install a CUDA build of torch."
            )

    def connect_precision(
        self, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer]
    ) -> tuple[nn.Module, list[Optimizer]]:
        if self.precision is None:
            self.check_configuration(trainer)
        self._reset_run_state()
        device = _device_of(model)
        _check_autocast(device, self.dtype)
        if self.precision == "16":
            self.scaler = self._create_scaler(device.type)
        self.device_type = device.type
        return model, optimizers

    def _create_scaler(self, device_type: str) -> torch.amp.GradScaler:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scaler = torch.amp.GradScaler(
                device_type,
                init_scale=self.init_scale,
                growth_factor=self.growth_factor,
                backoff_factor=self.backoff_factor,
                growth_interval=self.growth_interval,
            )
        if not scaler.is_enabled():
            said = "; ".join(str(w.message) for w in caught) or "no reason given"
            raise MisconfigurationError(
                f"NativeAMPPlugin ({DISTRIBUTION}): torch.amp.GradScaler({device_type!r}) disabled itself ({said}), "
                "so fp16 gradients would not be scaled. Train on a device torch supports for AMP (CPU, or CUDA "
                "with a CUDA build of torch), or use precision='bf16'."
            )
        for w in caught:  # not about disabling: pass them on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return scaler

    # -- one step ----------------------------------------------------------------------------
    def forward_context(self, model: nn.Module) -> AbstractContextManager[Any]:
        device_type = self.device_type
        if device_type is None:  # Trainer.validate: no fit setup ran
            device = _device_of(model)
            _check_autocast(device, self.dtype)
            self.device_type = device_type = device.type
        return torch.autocast(device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> bool:
        if self.precision == "bf16":
            loss.backward()  # type: ignore[no-untyped-call]
        else:
            self._require_scaler("backward").scale(loss).backward()  # type: ignore[no-untyped-call]
        return True

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        scaler = self.scaler
        if scaler is None or id(optimizer) in self._unscaled or not _has_grads(optimizer):
            return
        scaler.unscale_(optimizer)
        self._unscaled.add(id(optimizer))

    def clip_gradients(self, grad_clip_val: float, optimizer: Optimizer, norm_type: float) -> torch.Tensor:
        self.unscale_gradients(optimizer)  # clipping a scaled gradient would clip at S * max_norm
        return torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), grad_clip_val, norm_type)

    def optimizer_step(self, optimizers: list[Optimizer]) -> bool:
        scaler = self.scaler
        if scaler is None:
            if self.precision == "16":
                self._require_scaler("optimizer_step")
            for optimizer in optimizers:
                optimizer.step()
            return True
        # GradScaler.step asserts on an optimizer without gradients (e.g. a frozen or unused
        # part of the model): such an optimizer has nothing to apply.
        stepping = [opt for opt in optimizers if _has_grads(opt)]
        if not stepping:
            self._unscaled.clear()
            return False
        for optimizer in stepping:
            self.unscale_gradients(optimizer)  # a no-op when the core already asked, as it does
        # Whether each optimizer stepped or skipped on inf/NaN (each decides on its own, as in
        # torch; the step counts as skipped if any did; after DDP's all-reduce every rank sees
        # the same gradients, hence decides the same). A step post-hook tells without reading
        # the device: scaler.step's own read of found_inf stays the step's only host sync, as in
        # a hand-written loop. Fused optimizers skip inside their kernel, which the hook cannot
        # see: for those found_inf is read, before scaler.step queues the optimizer's kernels.
        observed = [opt for opt in stepping if _step_observable(opt)]
        unobserved = [opt for opt in stepping if not _step_observable(opt)]
        found_inf = _found_inf(scaler, unobserved) if unobserved else False
        before = scaler.get_scale() if found_inf is None else 0.0
        ran: list[Optimizer] = []
        handles = [opt.register_step_post_hook(lambda stepped, args, kwargs: ran.append(stepped)) for opt in observed]
        try:
            for optimizer in stepping:
                scaler.step(optimizer)
        finally:
            for handle in handles:
                handle.remove()
        scaler.update()
        self._unscaled.clear()
        if found_inf is None:
            # Fallback (GradScaler internals changed): update() backs off exactly when some
            # optimizer found inf/NaN. Reading the new scale waits for the optimizer step.
            return not scaler.get_scale() < before
        return not found_inf and len(ran) == len(observed)

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.scaler is not None:
            checkpoint[CHECKPOINT_KEY] = self.scaler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.scaler is None:  # bf16 (or not set up): there is no loss scale to restore
            return
        state = checkpoint.get(CHECKPOINT_KEY)
        if not state:
            warn_at_caller(  # the user's fit(ckpt_path=...) line, not the hook dispatch
                f"NativeAMPPlugin: the checkpoint has no GradScaler state (key {CHECKPOINT_KEY!r}; saved by a run "
                f"without fp16 native AMP?), so the loss scale starts again from init_scale={self.init_scale}.",
                UserWarning,
            )
            return
        try:
            self.scaler.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(
                f"NativeAMPPlugin ({DISTRIBUTION}): the checkpoint's {CHECKPOINT_KEY!r} entry is not a GradScaler "
                f"state_dict ({type(exc).__name__}: {exc})."
            ) from exc

    def _require_scaler(self, hook: str) -> torch.amp.GradScaler:
        if self.scaler is None:
            raise MisconfigurationError(
                f"NativeAMPPlugin: {hook} ran before connect_precision created the GradScaler; "
                "the plugin must be driven by a torchplug Trainer (or call connect_precision first)."
            )
        return self.scaler


def _parse_precision(precision: object) -> str:
    try:
        return PRECISIONS[precision]
    except (KeyError, TypeError):
        raise MisconfigurationError(
            f"NativeAMPPlugin ({DISTRIBUTION}): precision must be 16 or 'bf16' (or None to follow the Trainer), "
            f"got {precision!r}. For fp32 drop the plugin; for apex use amp_backend='apex'."
        ) from None


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MisconfigurationError(f"NativeAMPPlugin: {name} must be a positive number, got {value!r}")


def _device_of(model: nn.Module) -> torch.device:
    """The device autocast must target: the one the model's parameters live on."""
    devices = {p.device for p in model.parameters()}
    if not devices:
        raise MisconfigurationError(
            f"NativeAMPPlugin: {type(model).__name__} has no parameters, so there is no device to autocast on."
        )
    if len({d.type for d in devices}) > 1:
        raise MisconfigurationError(
            f"NativeAMPPlugin: the model's parameters are on several device types ({sorted(map(str, devices))}); "
            "autocast covers one device type. Move the model to one device."
        )
    return min(devices, key=str)


def _check_autocast(device: torch.device, dtype: torch.dtype) -> None:
    """Prove autocast really computes in ``dtype`` on ``device``: it disables itself with only a
    warning for an unavailable device type or an unsupported dtype."""
    got: torch.dtype | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            probe = torch.ones(2, 2, device=device)
            with torch.autocast(device.type, dtype=dtype):
                got = (probe @ probe).dtype
            error = None
        except (RuntimeError, ValueError, AssertionError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    if got != dtype:
        reasons = [str(w.message) for w in caught] + ([error] if error else [])
        said = "; ".join(reasons) or f"a matmul under autocast gave {got}"
        raise MisconfigurationError(
            f"NativeAMPPlugin ({DISTRIBUTION}): torch.autocast({device.type!r}, dtype={dtype}) is not active on "
            f"{device} ({said}); training would silently run in fp32. Use a device and dtype torch supports "
            "(CPU: fp16 or bf16; CUDA: fp16, or bf16 where torch.cuda.is_bf16_supported())."
        )


def _step_observable(optimizer: Optimizer) -> bool:
    """Whether a step post-hook on ``optimizer`` runs exactly when GradScaler lets it step:
    true for ``torch.optim.Optimizer`` subclasses, false for fused ones that take the scaler's
    state into their own kernel (``_step_supports_amp_scaling``) and step regardless."""
    return hasattr(optimizer, "register_step_post_hook") and not getattr(optimizer, "_step_supports_amp_scaling", False)


def _found_inf(scaler: torch.amp.GradScaler, optimizers: list[Optimizer]) -> bool | None:
    """Whether unscale_ found inf/NaN gradients for any of ``optimizers``, read from the
    GradScaler's per-optimizer state (private, hence the checks); ``None`` if it is not there."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return None
    flags: list[torch.Tensor] = []
    for optimizer in optimizers:
        state = states.get(id(optimizer))  # .get: it is a defaultdict
        per_device = state.get("found_inf_per_device") if isinstance(state, dict) else None
        if not isinstance(per_device, dict) or not per_device:
            return None
        flags.extend(per_device.values())
    if not all(isinstance(flag, torch.Tensor) for flag in flags):
        return None
    return any(bool(flag.item()) for flag in flags)


def _has_grads(optimizer: Optimizer) -> bool:
    # Stops at the first parameter with a gradient: O(1) in the usual case.
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])
