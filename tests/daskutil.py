"""A real Dask cluster for the tests: a ``dask scheduler`` and two ``dask worker`` processes on
loopback (the ``distributed`` package's own command line, no mock)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

DASK = Path(sys.executable).with_name("dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]]

    def worker_pids(self, name: str) -> set[int]:
        """The pids of a ``dask worker`` command and of every process it started."""
        proc = psutil.Process(self.workers[name].pid)
        return {proc.pid, *(c.pid for c in proc.children(recursive=True))}


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process the test started, with everything it started (its own session)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=20)


def start_cluster(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Start the scheduler and two workers (each one thread), with ``env`` added to their
    environment; yield the cluster; stop everything."""
    if not DASK.exists():
        pytest.fail(f"{DASK} not found: install the distributed package (pyproject.toml)")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    started: list[subprocess.Popen[bytes]] = []
    try:
        scheduler = subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=(logs / "scheduler.log").open("wb"), cwd=REPO,
            env=env, start_new_session=True)
        started.append(scheduler)
        workers = {}
        for name in ("w0", "w1"):
            workers[name] = subprocess.Popen(
                [DASK, "worker", address, "--name", name, "--nthreads", "1", "--nworkers", "1",
                 "--memory-limit", "2GiB", "--no-dashboard"],
                stdout=subprocess.DEVNULL, stderr=(logs / f"{name}.log").open("wb"), cwd=REPO,
                env=env, start_new_session=True)
            started.append(workers[name])
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
        yield Cluster(address, scheduler, workers)
    finally:
        for proc in reversed(started):
            stop(proc)
