"""``ApexPlugin``: NVIDIA apex amp (O0-O3) behind torchplug's precision hooks.

What the core calls, and what this plugin does (apex <= 25.05's documented usage)::

    Trainer.__init__   check_configuration → find apex.amp (or fail with the fix), need CUDA
    setup, once        connect_precision   → configure_apex → amp.initialize(model, optimizers,
                                             opt_level); after the optimizers exist and before
                                             configure_ddp (apex refuses a DDP-wrapped model)
    every micro-batch  backward            → with amp.scale_loss(loss, optimizers, delay_unscale=...) as s:
                                                 s.backward()
    window end         unscale_gradients   → nothing: scale_loss already unscaled on exit
                       clip_gradients      → eps 1e-5 over amp.master_params(optimizer)
                       optimizer_step      → opt.step() for each; False when apex skipped it
    checkpoints        on_save/on_load_checkpoint → amp.state_dict() under "apex_amp"; the core
                                             loads after connect_precision (initialise, then load)

Gradient accumulation is apex's recipe: the core divides each micro-batch loss by the window
length, every micro-batch runs through ``scale_loss`` (which stashes and re-adds the unscaled
gradients already accumulated), and the optimizers step once per window.

The core tells ``backward`` whether the micro-batch synchronises gradients
(``sync_gradients``: ``True`` for the window's last micro-batch, ``False`` for those it runs
inside ``block_backward_sync``). Across processes (world size > 1) a micro-batch with
``sync_gradients=False`` uses ``scale_loss(..., delay_unscale=True)``: its scaled gradients stay
in ``.grad``, so the window's last backward all-reduces the whole window. Without it apex would
move them into its private stash before that backward, DDP would average only the last
micro-batch, and apex would add back each rank's own stash: the ranks would drift apart. In one
process every micro-batch is unscaled on ``scale_loss`` exit (apex's plain recipe).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from torchplug import CheckpointError, MisconfigurationError, Plugin
from torchplug.lightning_plugins import warn_trainer_argument
from torchplug.trainer_api import PluginFacingTrainer
from torchplug.utils import mark_scheduler_step, warn_at_caller
from torchplug_apex._detect import DISTRIBUTION, ApexUnavailableError, load_amp

if TYPE_CHECKING:
    from torchplug.trainer import Trainer

AMP_LEVELS = ("O0", "O1", "O2", "O3")
#: Lightning 1.1's default opt level.
DEFAULT_AMP_LEVEL = "O2"
#: The checkpoint key under which ``amp.state_dict()`` is saved.
CHECKPOINT_KEY = "apex_amp"
#: Clipping epsilon: torch uses 1e-6; fp16 weights need the larger one (Lightning 1.1/1.2).
CLIP_EPS = 1e-5
NATIVE_FIX = 'use precision=16 with native AMP instead (pip install "torchplug[native-amp]"; amp_backend="native")'


class ApexAmpDeprecationWarning(FutureWarning):
    """NVIDIA apex amp is deprecated upstream and removed from apex 25.07 on (shown once per process)."""


_warned_deprecated = False


def _warn_deprecated_once() -> None:
    global _warned_deprecated
    if _warned_deprecated or os.environ.get("RANK", "0") != "0":
        return
    _warned_deprecated = True
    warn_at_caller(
        "NVIDIA apex amp is deprecated upstream (since October 2022: 'Use PyTorch AMP') and was removed in apex 25.07; "
        "torchplug-apex targets apex <= 25.05. Prefer native AMP: Trainer(precision=16) with torchplug-native-amp.",
        ApexAmpDeprecationWarning,
    )


@contextmanager
def _apex_deprecation_silenced() -> Iterator[None]:
    """apex warns on every ``amp.initialize`` that amp is deprecated (a FutureWarning subclass,
    DeprecatedFeatureWarning). That is expected noise here (this plugin warns once itself), so
    only that warning is silenced, around apex calls, as Lightning 1.9 did."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"apex\.amp is deprecated", category=FutureWarning)
        yield


