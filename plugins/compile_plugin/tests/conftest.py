from __future__ import annotations

import os

# One thread per process: two gloo ranks share two cores (spawned workers inherit it).
os.environ["OMP_NUM_THREADS"] = "1"
