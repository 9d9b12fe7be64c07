"""Run by test_ddp_plugin.py under torchrun: one fit per rank, like devices=2 in the test."""

from __future__ import annotations

import os
import sys

import torch
from ddp_test_support import Recorder, Regressor, loader, quiet, state

from torchplug import Trainer

if __name__ == "__main__":
    out, epochs, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    num_nodes, accelerator = int(sys.argv[4]), sys.argv[5]
    model = Regressor()
    trainer = Trainer(**quiet(num_nodes=num_nodes, devices=1, max_epochs=epochs, accelerator=accelerator,
                              plugins=[Recorder(out, tag="torchrun")]))
    trainer.fit(model, loader(micro))
    if trainer.is_global_zero:
        torch.save(state(model), os.path.join(out, "torchrun-weights.pt"))
