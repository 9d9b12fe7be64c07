"""The contracts of a strategy plugin: :class:`StrategyPluginContract` (see
:mod:`torchplug.testing.conformance`), checked on gloo ranks on the CPU."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from torchplug.manager import role_of
from torchplug.testing.contracts._runs import (
    LAUNCHER_ONLY,
    RANK_ZERO_ONLY,
    _broken,
    _cached,
    _fit_kwargs,
    _read_probes,
    _reference_hooks,
    _run_preinitialised,
    _SyncProbe,
    _timeout,
)
from torchplug.testing.contracts.plugin import PluginContract
from torchplug.testing.models import TinyMLP, parameters_vector, tiny_loader
from torchplug.testing.recorder import HookRecorder
from torchplug.trainer import Trainer

__all__ = ["StrategyPluginContract"]


class StrategyPluginContract(PluginContract):
    """Contracts of a strategy plugin (``role = "strategy"``), checked on 2 gloo ranks on the CPU
    (plus the in-process contracts of every plugin).

    Fixtures to define: ``plugin_factory``; optionally ``trainer_kwargs`` and ``world_size``.
    """

    @pytest.fixture
    def world_size(self) -> int:
        """Processes of the multi-process runs."""
        return 2

    @pytest.fixture
    def preinitialised_run(self, request: pytest.FixtureRequest, plugin_factory: Callable[[], object],
                           trainer_kwargs: dict[str, Any], world_size: int,
                           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        """Each rank initialises a gloo group (FileStore) and then fits with the plugin."""
        def make() -> dict[str, Any]:
            plugin = plugin_factory()
            run = tmp_path_factory.mktemp("preinit")
            try:
                _run_preinitialised(plugin, trainer_kwargs, run, world_size)
            except Exception as exc:
                _broken("the plugin trains in an already initialised process group (Ray Train, torchrun fixtures)",
                        plugin, f"{type(exc).__name__}: {exc}")
            results = [json.loads((run / f"result-{r}.json").read_text(encoding="utf-8")) for r in range(world_size)]
            return {"plugin": plugin, "results": results, "probes": _read_probes(run / "probes"),
                    "calls": HookRecorder(run / "hookcalls").by_process()}
        return _cached(request, "preinit", make)  # type: ignore[no-any-return]

    @pytest.fixture
    def spawned_run(self, request: pytest.FixtureRequest, plugin_factory: Callable[[], object],
                    trainer_kwargs: dict[str, Any], world_size: int,
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        """``Trainer(devices=world_size)``: the plugin starts the worker processes itself."""
        def make() -> dict[str, Any]:
            plugin = plugin_factory()
            run = tmp_path_factory.mktemp("spawned")
            recorder = HookRecorder(run / "hookcalls")
            module = TinyMLP()
            before = parameters_vector(module)
            trainer = Trainer(plugins=[plugin, _SyncProbe(run / "probes"), recorder],
                              **_fit_kwargs(run / "root", trainer_kwargs, devices=world_size))
            try:
                trainer.fit(module, tiny_loader(n=64, batch_size=4), tiny_loader(n=16))
            except Exception as exc:
                _broken(f"the plugin trains in {world_size} processes it starts itself (devices={world_size})", plugin,
                        f"{type(exc).__name__}: {exc}")
            return {"plugin": plugin, "probes": _read_probes(run / "probes"), "calls": recorder.by_process(),
                    "before": before, "after": parameters_vector(module), "parent": os.getpid()}
        return _cached(request, "spawned", make)  # type: ignore[no-any-return]

    # -- tests -------------------------------------------------------------------------------
    def test_declares_strategy_role(self, plugin_factory: Callable[[], object]) -> None:
        plugin = plugin_factory()
        if role_of(plugin) != "strategy":
            _broken("a strategy plugin declares role = 'strategy'", plugin,
                    f"role is {role_of(plugin)!r}; without it two strategy plugins are not refused together")

    @_timeout(300)
    def test_no_gradient_sync_inside_block_backward_sync(self, preinitialised_run: dict[str, Any]) -> None:
        plugin, contract = preinitialised_run["plugin"], "no gradient all-reduce inside block_backward_sync"
        inside = 0
        for probe in preinitialised_run["probes"]:
            for batch in probe["batches"]:
                if batch["window_end"]:
                    continue
                inside += 1
                if batch["params_reduced"]:
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: micro-batch {batch['batch_idx']} (not the last of its accumulation "
                            f"window, so run inside block_backward_sync) all-reduced the gradients of "
                            f"{batch['params_reduced']} parameters through DDP. Return model.no_sync() from "
                            "block_backward_sync without entering it: the core enters it around forward AND backward.")
                if batch.get("collectives"):
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: micro-batch {batch['batch_idx']} (not the last of its accumulation "
                            f"window, so run inside block_backward_sync) issued {batch['collectives']} gradient "
                            "collective(s) (all_reduce / reduce_scatter): the context must stop gradient sync "
                            "(DDP no_sync(), FSDP2 set_requires_gradient_sync(False)).")
                if batch["grad_spread"] is not None and batch["grad_spread"] <= 1e-7:
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: after micro-batch {batch['batch_idx']} inside block_backward_sync "
                            "the ranks' gradients are identical although their data differ: they were synchronised")
        if not inside:
            _broken(contract, plugin, "no micro-batch ran inside block_backward_sync (accumulate_grad_batches=2)")

    @_timeout(300)
    def test_exactly_one_gradient_sync_after_block_backward_sync(self, preinitialised_run: dict[str, Any]) -> None:
        plugin = preinitialised_run["plugin"]
        contract = "each gradient is all-reduced exactly once per accumulation window, after block_backward_sync"
        for probe in preinitialised_run["probes"]:
            error = probe["comm_hook_error"]
            if error and "only be called once" not in error:
                raise AssertionError(f"conformance suite: could not count DDP all-reduces: {error}")
            counted = probe["ddp_found"] and not error
            for batch in probe["batches"]:
                if batch["window_end"] and counted and (
                        batch["params_reduced"] != probe["n_params"] or batch["max_reductions"] != 1):
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: the last micro-batch of the window ending at batch "
                            f"{batch['batch_idx']} all-reduced {batch['params_reduced']} of {probe['n_params']} "
                            f"parameters, some {batch['max_reductions']} times; expected each once")
            for i, window in enumerate(probe["windows"]):
                if window["grad_spread"] is None or window["grad_spread"] > 1e-6:
                    _broken(contract, plugin,
                            f"rank {probe['rank']}: at the end of window {i} the ranks' gradients differ by up to "
                            f"{window['grad_spread']}: they were not averaged across processes")

    @_timeout(300)
    def test_all_gather_object_returns_every_rank_in_rank_order(self, preinitialised_run: dict[str, Any],
                                                                world_size: int) -> None:
        plugin = preinitialised_run["plugin"]
        expected = [{"rank": rank} for rank in range(world_size)]
        for probe in preinitialised_run["probes"]:
            if probe["gathered"] != expected:
                _broken("all_gather_object returns every rank's object, in rank order (the plan handshake needs it)",
                        plugin, f"rank {probe['rank']} got {probe['gathered']!r}, expected {expected!r}: implement "
                        "all_gather_object with torch.distributed.all_gather_object on the plugin's group")

    @_timeout(300)
    def test_optimizers_hold_the_parameters_that_train(self, preinitialised_run: dict[str, Any]) -> None:
        plugin = preinitialised_run["plugin"]
        for probe in preinitialised_run["probes"]:
            missing = probe["optimizer_params"].get("missing")
            if missing:
                _broken("the optimizers update the parameters the model trains with", plugin,
                        f"rank {probe['rank']}: at on_fit_start no optimizer holds {', '.join(missing)}: they were "
                        "replaced after the optimizers were built (e.g. sharded in configure_ddp). Change the module "
                        "in a model transform (the model_transforms hook), which runs before configure_optimizers.")

    @_timeout(300)
    def test_get_model_from_plugin_round_trips(self, preinitialised_run: dict[str, Any]) -> None:
        plugin = preinitialised_run["plugin"]
        for probe in preinitialised_run["probes"]:
            if probe["roundtrip"] != "same":
                _broken("get_model_from_plugin(configure_ddp(model)) is the user's module", plugin,
                        f"rank {probe['rank']}: configure_ddp returned {probe['wrapped']}, and get_model_from_plugin "
                        f"of it returned {probe['roundtrip']} instead of the module given to fit")

    @_timeout(300)
    def test_every_hook_fires_with_initialised_process_group(self, request: pytest.FixtureRequest,
                                                             preinitialised_run: dict[str, Any],
                                                             world_size: int, tmp_path: Path) -> None:
        plugin, contract = preinitialised_run["plugin"], "every hook fires (already initialised process group)"
        expected = _reference_hooks(request, tmp_path / "reference")["fit"]
        for result in preinitialised_run["results"]:
            if result["world_size"] != world_size:
                _broken(contract, plugin, f"rank {result['rank']}: trainer.world_size was {result['world_size']} in a "
                        f"process group of {world_size}: the plugin must use the group it finds initialised")
            if not result["group_initialised_after_fit"]:
                _broken("the plugin leaves a process group it did not create initialised", plugin,
                        f"rank {result['rank']}: the group was destroyed by the fit")
        _check_processes(contract, plugin, preinitialised_run["calls"], expected, world_size, parent=None)
        _check_replicas(plugin, preinitialised_run["probes"], "already initialised process group")

    @_timeout(300)
    def test_every_hook_fires_in_spawned_workers(self, request: pytest.FixtureRequest, spawned_run: dict[str, Any],
                                                 world_size: int, tmp_path: Path) -> None:
        plugin, contract = spawned_run["plugin"], f"every hook fires (devices={world_size}, workers the plugin starts)"
        expected = _reference_hooks(request, tmp_path / "reference")["fit"]
        _check_processes(contract, plugin, spawned_run["calls"], expected, world_size, parent=spawned_run["parent"])
        _check_replicas(plugin, spawned_run["probes"], f"devices={world_size}")

    @_timeout(300)
    def test_spawned_fit_returns_trained_weights(self, spawned_run: dict[str, Any]) -> None:
        plugin = spawned_run["plugin"]
        contract = "after a fit in worker processes, the model given to fit holds rank 0's trained weights"
        rank0 = next((p for p in spawned_run["probes"] if p["rank"] == 0), None)
        if rank0 is None:
            _broken(contract, plugin, "no rank 0 reported")
            return
        after, before = spawned_run["after"], spawned_run["before"]
        if torch.equal(after, before):
            _broken(contract, plugin, "the parent's model still has its initial weights")
        if not torch.allclose(after, torch.tensor(rank0["params"], dtype=torch.float64), rtol=0, atol=1e-6):
            _broken(contract, plugin, "the parent's model weights differ from rank 0's at on_fit_end")


def _check_processes(contract: str, plugin: object, calls: dict[int, list[Any]], expected: set[str],
                     world_size: int, parent: int | None) -> None:
    fitting = {pid: {c.name for c in cs} for pid, cs in calls.items() if any(c.name == "setup_environment" for c in cs)}
    if len(fitting) != world_size:
        _broken(contract, plugin, f"{len(fitting)} process(es) ran a fit (setup_environment), expected {world_size}")
    per_process = expected - LAUNCHER_ONLY - RANK_ZERO_ONLY
    for pid, fired in fitting.items():
        missing = sorted(per_process - fired)
        if missing:
            _broken(contract, plugin, f"process {pid} never called: {', '.join(missing)}")
    for hook in sorted(expected & RANK_ZERO_ONLY):
        if not any(hook in fired for fired in fitting.values()):
            _broken(contract, plugin, f"no process called {hook} (global rank 0 should)")
    if parent is not None:
        launched = {c.name for c in calls.get(parent, [])}
        if "launch" in expected and "launch" not in launched:
            _broken(contract, plugin, "the launch hook did not fire in the process that called fit")
    elif "launch" in expected:
        missing_launch = [pid for pid, fired in fitting.items() if "launch" not in fired]
        if missing_launch:
            _broken(contract, plugin, f"launch did not fire in process(es) {missing_launch}")


def _check_replicas(plugin: object, probes: list[dict[str, Any]], mode: str) -> None:
    if len(probes) < 2:
        _broken(f"replicas stay identical ({mode})", plugin, f"{len(probes)} rank(s) reached on_fit_end")
    first = torch.tensor(probes[0]["params"], dtype=torch.float64)
    for probe in probes[1:]:
        diff = float((torch.tensor(probe["params"], dtype=torch.float64) - first).abs().max())
        if diff > 1e-6:
            _broken(f"replicas stay identical ({mode})", plugin,
                    f"rank {probe['rank']}'s weights differ from rank {probes[0]['rank']}'s by up to {diff:.3g} "
                    "at on_fit_end")
