"""DDPPlugin with real gloo processes: 2 ranks on the CPU, spawned by the plugin, by the test
(a process group initialised beforehand) and by torchrun (two nodes on localhost).

Each spawn of two workers costs ~5-10 s on two cores (``import torch`` plus the first
``DistributedDataParallel()``), so one devices=2 run (a module fixture) serves several checks.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ddp_test_support import (
    Recorder,
    Regressor,
    loader,
    max_diff,
    preinitialised_worker,
    quiet,
    state,
)

from torchplug import MisconfigurationError, Trainer
from torchplug_ddp import DDPPlugin, WorkerFailedError

TESTS = Path(__file__).parent
EPOCHS = 2
MICRO = 4  # samples per rank per micro-batch; 64 samples → 8 steps per epoch on 2 ranks


def read(out: Path, tag: str, rank: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{tag}-rank{rank}.json").read_text())
    return data


def single_process(batch_size: int, **kwargs: Any) -> dict[str, torch.Tensor]:
    model = Regressor()
    Trainer(**quiet(**{"max_epochs": EPOCHS, **kwargs})).fit(model, loader(batch_size))
    return state(model)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``Trainer(devices=2).fit`` from this process, with logging and checkpoints on."""
    out = tmp_path_factory.mktemp("spawned")
    model = Regressor()
    initial = state(model)
    trainer = Trainer(**quiet(devices=2, max_epochs=EPOCHS, plugins=[Recorder(str(out))], logger=True,
                              enable_checkpointing=True, default_root_dir=str(out)))
    start = time.perf_counter()
    trainer.fit(model, loader(MICRO))
    return {"out": out, "model": model, "initial": initial, "trainer": trainer,
            "seconds": time.perf_counter() - start}


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process_on_the_concatenated_batches(spawned: dict[str, Any]) -> None:
    # DistributedSampler (no shuffle) gives rank r samples r, r+2, ...: each step's two
    # micro-batches together are the next 2*MICRO samples of a single-process loader.
    reference = single_process(batch_size=2 * MICRO)
    trained = state(spawned["model"])  # the parent's model: the weights came back from rank 0
    assert max_diff(trained, spawned["initial"]) > 1e-2
    assert max_diff(trained, reference) < 1e-6
    trainer = spawned["trainer"]
    assert trainer.global_step == EPOCHS * 64 // (2 * MICRO)
    assert trainer.current_epoch == EPOCHS


