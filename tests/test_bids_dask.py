"""The BIDS App on a real Dask cluster: a ``dask scheduler`` and two ``dask worker`` processes
started here on loopback (the ``distributed`` package's own command line, no mock).

- A cohort with a broken subject completes on the cluster: the work runs in the worker
  processes, the broken subject is named and the others are done.
- A worker killed while it runs a task: the cohort still completes, every acquisition once.
- An unreachable scheduler: exit 2 with its address, nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qsmnode.sim.scanner import Simulation, preset, simulate
from tests.bidsutil import write_cohort
from tests.conftest import REPO
from tests.daskutil import DASK, Cluster, free_port, stop

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def sim() -> Simulation:
    return simulate(preset("tiny", seed=4))


def qsm_process(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "qsmnode", "qsm", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


COHORT = {
    "sub-01_ses-1": ("sub-01/ses-1/anat", 0.0),
    "sub-01_ses-2": ("sub-01/ses-2/anat", 1.0),
    "sub-02_acq-fast_run-1": ("sub-02/anat", 2.0),
    "sub-05": ("sub-05/anat", 5.0),
}


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "qsmnode/logs").glob("*.json")}


def test_a_cohort_runs_on_the_cluster_and_names_the_broken_subject(
        cluster: Cluster, sim: Simulation, tmp_path: Path) -> None:
    bids = write_cohort(tmp_path / "bids", sim, dict(list(COHORT.items())[:3]),
                        {"sub-03": ("sub-03/anat", 3.0)})
    run = qsm_process(bids, tmp_path / "out", "participant", "--scheduler", cluster.address)
    stdout, stderr = run.communicate(timeout=400)
    assert run.returncode == 1, stderr
    assert f"on {cluster.address}" in stdout
    assert "3 done, 0 skipped (finished before), 1 failed" in stdout
    assert "error: sub-03: " in stderr and "differs from the first echo's" in stderr
    assert "Traceback" not in stderr
    done = records(tmp_path / "out")
    assert sorted(done) == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_acq-fast_run-1", "sub-03"]
    assert done["sub-03"]["status"] == "failed"
    # the work ran in the workers' processes, not in the command's
    pids = {name: cluster.worker_pids(name) for name in cluster.workers}
    ran_on = {name for record in done.values() for name, ids in pids.items()
              if record["pid"] in ids}
    assert all(any(r["pid"] in ids for ids in pids.values()) for r in done.values())
    assert ran_on == {"w0", "w1"}, "both workers took tasks"
    assert (tmp_path / "out/qsmnode/sub-02/anat/sub-02_acq-fast_run-1_Chimap.nii.gz").is_file()


def test_a_worker_killed_mid_run_and_the_cohort_still_completes_once(
        cluster: Cluster, sim: Simulation, tmp_path: Path) -> None:
    from distributed import Client

    bids = write_cohort(tmp_path / "bids", sim, COHORT)
    run = qsm_process(bids, tmp_path / "out", "participant", "--scheduler", cluster.address)
    killed = None
    with Client(cluster.address, timeout=30) as client:
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and run.poll() is None:
            names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
            busy = [names[addr] for addr, keys in client.processing().items()
                    if addr in names and any(str(k).startswith("qsmnode-") for k in keys)]
            if busy:
                killed = str(busy[0])
                os.killpg(cluster.workers[killed].pid, signal.SIGKILL)
            else:
                time.sleep(0.05)
    assert killed is not None, "no worker was seen running a task"
    stdout, stderr = run.communicate(timeout=400)
    assert run.returncode == 0, stderr
    assert "4 done, 0 skipped (finished before), 0 failed" in stdout
    for name in COHORT:
        assert stdout.count(f"] {name}: done in") == 1, stdout
    done = records(tmp_path / "out")
    assert sorted(done) == sorted(COHORT)
    assert all(r["status"] == "done" for r in done.values())
    survivor = next(n for n in cluster.workers if n != killed)
    assert any(r["pid"] in cluster.worker_pids(survivor) for r in done.values())


def test_an_unreachable_scheduler_is_named(sim: Simulation, tmp_path: Path) -> None:
    bids = write_cohort(tmp_path / "bids", sim, dict(list(COHORT.items())[:1]))
    address = f"tcp://127.0.0.1:{free_port()}"
    run = qsm_process(bids, tmp_path / "out", "participant", "--scheduler", address)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2
    assert f"cannot reach the Dask scheduler at {address}" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_a_scheduler_without_workers_is_named(sim: Simulation, tmp_path: Path) -> None:
    bids = write_cohort(tmp_path / "bids", sim, dict(list(COHORT.items())[:1]))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        run = qsm_process(bids, tmp_path / "out", "participant", "--scheduler", address,
                          "--wait-for-workers", "3")
        _, stderr = run.communicate(timeout=120)
    finally:
        stop(scheduler)
    assert run.returncode == 2
    assert f"the Dask scheduler at {address} has no workers (none joined within 3 s)" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("preset_threads", [None, "1"])
def test_the_embedded_clusters_workers_share_the_cores_for_their_ffts(
        preset_threads: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from qsmnode.bids.cluster import dask_client, default_workers

    if preset_threads is None:
        monkeypatch.delenv("QSMNODE_FFT_WORKERS", raising=False)
    else:
        monkeypatch.setenv("QSMNODE_FFT_WORKERS", preset_threads)
    cores = default_workers(10**6)
    expected = int(preset_threads) if preset_threads else max(1, cores // 2)

    def fft_workers() -> tuple[str, int]:
        from qsmnode.qsm.dipole import FFT_WORKERS

        return os.environ.get("QSMNODE_FFT_WORKERS", ""), FFT_WORKERS

    with dask_client(None, 2, "1GiB") as client:
        seen = client.run(fft_workers)
    assert len(seen) == 2
    assert set(seen.values()) == {(str(expected), expected)}