class ApexPlugin(Plugin):
    """Mixed precision with NVIDIA apex amp (``apex.amp.initialize``/``scale_loss``), apex <= 25.05.

    :param trainer: Lightning 1.1's constructor argument: accepted with a ``LightningSpellingWarning``, unused.
    :param amp_level: the apex opt level, ``"O0"`` to ``"O3"``. ``None``: the Trainer's
        ``amp_level``, else ``"O2"`` (Lightning 1.1's default).

    Selected by ``Trainer(precision=16, amp_backend="apex", amp_level="O1")`` (entry point
    ``apex``) or passed as an object; override :meth:`configure_apex` to give
    ``amp.initialize`` more options::

        class MyApex(ApexPlugin):
            def configure_apex(self, amp, model, optimizers, amp_level):
                return amp.initialize(model, optimizers, opt_level=amp_level, loss_scale=128.0)

        Trainer(plugins=[MyApex("O1")])
    """

    role = "precision"
    plugin_name = "apex"
    #: Refuse to start without CUDA (real apex amp needs it). Private: only a test subclass
    #: driving a CPU fake of ``apex.amp`` sets it to ``False``.
    _needs_cuda: ClassVar[bool] = True

    def __init__(self, amp_level: str | None = None, *, trainer: object = None) -> None:
        if trainer is not None or isinstance(amp_level, PluginFacingTrainer):  # ApexPlugin(trainer), Lightning 1.1
            warn_trainer_argument("ApexPlugin", DISTRIBUTION)
            amp_level = None if trainer is None else amp_level
        if amp_level is not None and amp_level not in AMP_LEVELS:
            raise MisconfigurationError(
                f"ApexPlugin ({DISTRIBUTION}): amp_level must be one of {', '.join(AMP_LEVELS)} (the letter O), "
                f"got {amp_level!r}."
            )
        self.requested_level = amp_level
        #: The opt level in use, resolved against the Trainer by ``check_configuration``.
        self.amp_level: str = amp_level or DEFAULT_AMP_LEVEL
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        #: the ``apex.amp`` module, once found
        self.amp: ModuleType | None = None
        #: True once ``amp.initialize`` ran for the current fit
        self.initialized = False
        self._distributed = False  # world size > 1 in the current fit

    def __repr__(self) -> str:
        return f"{type(self).__name__}(amp_level={self.amp_level!r})"

    # A Trainer pickles its plugins into worker processes: options travel, modules and state not.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("amp", "initialized", "_distributed"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_run_state()

    # -- configuration and setup -------------------------------------------------------------
    def check_configuration(self, trainer: Trainer) -> None:
        if trainer.precision == "bf16":
            raise MisconfigurationError(
                f"ApexPlugin ({DISTRIBUTION}): apex amp has no bf16 mode; use precision='bf16' with native AMP "
                "(amp_backend='native'), or precision=16 with apex."
            )
        trainer_level = getattr(trainer, "amp_level", None)
        if self.requested_level is not None and trainer_level is not None and trainer_level != self.requested_level:
            raise MisconfigurationError(
                f"ApexPlugin ({DISTRIBUTION}): ApexPlugin(amp_level={self.requested_level!r}) and "
                f"Trainer(amp_level={trainer_level!r}) disagree; set the opt level in one place."
            )
        self.amp_level = self.requested_level or trainer_level or DEFAULT_AMP_LEVEL
        # The first line of the error names every blocker, the missing CUDA first (a CUDA-less
        # machine cannot run apex amp whatever apex is installed), each with its fix; apex's long
        # build instructions come after it.
        no_cuda = self._cuda_problem(trainer) if self._needs_cuda else None
        try:
            self.amp = load_amp()
        except ApexUnavailableError as exc:
            if no_cuda is not None:
                exc.args = (f"ApexPlugin ({DISTRIBUTION}): apex amp cannot run here, for two reasons: (1) {no_cuda}; "
                            f"(2) {exc.blocker}. Or, to avoid both, {NATIVE_FIX}, which also runs on the CPU.\n"
                            f"{exc.details}",)
            raise
        if no_cuda is not None:
            raise MisconfigurationError(f"ApexPlugin ({DISTRIBUTION}): {no_cuda}, or {NATIVE_FIX}, "
                                        "which also runs on the CPU.")
        _warn_deprecated_once()

    def _cuda_problem(self, trainer: Trainer) -> str | None:
        """Why this run has no CUDA for apex, with the fix (one clause), or ``None``."""
        if not torch.cuda.is_available():
            return (f"apex amp needs CUDA, but torch.cuda.is_available() is False (torch {torch.__version__}); "
                    "fix: run on a CUDA machine with a CUDA build of torch")
        if trainer.accelerator == "cpu":
            return "apex amp needs CUDA, but accelerator='cpu' was asked for; fix: pass accelerator='cuda'"
        return None

    def connect_precision(
        self, trainer: Trainer, model: nn.Module, optimizers: list[Optimizer]
    ) -> tuple[nn.Module, list[Optimizer]]:
        amp = self.amp
        if amp is None:  # driven without a Trainer's check_configuration
            self.check_configuration(trainer)
            amp = self._require_amp("connect_precision")
        self.initialized = False
        self._distributed = getattr(trainer, "world_size", 1) > 1
        _refuse_wrapped(model)
        if self._needs_cuda:
            _require_cuda_params(model)
        given = list(optimizers)
        _undo_earlier_o1_patching(amp)
        try:
            with _apex_deprecation_silenced():
                result = trainer.hooks.configure_apex(amp=amp, model=model, optimizers=given, amp_level=self.amp_level)
        except (RuntimeError, TypeError) as exc:
            raise MisconfigurationError(_explain_initialize_error(exc, self.amp_level)) from exc
        model, optimizers = _check_configured(result, given)
        tracked = {id(getattr(s, "optimizer", None)) for s in getattr(trainer, "lr_schedulers", [])}
        for old, new in zip(given, optimizers):
            _accept_set_to_none(new)
            if id(old) in tracked or id(new) in tracked:
                mark_scheduler_step(new)  # O1 and O2 replace step
        self.initialized = True
        return model, optimizers

    def configure_apex(
        self, amp: Any, model: nn.Module, optimizers: list[Optimizer], amp_level: str
    ) -> tuple[nn.Module, list[Optimizer]]:
        """``amp.initialize(model, optimizers, opt_level=amp_level)``; override to pass more options."""
        model, optimizers = amp.initialize(model, optimizers, opt_level=amp_level)
        return model, optimizers

    # -- one step ----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, optimizers: list[Optimizer], sync_gradients: bool) -> bool:
        amp = self._require_amp("backward")
        # Across processes, keep the gradients of a micro-batch that does not synchronise scaled in
        # .grad (see the module docstring); the window's last backward unscales the whole window.
        # One process keeps apex's plain recipe.
        delay_unscale = not sync_gradients and self._distributed
        if delay_unscale:
            for optimizer in optimizers:
                _create_master_weights_now(optimizer)
        with amp.scale_loss(loss, optimizers, delay_unscale=delay_unscale) as scaled_loss:
            scaled_loss.backward()
        return True

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """Nothing to do: ``scale_loss`` unscaled the gradients the optimizer steps with (the
        fp32 masters at O2) when its context exited."""
        return

    def clip_gradients(self, grad_clip_val: float, optimizer: Optimizer, norm_type: float) -> torch.Tensor:
        """Clip ``amp.master_params(optimizer)`` (what the optimizer applies; at O2 the model's
        fp16 ``.grad`` stay scaled) to ``grad_clip_val`` with coefficient
        ``min(1, max_norm / (total_norm + 1e-5))``; returns the total norm before clipping."""
        amp = self._require_amp("clip_gradients")
        grads = [p.grad.detach() for p in amp.master_params(optimizer) if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        device = grads[0].device
        norm_type = float(norm_type)
        if math.isinf(norm_type):
            norms = [g.abs().max().to(device, torch.float32) for g in grads]
            total = torch.stack(norms).max()
        else:
            norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32).to(device) for g in grads]
            total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        # Multiplying by a coefficient clamped at 1 (instead of testing it) avoids a device-to-host sync.
        coef = torch.clamp(grad_clip_val / (total + CLIP_EPS), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    def optimizer_step(self, optimizers: list[Optimizer]) -> bool:
        # On overflow, scale_loss's exit replaced optimizer.step by a one-shot skip and set
        # _amp_stash.already_patched (apex/amp/handle.py); the skipping step resets it, so it
        # must be read before stepping.
        stepped = True
        for optimizer in optimizers:
            stash = getattr(optimizer, "_amp_stash", None)
            if stash is not None and getattr(stash, "already_patched", False):
                stepped = False
            optimizer.step()
        return stepped

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.initialized or self.amp is None:
            return
        state = self.amp.state_dict()
        # plain dicts of floats and ints: loadable with weights_only=True
        checkpoint[CHECKPOINT_KEY] = {str(key): dict(value) for key, value in state.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        amp = self._require_amp("on_load_checkpoint")
        if not self.initialized:  # apex's rule: initialize first, then load_state_dict
            raise MisconfigurationError(
                f"ApexPlugin ({DISTRIBUTION}): on_load_checkpoint ran before amp.initialize; apex restores its "
                "loss scalers only after initialize (the Trainer calls connect_precision first)."
            )
        state = checkpoint.get(CHECKPOINT_KEY)
        if not state:
            warn_at_caller(
                f"ApexPlugin: the checkpoint has no apex amp state (key {CHECKPOINT_KEY!r}; saved by a run without "
                "apex?), so the loss scale starts again from apex's initial value.",
                UserWarning,
            )
            return
        try:
            amp.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"ApexPlugin ({DISTRIBUTION}): the checkpoint's {CHECKPOINT_KEY!r} entry is not an amp.state_dict() "
                f"({type(exc).__name__}: {exc})."
            ) from exc

    def _require_amp(self, hook: str) -> ModuleType:
        if self.amp is None:
            raise MisconfigurationError(
                f"ApexPlugin: {hook} ran before the plugin found apex.amp; drive it with a torchplug Trainer "
                "(check_configuration, then connect_precision)."
            )
        return self.amp


# -- helpers ---------------------------------------------------------------------------------
_WRAP_HINT = (
    "apex must see the bare model: amp.initialize runs in connect_precision, before configure_ddp, and the "
    "DDP plugin wraps the model afterwards. Pass the unwrapped module (and return it unwrapped from "
    "configure_apex)."
)


def _refuse_wrapped(model: nn.Module) -> None:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise MisconfigurationError(
            f"ApexPlugin ({DISTRIBUTION}): the model is already wrapped in {type(model).__name__}. " + _WRAP_HINT
        )


def _undo_earlier_o1_patching(amp: ModuleType) -> None:
    """Restore the torch functions an earlier O1 ``amp.initialize`` in this process patched.

    apex never undoes O1's patching, and a second O1 initialize (a second fit, a resume in the
    same process) wraps the already-wrapped functions again; real apex 25.05 then fails in its
    cast cache (``'NoneType' object has no attribute 'next_functions'``, apex/amp/utils.py).
    Each fit therefore starts from unpatched torch; the current fit's O1 patching stays active
    after it ends, as in a hand-written apex script."""
    handle = getattr(getattr(amp, "_amp_state", None), "handle", None)
    deactivate = getattr(handle, "_deactivate", None)
    if callable(deactivate):
        deactivate()


def _create_master_weights_now(optimizer: Optimizer) -> None:
    """Run apex's lazy optimizer set-up (O2: create the fp32 master weights) if it has not run.

    apex runs it in the first ``scale_loss`` that prepares a backward, but a delayed micro-batch
    skips that step. If the set-up then first runs in the window's last backward, it sets the
    gradients of the fp32 parameters (BatchNorm at O2) to None after they were accumulated, and
    the whole window's gradients for them are lost (apex 25.05 lazy_init_with_master_weights).
    Here the model already holds its final weights (a resume loaded them before training)."""
    stash = getattr(optimizer, "_amp_stash", None)
    lazy_init = getattr(optimizer, "_amp_lazy_init", None)
    if stash is not None and not getattr(stash, "lazy_init_called", True) and callable(lazy_init):
        lazy_init()


def _require_cuda_params(model: nn.Module) -> None:
    devices = sorted({str(p.device) for p in model.parameters() if p.device.type != "cuda"})
    if devices:
        raise MisconfigurationError(
            f"ApexPlugin ({DISTRIBUTION}): apex amp needs the model on CUDA, but parameters are on "
            f"{', '.join(devices)}. Pass Trainer(accelerator='cuda') (or move the model to CUDA before fit)."
        )


def _explain_initialize_error(exc: BaseException, level: str) -> str:
    text = str(exc)
    if "Incoming model is an instance of" in text:
        hint = _WRAP_HINT
    elif "HalfTensor" in text and "expected torch.cuda.FloatTensor" in text:
        hint = ("The model is already fp16: apex casts it in place at O2/O3, so a model that went through "
                "amp.initialize (an earlier fit) or was .half()'d cannot be initialised again. "
                "Build a fresh fp32 model.")
    elif "expected torch.cuda.FloatTensor" in text:
        hint = "apex amp needs the model's parameters on CUDA: pass Trainer(accelerator='cuda')."
    elif "only be passed through amp.initialize once" in text:
        hint = "Each fit needs new optimizers: configure_optimizers() must create them, not return stored ones."
    else:
        hint = "See apex's message above."
    return (f"ApexPlugin ({DISTRIBUTION}): configure_apex → amp.initialize(opt_level={level!r}) failed: "
            f"{type(exc).__name__}: {text}\n{hint}")


def _check_configured(result: Any, given: list[Optimizer]) -> tuple[nn.Module, list[Optimizer]]:
    """``configure_apex``'s answer as ``(module, list of optimizers)``, one per optimizer given."""
    if isinstance(result, (tuple, list)) and len(result) == 2:
        model, optimizers = result
        if isinstance(optimizers, Optimizer):
            optimizers = [optimizers]
        if (isinstance(model, nn.Module) and isinstance(optimizers, (list, tuple))
                and len(optimizers) == len(given) and all(isinstance(o, Optimizer) for o in optimizers)):
            _refuse_wrapped(model)
            return model, list(optimizers)
    raise MisconfigurationError(
        f"ApexPlugin ({DISTRIBUTION}): configure_apex must return (model, optimizers) as amp.initialize does, "
        f"with {len(given)} optimizer(s); got {result!r:.200}."
    )


def _accept_set_to_none(optimizer: Optimizer) -> None:
    """Let ``optimizer.zero_grad(set_to_none=...)`` work on an apex-patched optimizer.

    With master weights (O2), apex replaces ``zero_grad`` by a method without arguments; the core
    calls ``zero_grad(set_to_none=True)`` after every step. The argument is accepted and ignored:
    apex's zero_grad already drops the master grads, and its next ``scale_loss`` sets the model's
    fp16 grads to None before backward (apex/amp/_process_optimizer.py), so nothing is accumulated
    into a stale gradient either way.
    """
    zero_grad = optimizer.zero_grad
    try:
        params = inspect.signature(zero_grad).parameters
    except (TypeError, ValueError):
        return
    if "set_to_none" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return

    def zero_grad_accepting_set_to_none(set_to_none: bool = True) -> None:
        zero_grad()

    optimizer.zero_grad = zero_grad_accepting_set_to_none  # type: ignore[method-assign]
