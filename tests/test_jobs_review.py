"""Worker pool edge cases: children stopped from outside, store errors while recording an
outcome, reused attempt folders, and the shutdown of several children.

The children run :func:`review_job` (no pipeline): what it does in each run of a job comes
from ``$QSMNODE_REVIEW_HOOKS`` (see there), so these tests are quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qsmnode.node import worker as worker_module
from qsmnode.node.config import PathsConfig, Settings, WorkersConfig
from qsmnode.node.jobs import DERIVED_DIRNAME, MANIFEST_FILENAME, PROGRESS_FILENAME, JobError
from qsmnode.node.store import InstanceRecord, JobRecord, NewAcquisition, Store
from qsmnode.node.worker import WorkerPool
from tests.nodeutil import wait_for

REVIEW_ENV = "QSMNODE_REVIEW_HOOKS"
JOB_FUNCTION = "tests.test_jobs_review:review_job"
MR = "1.2.840.10008.5.1.4.1.1.4"


def review_job(spec: Any) -> dict[str, Any]:
    """A job function for these tests. ``$QSMNODE_REVIEW_HOOKS`` is ``{"marker_dir": DIR,
    "actions": [...]}``: each run appends ``<pid> <attempt>`` to ``DIR/<job id>`` and does
    the action of its run number (0-based; "ok" past the list): "ok" returns at once,
    "sigterm"/"sigkill" kill this process with that signal, "hang" ignores SIGTERM and sleeps.
    """
    hooks = json.loads(os.environ.get(REVIEW_ENV, "{}"))
    marker = Path(hooks["marker_dir"]) / str(spec.job_id)
    runs = len(marker.read_text().splitlines()) if marker.exists() else 0
    with open(marker, "a") as out:
        out.write(f"{os.getpid()} {spec.attempt}\n")
    actions = hooks.get("actions", [])
    action = actions[runs] if runs < len(actions) else "ok"
    if action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    elif action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    return {"run": runs}


# ------------------------------------------------------------------------------------------------


def _settings(state: Path, **workers: Any) -> Settings:
    return dataclasses.replace(Settings(), paths=PathsConfig(state_dir=state),
                               workers=WorkersConfig(**workers))


def _queue(store: Store, state: Path, n: int) -> int:
    """A job for a one-instance acquisition whose spool file exists; its id."""
    study, series, sop = f"1.2.{n}", f"9.{n}", f"9.{n}.1"
    path = f"spool/{study}/{series}/{sop}.dcm"
    (state / path).parent.mkdir(parents=True, exist_ok=True)
    (state / path).write_bytes(b"not read by review_job")
    store.add_instance(InstanceRecord(
        sop_instance_uid=sop, sop_class_uid=MR, study_uid=study, series_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size=1, calling_ae="SCANNER7T",
        peer_address="127.0.0.1", received_at=1.0))
    store.complete_series(series, 1, "quiet", None, 1.0)
    outcome = store.record_grouping(
        study, 1, [NewAcquisition(study, (series,), {"series_numbers": [1]})], [], 1.0)
    assert outcome is not None and len(outcome.jobs) == 1
    return outcome.jobs[0].id


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path) -> Iterator[Store]:
    with Store.in_state_dir(state) as opened:
        yield opened


def _hooks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, actions: list[str]) -> Path:
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    monkeypatch.setenv(REVIEW_ENV, json.dumps({"marker_dir": str(marker_dir),
                                               "actions": actions}))
    return marker_dir


def _runs(marker_dir: Path, job_id: int) -> list[tuple[int, int]]:
    marker = marker_dir / str(job_id)
    if not marker.exists():
        return []
    return [(int(p), int(a)) for p, a in (line.split() for line in
                                          marker.read_text().splitlines())]


def _settled(store: Store, job_id: int) -> Callable[[], JobRecord | None]:
    def check() -> JobRecord | None:
        job = store.job(job_id)
        return job if job is not None and job.state in ("done", "failed") else None
    return check


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, ended but not reaped by its new parent, does not)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# ------------------------------------------------------------------------------------------------


def _run_until_settled(pool: WorkerPool, store: Store, job_id: int,
                       timeout_s: float = 60.0) -> JobRecord:
    """Run the pool until the job is done or failed; the job as it ended."""
    pool.start()
    try:
        return wait_for(_settled(store, job_id), "the job to end", timeout_s)
    finally:
        pool.stop()


def test_a_child_killed_every_time_fails_after_its_attempts_with_a_plain_reason(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    markers = _hooks(monkeypatch, tmp_path, ["sigkill", "sigkill", "sigkill"])
    job_id = _queue(store, state, 1)
    pool = WorkerPool(_settings(state, job_attempts=2), store, "review:1",
                      job_function=JOB_FUNCTION)
    job = _run_until_settled(pool, store, job_id)
    assert (job.state, job.attempts) == ("failed", 2)
    assert [a for _, a in _runs(markers, job_id)] == [1, 2]  # once per attempt, no more
    assert job.last_error == ("the worker process was killed by SIGKILL (the system may have "
                              "run out of memory; the memory budget is 8192 MiB)")


def test_a_child_stopped_with_sigterm_is_handed_back_without_counting_the_attempt(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``systemctl stop`` (KillMode=control-group) sends SIGTERM to the children too, before
    the pool is told to stop: that is the node stopping, not the job failing."""
    markers = _hooks(monkeypatch, tmp_path, ["sigterm"])
    job_id = _queue(store, state, 1)
    pool = WorkerPool(_settings(state, job_attempts=1), store, "review:1",
                      job_function=JOB_FUNCTION)
    job = _run_until_settled(pool, store, job_id)
    assert (job.state, job.attempts, job.last_error) == ("done", 1, None)
    assert job.result == {"run": 1}
    assert [a for _, a in _runs(markers, job_id)] == [1, 1]