@pytest.mark.timeout(120)
def test_spawned_ranks_report_through_rank_zero(spawned: dict[str, Any]) -> None:
    out, trainer = spawned["out"], spawned["trainer"]
    ranks = [read(out, "run", r) for r in (0, 1)]
    # Every rank ran the setup hooks in its own process (not this one).
    pids = {r["after_setup_optimizers"]["pid"] for r in ranks}
    assert len(pids) == 2
    assert os.getpid() not in pids
    assert [r["after_setup_optimizers"]["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["launched_copy"] for r in ranks)
    # A DistributedSampler was injected, and set_epoch ran for the last epoch.
    assert all(r["sampler"] == "DistributedSampler" and r["sampler_epoch"] == EPOCHS - 1 for r in ranks)
    assert all(r["model_wrapped"] == "DistributedDataParallel" for r in ranks)
    expected = {"reduce_sum": 3.0, "reduce_mean": 1.5, "broadcast": {"from": 0}, "broadcast_none": None,
                "group": True}
    assert all(r["collectives"] == expected for r in ranks)
    # The parent got rank 0's metrics, not rank 1's.
    assert trainer.callback_metrics == ranks[0]["metrics"]
    assert trainer.callback_metrics["rank"] == 0.0
    assert ranks[1]["metrics"]["rank"] == 1.0
    # Only rank 0 wrote logs and checkpoints.
    assert ranks[0]["is_global_zero"]
    assert not ranks[1]["is_global_zero"]
    assert ranks[0]["csv"]
    assert not ranks[1]["csv"]
    assert ranks[1]["log_dir"] is None
    assert not ranks[1]["progress_enabled"]
    versions = sorted(p.name for p in (out / "torchplug_logs").iterdir())
    assert versions == ["version_0"]
    assert trainer.log_dir == ranks[0]["log_dir"]
    assert trainer.checkpoint_path is not None
    assert Path(trainer.checkpoint_path).is_file()


@pytest.mark.timeout(120)
def test_preinitialised_group_accumulation_syncs_once_per_window(tmp_path: Path) -> None:
    """The test initialises the group itself (as Ray Train does); the plugin starts nothing,
    counts all-reduces with a DDP communication hook, and leaves the group alone."""
    context = multiprocessing.get_context("spawn")
    store = tmp_path / "store"
    procs = [context.Process(target=preinitialised_worker, args=(rank, 2, str(store), str(tmp_path)))
             for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(100)
    assert [p.exitcode for p in procs] == [0, 0]

    for rank, proc in enumerate(procs):
        for tag in ("accumulate", "lightning11"):
            seen = read(tmp_path, tag, rank)
            # fit ran in the process that called it: nothing was spawned.
            assert seen["pid"] == proc.pid
            assert seen["after_setup_optimizers"]["pid"] == proc.pid
            assert seen["children"] == 0
            assert not seen["launched_copy"]
            assert seen["model_wrapped"] == "CountingDDPWrapper"  # the subclass's configure_ddp was used
        assert (tmp_path / f"still-initialised-rank{rank}").read_text() == "True"
        # The wrapper was collected at the end of fit (kept to interpreter exit, a gloo group
        # can abort the process there), although the Trainer and its last run are still alive.
        assert [(tmp_path / f"{tag}-wrapper-alive-rank{rank}").read_text()
                for tag in ("accumulate", "lightning11")] == ["False", "False"]

        # no_sync entered around forward and backward: one all-reduce per window of 4, at its end.
        assert read(tmp_path, "accumulate", rank)["allreduces_per_batch"] == [0, 0, 0, 1] * 2
        # Lightning 1.1 yielded no_sync() without entering it (every micro-batch all-reduced there):
        # torchplug enters the yielded context manager, so the sync is blocked as intended.
        assert read(tmp_path, "lightning11", rank)["allreduces_per_batch"] == [0, 0, 0, 1] * 2

    # 2 ranks x 4 micro-batches of 4 = one step on 32 samples, as in one process without accumulation.
    reference = single_process(batch_size=32, max_epochs=1)
    for tag in ("accumulate", "lightning11"):
        weights = torch.load(tmp_path / f"{tag}-weights.pt")
        assert max_diff(weights, reference) < 1e-6, tag


@pytest.mark.timeout(150)
def test_torchrun_two_nodes_matches_devices_2(spawned: dict[str, Any], tmp_path: Path) -> None:
    # The test hosts the c10d rendezvous store on a port the OS picks (no probe-then-bind);
    # both torchrun "nodes" join it as clients (is_host=false).
    rendezvous = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{rendezvous.port}", "--rdzv-id=torchplug-ddp-test",
        "--rdzv-conf=is_host=false", "--local-addr=127.0.0.1", "--max-restarts=0",
        str(TESTS / "torchrun_script.py"), str(tmp_path), str(EPOCHS), str(MICRO), "2", "cpu",
    ]
    # Output goes to files, so that a node that hangs still leaves its log for the message.
    logs = [tmp_path / f"torchrun-node{i}.log" for i in (0, 1)]
    nodes = []
    for log in logs:
        with log.open("w") as out:
            nodes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))  # killpg below reaches its worker too
    deadline = time.monotonic() + 120
    try:
        for node in nodes:
            node.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(
        f"--- torchrun node {i} (exit code {node.returncode}; -9: killed after 120 s):\n{log.read_text()[-4000:]}"
        for i, (node, log) in enumerate(zip(nodes, logs)))

    ranks = [read(tmp_path, "torchrun", r) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 for r in ranks)
    assert all(r["after_setup_optimizers"]["pid"] == r["pid"] for r in ranks)  # in the torchrun worker itself
    assert all(r["after_setup_optimizers"]["backend"] == "gloo" for r in ranks)
    assert all(not r["launched_copy"] and r["children"] == 0 for r in ranks)
    weights = torch.load(tmp_path / "torchrun-weights.pt")
    assert max_diff(weights, state(spawned["model"])) < 1e-6


@pytest.mark.timeout(90)
def test_a_rank_that_dies_stops_the_run_naming_it(tmp_path: Path) -> None:
    timeout = 20.0
    note = tmp_path / "died-at"
    trainer = Trainer(**quiet(devices=2, plugins=[DDPPlugin(timeout=timeout)]))
    with pytest.raises(WorkerFailedError, match=r"rank 1 .* exited with code 3") as info:
        trainer.fit(Regressor(die_on_rank=1, die_at_step=3, death_note=str(note)), loader(MICRO))
    stopped_after = time.time() - float(note.read_text())
    assert info.value.rank == 1
    assert info.value.exitcode == 3
    assert stopped_after < timeout, stopped_after  # in practice well under a second: gloo sees the peer go
    print(f"the run stopped {stopped_after:.2f} s after rank 1 died:\n{info.value}")


@pytest.mark.timeout(60)
def test_a_python_error_on_a_worker_comes_back_with_its_traceback() -> None:
    """Rank 0 raises; rank 1 then fails in its all-reduce. The cause is reported, the effect
    after it, and the parent's model is untouched."""
    model = Regressor(raise_on_rank=0)
    before = state(model)
    trainer = Trainer(**quiet(devices=2, plugins=[DDPPlugin(timeout=20)]))
    with pytest.raises(WorkerFailedError, match=r"worker rank 0 \(pid \d+\) raised ValueError: boom on rank 0") as info:
        trainer.fit(model, loader(MICRO))
    assert info.value.rank == 0
    assert info.value.exitcode == 1
    assert isinstance(info.value.exception, ValueError)
    assert "Traceback on rank 0" in str(info.value)
    assert "in training_step" in str(info.value)
    assert max_diff(state(model), before) == 0.0


