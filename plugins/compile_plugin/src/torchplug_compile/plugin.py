"""``CompilePlugin``: ``torch.compile`` of the module's ``training_step``, the ``"compile"`` model transform."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchplug import MisconfigurationError, ModelTransform, Plugin

if TYPE_CHECKING:
    from torchplug import Trainer


class CompilePlugin(Plugin):
    """Compile the training step with ``torch.compile``.

    :param options: passed to ``torch.compile`` as given (``backend``, ``mode``, ``fullgraph``,
        ``dynamic``, ``options``); unknown names are refused when the plugin is built.

    What is compiled: the module's ``training_step`` (bound to the module, set as an instance
    attribute), so everything the step runs is compiled whether it calls ``self(x)`` or
    submodules directly. It is the ``"compile"`` model transform: after
    ``"activation_checkpoint"``, before ``"shard"`` (``torchplug.transforms.DEFAULT_ORDER``),
    before the optimizers and the DDP/FSDP wrapper, which then runs the compiled step in its
    forward (DDP's graph splitting at bucket boundaries applies). Precision composes: the
    precision plugin's autocast is entered around the compiled step. Parameters and state-dict
    keys are the module's own (no ``_orig_mod.``); the instance attribute is removed when the
    fit ends, so the module given to ``fit`` is left as it was.
    """

    plugin_name = "compile"

    def __init__(self, **options: Any) -> None:
        accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise MisconfigurationError(
                f"CompilePlugin (torchplug-compile): {', '.join(unknown)} not accepted by torch.compile "
                f"(torch {torch.__version__}); it takes {', '.join(sorted(accepted))}."
            )
        self.options = options
        self._compiled: nn.Module | None = None

    def __repr__(self) -> str:
        return f"CompilePlugin({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["options"])  # type: ignore[misc]

    def model_transforms(self) -> ModelTransform:
        return ModelTransform("compile", self._compile)

    def _compile(self, module: nn.Module) -> None:
        step = type(module).training_step.__get__(module)  # type: ignore[attr-defined]
        # An instance attribute shadows the class's method: the loop and TrainingStepModule (the
        # DDP/FSDP wrappers' inner module) call module.training_step, and get the compiled one.
        module.__dict__["training_step"] = torch.compile(step, **self.options)
        self._compiled = module

    def teardown_environment(self, trainer: Trainer) -> None:
        if self._compiled is not None:
            self._compiled.__dict__.pop("training_step", None)
            self._compiled = None
