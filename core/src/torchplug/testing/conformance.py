"""Conformance suite: the contracts a torchplug plugin keeps, as pytest classes to subclass.

A plugin project runs it in its own CI. In a test module::

    import pytest
    from torchplug.testing.conformance import PrecisionPluginContract

    from my_plugin import MyPrecision

    class TestMyPrecision(PrecisionPluginContract):
        @pytest.fixture
        def plugin_factory(self):
            return MyPrecision                     # called with no arguments for each run

        @pytest.fixture
        def trainer_kwargs(self):
            return {"precision": "bf16"}           # what a user passes along with the plugin

pytest collects the inherited tests. Each failure names the contract that broke, the plugin
and what was observed. Plugin classes must live in an importable module (not inside a test
function): strategy contracts pickle them into worker processes.

* :class:`PluginContract` (every plugin): registers cleanly; survives pickling into workers;
  every hook the core calls still fires with the plugin active (fit, resume, failing fit);
  no process group is left behind; no host read (``.item()``, ``float(t)``, ``.cpu()``, ...)
  per step beyond the ``host_reads_per_step`` fixture's allowance (default 0; precision
  contracts allow fp16's one overflow check), since on a GPU each one stalls the host.
* :class:`PrecisionPluginContract`: declares ``role = "precision"``; autocast is really active
  inside ``training_step`` (a matmul computes in the plugin's dtype); gradients are unscaled
  exactly once before clipping (at their true scale, compared with an fp32 recomputation, and a
  second ``unscale_gradients`` changes nothing); ``clip_gradients`` returns the total norm and
  honours ``norm_type`` (2 and inf).
* :class:`StrategyPluginContract`: declares ``role = "strategy"``; on 2 gloo ranks no gradient
  all-reduce happens inside ``block_backward_sync`` and each gradient is all-reduced exactly once
  after it; ``get_model_from_plugin`` undoes ``configure_ddp``; ``all_gather_object`` returns
  every rank's object in rank order (the plan handshake); replicas stay identical; every
  hook fires in each launch mode (in-process, ``devices=2`` workers, an already initialised
  process group), which the plugin leaves initialised.
* :class:`CallbackPluginContract` (callbacks and loggers): a fit stopped and resumed from
  ``last.ckpt`` ends with the same weights as an uninterrupted one; the state it adds to a
  checkpoint survives a resume; no host read per step (checkpointing on).

Multi-process contracts use real processes, a ``FileStore`` in a temporary folder (no TCP
port), explicit timeouts and ``OMP_NUM_THREADS=1``.

The code lives in :mod:`torchplug.testing.contracts`, one module per plugin kind; import the
classes from here.
"""

from __future__ import annotations

from torchplug.testing.contracts import (
    CallbackPluginContract,
    PluginContract,
    PrecisionPluginContract,
    StrategyPluginContract,
)

# The suite's timeouts and hook sets, readable here as before the split.
from torchplug.testing.contracts._runs import LAUNCHER_ONLY as LAUNCHER_ONLY
from torchplug.testing.contracts._runs import PG_TIMEOUT_S as PG_TIMEOUT_S
from torchplug.testing.contracts._runs import PROCESS_TIMEOUT_S as PROCESS_TIMEOUT_S
from torchplug.testing.contracts._runs import RANK_ZERO_ONLY as RANK_ZERO_ONLY

__all__ = ["CallbackPluginContract", "PluginContract", "PrecisionPluginContract", "StrategyPluginContract"]