# -- refusals before any process starts ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_static_graph_with_accumulation_is_refused() -> None:
    with pytest.raises(MisconfigurationError, match=r"static_graph=True.*accumulate_grad_batches=2.*143580"):
        Trainer(**quiet(plugins=[DDPPlugin(static_graph=True)], accumulate_grad_batches=2))
    # a schedule that starts accumulating later is refused as well, naming the schedule
    with pytest.raises(MisconfigurationError, match=r"accumulate_grad_batches=\{0: 1, 2: 4\}"):
        Trainer(**quiet(plugins=[DDPPlugin(static_graph=True)], accumulate_grad_batches={0: 1, 2: 4}))
    Trainer(**quiet(plugins=[DDPPlugin(static_graph=True)]))  # fine without accumulation
    Trainer(**quiet(plugins=[DDPPlugin(static_graph=True)], accumulate_grad_batches={0: 1}))


@pytest.mark.timeout(30)
def test_more_cpu_processes_than_cpus_is_refused() -> None:
    cpus = os.cpu_count() or 1
    pattern = rf"DDPPlugin.*devices={cpus + 1}.*os.cpu_count\(\).*devices={cpus}"
    with pytest.raises(MisconfigurationError, match=pattern):
        Trainer(**quiet(devices=cpus + 1))


@pytest.mark.timeout(30)
def test_num_nodes_without_a_launcher_is_refused_at_fit() -> None:
    trainer = Trainer(**quiet(num_nodes=2))
    with pytest.raises(MisconfigurationError, match="torchrun --nnodes=2"):
        trainer.fit(Regressor(), loader(MICRO))


@pytest.mark.timeout(30)
def test_launcher_world_size_must_match_devices_and_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    trainer = Trainer(**quiet(devices=2))
    with pytest.raises(MisconfigurationError, match=r"WORLD_SIZE=3.*devices=2, num_nodes=1"):
        trainer.fit(Regressor(), loader(MICRO))


@pytest.mark.timeout(30)
def test_unknown_ddp_argument_and_unpicklable_data_are_refused() -> None:
    with pytest.raises(MisconfigurationError, match="find_unused_params is not an argument"):
        DDPPlugin(find_unused_params=True)
    data = loader(MICRO)
    data.collate_fn = lambda batch: batch  # not picklable
    trainer = Trainer(**quiet(devices=2))
    with pytest.raises(MisconfigurationError, match=r"pickling failed.*torchrun"):
        trainer.fit(Regressor(), data)


# -- one process -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_entry_point_and_one_process_runs_unwrapped(tmp_path: Path) -> None:
    assert type(Trainer(**quiet(devices=2)).plugin_for("strategy")) is DDPPlugin  # by entry point "ddp"
    model = Regressor()
    Trainer(**quiet(strategy="ddp", devices=1, plugins=[Recorder(str(tmp_path))])).fit(model, loader(8))
    seen = read(tmp_path, "run", 0)
    assert seen["pid"] == os.getpid()
    assert seen["world"] == 1
    assert seen["after_setup_optimizers"]["world"] == 1
    assert seen["model_wrapped"] == "Regressor"  # no one-rank DDP wrapper
    assert seen["collectives"] == {"reduce_sum": 1.0, "reduce_mean": 1.0, "broadcast": {"from": 0},
                                    "broadcast_none": None, "group": False}
    assert not dist.is_initialized()


@pytest.mark.timeout(120)
def test_demo_cli_with_ddp_on_two_devices(tmp_path: Path) -> None:
    pytest.importorskip("torchplug.demo")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    command = [sys.executable, "-m", "torchplug", "demo", "--plugins", "ddp", "--devices", "2", "--max-epochs", "5",
               "--root-dir", str(tmp_path), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["plugins"] == ["ddp"]
    assert summary["devices"] == 2
    assert summary["metrics"]["val_acc"] >= 0.9  # rank 0's metric, averaged over both ranks' shards
    assert summary["val_acc"] >= 0.9  # the parent's model got the trained weights
    assert sorted(p.name for p in (tmp_path / "torchplug_logs").iterdir()) == ["version_0"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.timeout(90)
def test_workers_leave_when_the_launching_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the process that called fit (say, a test runner's timeout) must not leave
    workers behind; here they are started with forkserver, whose server is their parent."""
    launcher = subprocess.Popen([sys.executable, str(TESTS / "orphan_script.py"), str(tmp_path)])
    try:
        notes = [tmp_path / f"pid-rank{rank}" for rank in (0, 1)]
        deadline = time.monotonic() + 60
        while not all(n.exists() and n.read_text() for n in notes):
            assert time.monotonic() < deadline, "the workers never started training"
            assert launcher.poll() is None, "the launcher exited early"
            time.sleep(0.2)
        workers = [int(n.read_text()) for n in notes]
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their launcher"
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; it only waits for its (new) parent to reap it.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")