def test_a_child_stopped_with_sigterm_every_time_does_not_run_forever(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    markers = _hooks(monkeypatch, tmp_path, ["sigterm"] * 10)
    job_id = _queue(store, state, 1)
    pool = WorkerPool(_settings(state, job_attempts=2), store, "review:1",
                      job_function=JOB_FUNCTION)
    job = _run_until_settled(pool, store, job_id)
    assert (job.state, job.attempts) == ("failed", 2)
    assert job.last_error == "the worker process was killed by SIGTERM"
    assert len(_runs(markers, job_id)) == 4  # 2 stops not counted, then 2 counted attempts


def test_a_store_error_while_recording_a_result_is_retried(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hooks(monkeypatch, tmp_path, [])
    job_id = _queue(store, state, 1)
    real_finish = store.finish_job
    calls = []

    def flaky_finish(*args: Any, **kwargs: Any) -> bool:
        calls.append(args)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(store, "finish_job", flaky_finish)
    pool = WorkerPool(_settings(state), store, "review:1", job_function=JOB_FUNCTION)
    pool.start()
    try:
        job = wait_for(_settled(store, job_id), "the job to end", 15)
        assert pool.running_jobs == []
    finally:
        pool.stop()
    assert (job.state, job.attempts, job.result) == ("done", 1, {"run": 0})
    assert len(calls) == 2


def test_a_store_error_while_recording_a_failed_start_is_retried(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hooks(monkeypatch, tmp_path, [])
    job_id = _queue(store, state, 1)

    def no_spec(*_args: Any) -> Any:
        raise JobError("1 of 1 spool files of acquisition 1 are missing")

    monkeypatch.setattr(worker_module, "job_spec", no_spec)
    real_fail = store.fail_job_attempt
    calls = []

    def flaky_fail(*args: Any, **kwargs: Any) -> JobRecord | None:
        calls.append(args)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real_fail(*args, **kwargs)

    monkeypatch.setattr(store, "fail_job_attempt", flaky_fail)
    pool = WorkerPool(_settings(state, job_attempts=1), store, "review:1",
                      job_function=JOB_FUNCTION)
    job = _run_until_settled(pool, store, job_id, 15)
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.last_error == "1 of 1 spool files of acquisition 1 are missing"


def test_a_reused_attempt_folder_starts_clean(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown hands a job back without counting the attempt, so its next run uses the
    same attempt folder: what the interrupted run left there must not be taken as results."""
    _hooks(monkeypatch, tmp_path, [])
    job_id = _queue(store, state, 1)
    claimed = store.claim_job("old:1", 60.0, 2.0)
    assert claimed is not None and claimed.attempts == 1
    work = state / "jobs" / str(job_id) / "attempt-1"
    derived = work / DERIVED_DIRNAME
    derived.mkdir(parents=True)
    (derived / "stale.dcm").write_bytes(b"half a file from the interrupted run")
    (derived / MANIFEST_FILENAME).write_text(json.dumps(["stale.dcm"]))
    (work / PROGRESS_FILENAME).write_text(json.dumps({"stage": "qsm"}))
    assert store.release_job(job_id, "old:1", "interrupted by a node shutdown", 3.0)

    pool = WorkerPool(_settings(state, job_attempts=1), store, "review:2",
                      job_function=JOB_FUNCTION)
    job = _run_until_settled(pool, store, job_id)
    assert (job.state, job.attempts, job.last_error) == ("done", 1, None)
    assert store.outbox(job_id=job_id) == []
    assert not (work / PROGRESS_FILENAME).exists()


def _start_hanging(tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch,
                   count: int) -> tuple[WorkerPool, list[int], list[int]]:
    """A pool running ``count`` children that ignore SIGTERM; the job ids and child pids."""
    markers = _hooks(monkeypatch, tmp_path, ["hang"])
    jobs = [_queue(store, state, n) for n in range(1, count + 1)]
    monkeypatch.setattr(worker_module, "_TERMINATE_GRACE_S", 1.0)
    pool = WorkerPool(_settings(state, processes=count), store, "review:1",
                      job_function=JOB_FUNCTION)
    pool.start()
    pids = [wait_for(lambda j=j: _runs(markers, j), f"job {j} to start")[0][0] for j in jobs]
    time.sleep(0.5)  # the children ignore SIGTERM by now
    return pool, jobs, pids


def test_a_shutdown_ends_every_child_within_one_grace_period(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, jobs, pids = _start_hanging(tmp_path, state, store, monkeypatch, 3)
    started = time.monotonic()
    pool.stop()
    elapsed = time.monotonic() - started
    assert not any(_alive(pid) for pid in pids)
    assert elapsed < 2.5, f"stopping 3 children took {elapsed:.1f} s (grace 1 s)"
    for job_id in jobs:
        job = store.job(job_id)
        assert job is not None and (job.state, job.attempts) == ("queued", 0)


def test_a_shutdown_ends_every_child_even_when_the_store_fails(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, _jobs, pids = _start_hanging(tmp_path, state, store, monkeypatch, 2)

    def broken_release(*_args: Any) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "release_job", broken_release)
    try:
        pool.stop()
        assert not any(_alive(pid) for pid in pids)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_child_whose_node_died_exits_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a node crash its jobs run again (counted once): the orphaned child must not go on
    running the same job beside the new attempt."""
    import subprocess
    import sys

    from qsmnode.node.jobs import JobSpec

    markers = _hooks(monkeypatch, tmp_path, ["hang"])
    work = tmp_path / "attempt"
    work.mkdir()
    spec = JobSpec(job_id=7, acquisition_id=1, attempt=1, study_uid="1.2.1",
                   series_uids=("9.1",), files=(), min_echoes=3, require_phase=True,
                   work_dir=str(work))
    (work / "spec.json").write_text(spec.to_json())
    # a stand-in node: starts the child as the pool does, then dies at once (SIGKILL)
    node = (
        "import os, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-m', 'qsmnode.node.worker', '--spec', "
        f"{str(work / 'spec.json')!r}, '--result', {str(work / 'result.json')!r}, "
        f"'--job-function', {JOB_FUNCTION!r}, '--parent-pid', str(os.getpid())], "
        "start_new_session=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", node], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        wait_for(lambda: _runs(markers, 7), "the child to start the job")
        parent.kill()
        parent.wait()
        wait_for(lambda: not _alive(pid), "the orphaned child to exit", 5)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if parent.stdin is not None:
            parent.stdin.close()
    assert not (work / "result.json").exists()
