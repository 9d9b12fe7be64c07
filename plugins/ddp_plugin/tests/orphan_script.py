"""Run by test_ddp_plugin.py: a devices=2 fit (forkserver workers) whose launching process the test kills."""

from __future__ import annotations

import sys

from ddp_test_support import Sleeper, loader, quiet

from torchplug import Trainer
from torchplug_ddp import DDPPlugin

if __name__ == "__main__":
    trainer = Trainer(**quiet(devices=2, max_epochs=100, plugins=[DDPPlugin(start_method="forkserver")]))
    trainer.fit(Sleeper(sys.argv[1]), loader(4))
