"""Scenarios run by the venv's python (see support.py): ``python scenarios.py <name>``.

Each prints one JSON object as its last line. The tests set the environment variables.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any


def tp_modules() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in
                  ("tp_autolog", "tp_named", "tp_broken", "tp_old", "tp_rival"))


def make_model() -> Any:
    import torch

    from torchplug import TrainingModule

    class Tiny(TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    return Tiny()


def data() -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(3)]


def trainer(**kwargs: Any) -> Any:
    from torchplug import Trainer

    return Trainer(max_steps=3, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   default_root_dir=os.getcwd(), **kwargs)


def fit(t: Any) -> dict[str, Any]:
    model = make_model()
    before = model.layer.weight.detach().clone()
    t.fit(model, data())
    return {"weights_changed": bool((model.layer.weight != before).any()), "global_step": t.global_step,
            "metrics": {k: float(v) for k, v in t.callback_metrics.items()}}


def records() -> list[str]:
    path = os.environ.get("TP_AUTOLOG_FILE", "")
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    os.remove(path)
    return lines


def error(call: Any) -> dict[str, Any]:
    try:
        call()
    except Exception as exc:
        cause = exc.__cause__
        return {
            "type": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
            "cause": None if cause is None else type(cause).__name__,
            "cause_traceback": "" if cause is None else "".join(traceback.format_exception(cause)),
            "modules": tp_modules(),
        }
    return {"type": None, "modules": tp_modules()}


def autoload() -> dict[str, Any]:
    t = trainer()
    names = t.plugin_names
    outcome = fit(t)
    return {"plugin_names": names, "records": records(), "fit": outcome, "modules": tp_modules()}


def selection() -> dict[str, Any]:
    out: dict[str, Any] = {}
    t = trainer()  # TORCHPLUG_DISABLE_PLUGIN_AUTOLOAD=1 is set by the test
    out["disabled"] = {"plugin_names": t.plugin_names, "modules": tp_modules(), "fit": fit(t), "records": records()}
    t = trainer(plugins=["freeze"])
    out["by_argument"] = {"plugin_names": t.plugin_names, "fit": fit(t), "modules": tp_modules()}
    os.environ["TORCHPLUG_PLUGINS"] = "freeze, autolog"
    t = trainer()
    out["by_env"] = {"plugin_names": t.plugin_names, "fit": fit(t), "records": records(), "modules": tp_modules()}
    return out


def errors() -> dict[str, Any]:
    return {
        # first: blocking must keep the broken module from being imported at all
        "blocked_by_argument": {"plugin_names": trainer(blocked_plugins=["broken_autoload"]).plugin_names,
                                "modules": tp_modules()},
        "broken_autoload": error(lambda: trainer()),
        "broken_selected": error(lambda: trainer(blocked_plugins=["broken_autoload"], plugins=["broken"])),
        "incompatible": error(lambda: trainer(blocked_plugins=["broken_autoload"], plugins=["oldplug"])),
        "conflict": error(lambda: trainer(blocked_plugins=["broken_autoload"], plugins=["precise", "rival_precision"])),
        "typo": error(lambda: trainer(blocked_plugins=["broken_autoload"], plugins=["frezee"])),
        "first_party": error(lambda: trainer(blocked_plugins=["broken_autoload"], plugins=["ddp"])),
        "shorthand": error(lambda: trainer(blocked_plugins=["broken_autoload"], precision=16)),
        "blocked_selected": error(lambda: trainer(blocked_plugins=["broken_autoload", "freeze"], plugins=["freeze"])),
    }


if __name__ == "__main__":
    result = {"autoload": autoload, "selection": selection, "errors": errors}[sys.argv[1]]()
    print(json.dumps(result))
