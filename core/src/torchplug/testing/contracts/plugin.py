"""The contracts every plugin keeps: :class:`PluginContract` (see :mod:`torchplug.testing.conformance`)."""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from torchplug.manager import get_plugin_manager
from torchplug.testing.contracts._runs import _broken, _fit_kwargs, _reference_hooks, _three_runs
from torchplug.testing.models import TinyMLP, tiny_loader
from torchplug.testing.syncs import accelerator_path, reads_per_step
from torchplug.trainer import Trainer

__all__ = ["PluginContract"]


class PluginContract:
    """Contracts every plugin keeps. Subclass it (or a role's contract) as ``Test<Something>``
    and define the ``plugin_factory`` fixture."""

    @pytest.fixture
    def plugin_factory(self) -> Callable[[], object]:
        """Return a callable taking no arguments that makes a new plugin object (e.g. the class)."""
        raise NotImplementedError(
            f"{type(self).__name__}: define a `plugin_factory` fixture returning a zero-argument callable "
            "that makes a new plugin, e.g. `return MyPlugin`."
        )

    @pytest.fixture
    def trainer_kwargs(self) -> dict[str, Any]:
        """Extra Trainer arguments of every contract run (e.g. ``{"precision": "bf16"}``)."""
        return {}

    @pytest.fixture
    def host_reads_per_step(self) -> float:
        """Host reads per optimizer step the plugin may add: what a hand-written loop using the
        same library makes (e.g. GradScaler.step's overflow check). Default 0."""
        return 0.0

    @pytest.fixture
    def host_read_trainer_kwargs(self) -> dict[str, Any]:
        """Trainer arguments of the host-read runs (both end with the same epoch end, so what
        happens there cancels out); callbacks that need checkpointing turn it back on."""
        return {"enable_checkpointing": False}

    @pytest.fixture(autouse=True)
    def _contract_environment(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        # Installed plugins and the user's environment must not take part in a contract run.
        for name in ("TORCHPLUG_PLUGINS", "TORCHPLUG_BLOCK_PLUGINS", "TORCHPLUG_TRACE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        group_before = dist.is_available() and dist.is_initialized()
        yield
        if not group_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            pytest.fail("a process group was left initialised in the test process after the contract run "
                        "(teardown_environment must destroy the group setup_environment created)", pytrace=False)

    # -- tests -------------------------------------------------------------------------------
    def test_registers_cleanly(self, plugin_factory: Callable[[], object]) -> None:
        plugin = plugin_factory()
        try:
            pm = get_plugin_manager([plugin], autoload=False, env={})
        except Exception as exc:
            _broken("the plugin registers with a torchplug plugin manager", plugin, f"{type(exc).__name__}: {exc}")
        if not pm.get_hookcallers(plugin):
            _broken("the plugin implements at least one hook", plugin,
                    "no method or function was registered as a hook implementation (torchplug.hookspecs lists them)")

    def test_survives_pickling_into_workers(self, plugin_factory: Callable[[], object],
                                            trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
        plugin = plugin_factory()
        try:
            trainer = Trainer(plugins=[plugin], **_fit_kwargs(tmp_path, trainer_kwargs))
        except Exception as exc:
            _broken("a Trainer accepts the plugin (with trainer_kwargs)", plugin, f"{type(exc).__name__}: {exc}")
        try:
            copy_ = pickle.loads(pickle.dumps(trainer))
        except Exception as exc:
            _broken("the plugin can be pickled (a Trainer pickles its plugins into worker processes)", plugin,
                    f"pickling a Trainer with it raised {type(exc).__name__}: {exc}. Define the class at module level "
                    "and drop per-process state (process groups, open files) in __getstate__.")
        rebuilt = [rec.plugin for rec in copy_.pm.records if type(rec.plugin) is type(plugin)]
        if not rebuilt:
            _broken("the plugin can be pickled", plugin, "the unpickled Trainer has no plugin of this class")

    def test_every_hook_fires_in_process(self, request: pytest.FixtureRequest, plugin_factory: Callable[[], object],
                                         trainer_kwargs: dict[str, Any], tmp_path: Path) -> None:
        reference = _reference_hooks(request, tmp_path / "reference")
        plugin = plugin_factory()
        try:
            recs = _three_runs(plugin_factory, trainer_kwargs, tmp_path / "plugin")
        except Exception as exc:
            _broken("a fit with the plugin runs in-process", plugin,
                    f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}")
        for run, expected in reference.items():
            missing = sorted(expected - recs[run].fired())
            if missing:
                _broken("every hook fires (in-process)", plugin,
                        f"in the {run!r} run these hooks never fired with the plugin active, but do without it: "
                        f"{', '.join(missing)}")
        if not recs["error"].raised:  # type: ignore[attr-defined]
            _broken("a fit that fails raises", plugin,
                    "training_step raised, and fit returned normally: the plugin swallowed the exception")

    def test_no_host_read_per_step(self, plugin_factory: Callable[[], object], trainer_kwargs: dict[str, Any],
                                   host_reads_per_step: float, host_read_trainer_kwargs: dict[str, Any],
                                   tmp_path: Path) -> None:
        # The run takes the accelerator's path (the loss check queued on the device), so the
        # count is what a GPU run would sync on; 12 steps minus 4 cancels setup and teardown.
        plugin = plugin_factory()

        def fit_for(steps: int) -> None:
            kwargs = _fit_kwargs(tmp_path / str(steps), trainer_kwargs, max_steps=steps, limit_train_batches=None,
                                 accumulate_grad_batches=1, log_every_n_steps=1000,
                                 **{"enable_checkpointing": False, **host_read_trainer_kwargs})
            Trainer(plugins=[plugin_factory()], **kwargs).fit(TinyMLP(), tiny_loader(n=64, batch_size=4))

        try:
            with accelerator_path():
                per_step, reads = reads_per_step(fit_for)
        except Exception as exc:
            _broken("a fit with the plugin runs in-process", plugin, f"{type(exc).__name__}: {exc}")
        if per_step > host_reads_per_step:
            _broken("no host read per step", plugin,
                    f"{per_step:g} host reads per optimizer step (.item(), float(t), bool(t), .tolist(), .cpu(), ...), "
                    f"{host_reads_per_step:g} allowed. On a GPU each one waits for all queued device work. Keep "
                    "values on the device (log tensors; torch.where instead of if), or read them at an interval. "
                    f"Call sites over 12 steps:\n{reads.report()}")
