"""The node's worker pool on a real Dask cluster (``[workers] backend = "dask"``): a study sent
by dcmtk's ``storescu`` is processed on a Dask worker and delivered to Orthanc exactly once,
also when the Dask worker running it is killed mid-run; the configuration is checked."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qsmnode.node.config import ConfigError, load_settings
from tests.conftest import require_tool
from tests.daskutil import Cluster, start_cluster
from tests.deliveryutil import add_destination, orthanc_series, truth_job, wait_delivered
from tests.nodeutil import Node, make_node, study_uid, wait_for, write_study
from tests.orthanc import Orthanc

SEED = 73
SERIES_COUNTS = {501: 1, 502: 12, 503: 1, 504: 12, 505: 1, 506: 1, 507: 2, 508: 1}
N_DERIVED = sum(SERIES_COUNTS.values())
MARKER_ENV = "QSMNODE_TEST_DASK_MARKER"
JOB = "tests.test_worker_dask:marked_job"


def marked_job(spec: Any) -> dict[str, Any]:
    """The truth job (``tests.deliveryutil.truth_job``), after appending ``<pid> <parent pid>
    <job> <attempt>`` to the file ``$QSMNODE_TEST_DASK_MARKER`` names and, on the first run,
    sleeping 8 s (time for the test to kill the Dask worker running it)."""
    marker = Path(os.environ[MARKER_ENV])
    first = not marker.exists()
    with marker.open("a") as out:
        out.write(f"{os.getpid()} {os.getppid()} {spec.job_id} {spec.attempt}\n")
    if first:
        time.sleep(8)
    return truth_job(spec)


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    marker = tmp_path / "runs.txt"
    yield from ((c, marker) for c in start_cluster(tmp_path, {MARKER_ENV: str(marker)}))


@pytest.mark.slow
def test_a_study_runs_on_the_cluster_and_is_delivered_once_though_its_worker_dies(
        dask_cluster: tuple[Cluster, Path], nodes: list[Node], tmp_path: Path,
        orthanc: Orthanc) -> None:
    require_tool("storescu", "dcmtk")
    cluster, marker = dask_cluster
    source = tmp_path / "source"
    write_study(source, "siemens", SEED)
    node = make_node(nodes, tmp_path / "node", job_function=JOB, sections={
        "tracker": {"quiet_period_s": 1, "max_wait_s": 120},
        "sender": {"retry_initial_s": 0.5, "retry_max_s": 2},
        "workers": {"backend": "dask", "scheduler": cluster.address}})
    orthanc.start()
    add_destination(node, orthanc)
    node.start()
    assert node.storescu("+sd", "+r", source).returncode == 0

    # the attempt's child runs under a Dask worker, not under the node
    first = wait_for(lambda: marker.exists() and marker.read_text().split(), "the first run",
                     90, 0.2, node.log)
    child, parent = int(first[0]), int(first[1])
    [name] = [n for n in cluster.workers if parent in cluster.worker_pids(n)]
    assert child in cluster.worker_pids(name)
    assert parent not in psutil.Process(node.process.pid).children(recursive=True)
    os.killpg(cluster.workers[name].pid, signal.SIGKILL)  # the worker dies mid-run

    (job,) = node.wait_jobs(1, timeout_s=180)
    assert job.state == "done", f"{job.last_error}\n{node.log()[-3000:]}"
    runs = [line.split() for line in marker.read_text().splitlines()]
    assert len(runs) == 2  # Dask ran the task again, on the other worker
    [other] = [n for n in cluster.workers if n != name]
    assert int(runs[1][1]) in cluster.worker_pids(other)
    assert job.attempts == 1  # the lost worker was Dask's to retry, not a failed attempt
    wait_delivered(node, N_DERIVED, 60)
    assert orthanc_series(orthanc) == SERIES_COUNTS  # each object once
    assert {s["MainDicomTags"]["StudyInstanceUID"] for s in orthanc.studies()} == {
        study_uid(SEED)}
    assert "started in Dask task qsmnode-job-1-1" in node.log()


def test_the_dask_backend_needs_a_scheduler(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[workers]\nbackend = "dask"\n')
    with pytest.raises(ConfigError, match=re.escape(
            'workers.scheduler: expected a Dask scheduler address tcp://HOST:PORT with '
            'backend = "dask"')):
        load_settings(path, env={})
    path.write_text('[workers]\nbackend = "dask"\nscheduler = "127.0.0.1:8786"\n')
    with pytest.raises(ConfigError, match=re.escape("workers.scheduler: expected a Dask")):
        load_settings(path, env={})
    path.write_text('[workers]\nbackend = "dask"\nscheduler = "tcp://127.0.0.1:8786"\n')
    assert load_settings(path, env={}).workers.scheduler == "tcp://127.0.0.1:8786"


def test_an_unreachable_scheduler_holds_the_job_without_counting_it(
        nodes: list[Node], tmp_path: Path) -> None:
    """The scheduler is not there: the job goes back to the queue, not failed, and says why."""
    from tests.daskutil import free_port

    require_tool("storescu", "dcmtk")
    source = tmp_path / "source"
    write_study(source, "siemens", SEED)
    address = f"tcp://127.0.0.1:{free_port()}"
    node = make_node(nodes, tmp_path / "node", job_function=JOB, sections={
        "tracker": {"quiet_period_s": 1, "max_wait_s": 120},
        "workers": {"backend": "dask", "scheduler": address}})
    node.start()
    assert node.storescu("+sd", "+r", source).returncode == 0
    wait_for(lambda: f"cannot reach the Dask scheduler at {address}" in node.log(),
             "the pool to say the scheduler is unreachable", 90, 0.5, node.log)
    time.sleep(1.0)
    (job,) = node.read(lambda s: s.jobs(), [])
    assert job.state in ("queued", "running") and job.attempts <= 1, job
    assert f"cannot reach the Dask scheduler at {address}" in (job.last_error or ""), job
