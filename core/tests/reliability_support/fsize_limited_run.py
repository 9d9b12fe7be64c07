"""A fit whose files cannot grow: ``python fsize_limited_run.py ROOT``.

``RLIMIT_FSIZE=0`` (with SIGXFSZ ignored, so a write fails with EFBIG instead of killing the
process) stands for a full disk or an exhausted quota, and works where chmod does not (root).
Prints one JSON line: the exception's type and message.
"""

from __future__ import annotations

import json
import resource
import signal
import sys

import torch

torch.set_num_threads(1)

from common import TinyNet, loader  # noqa: E402

import torchplug  # noqa: E402

root = sys.argv[1]
trainer = torchplug.Trainer(max_epochs=1, default_root_dir=root, enable_progress_bar=False, autoload_plugins=False)
model, data = TinyNet(), loader()
model.configure_optimizers()  # torch imports its compiler stack here, which probes for a temp dir
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    trainer.fit(model, data)
    result = {"type": None, "message": ""}
except Exception as exc:
    result = {"type": type(exc).__name__, "message": str(exc)}
print(json.dumps(result), flush=True)
