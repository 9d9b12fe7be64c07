"""What each rank saw of the setup (importable by spawned workers)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from torchplug import Plugin


class SetupProbe(Plugin):
    plugin_name = "setup_probe"

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_start(self, trainer: Any, model: nn.Module) -> None:
        self.trainer, self.module, self.reported = trainer, model, False

    def on_before_forward(self, model: nn.Module) -> None:
        """The first training micro-batch: ``model`` is the module the loop runs (the wrapper)."""
        if self.reported or not model.training:
            return
        self.reported = True
        trainer, module = self.trainer, self.module
        inner = getattr(getattr(model, "module", None), "module", None)  # DDP(TrainingStepModule(module))
        seen = {"transforms": trainer.model_transforms, "wrapper": type(model).__name__,
                "wraps_the_module": inner is module, "step_compiled": "training_step" in module.__dict__,
                "root_of_the_module": getattr(model, "module", None) is module,  # FSDP's root TrainingStepModule
                "sharded": any(type(p).__name__ == "DTensor" for p in module.parameters()),
                "keys": sorted(module.state_dict())}
        Path(self.out_dir, f"setup-rank{trainer.global_rank}-{os.getpid()}.json").write_text(json.dumps(seen))
