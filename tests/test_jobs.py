"""Jobs: the store's lease life cycle, the job function on spool files, and the worker pool's
child processes (success, crash, out of memory, lease timeout, shutdown); then the pool's edge
cases with a scripted job function (children stopped from outside, store errors while
recording an outcome, reused attempt folders, the shutdown of several children)."""

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

import numpy as np
import pytest

from qsmnode.node import worker as worker_module
from qsmnode.node.config import PathsConfig, Settings, WorkersConfig
from qsmnode.node.jobs import (
    DERIVED_DIRNAME,
    MANIFEST_FILENAME,
    PROGRESS_FILENAME,
    JobError,
    JobSpec,
    execute_job,
    job_spec,
)
from qsmnode.node.store import (
    SCHEMA_VERSION,
    InstanceRecord,
    JobRecord,
    NewAcquisition,
    NewProblem,
    Store,
)
from qsmnode.node.tracker import Tracker
from qsmnode.node.worker import WorkerPool
from qsmnode.node.worker_child import limit_memory, resolve_job_function
from qsmnode.pipeline import PipelineParams, run_pipeline
from tests.nodeutil import (
    HOOKS_ENV,
    MR,
    SCRIPT_ENV,
    Clock,
    add,
    ingest,
    settings_for,
    study_uid,
    wait_for,
    write_qsm_study,
    write_study,
)


def _queue(store: Store, study: str, series: str, at: float = 1.0) -> int:
    """Record an acquisition of one series (with one instance) and return its job id."""
    add(store, f"{series}.1", series, at, study=study)
    store.complete_series(series, 1, "quiet", None, at)
    outcome = store.record_grouping(
        study, 1, [NewAcquisition(study, (series,), {"series_numbers": [1]})], [], at)
    assert outcome is not None and len(outcome.jobs) == 1
    return outcome.jobs[0].id


def test_job_leases_attempts_and_recovery(tmp_path: Path) -> None:
    with Store.in_state_dir(tmp_path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        job_id = _queue(store, "1.2.1", "9.1")
        other = _queue(store, "1.2.2", "9.2")

        claimed = store.claim_job("node-a:1", 60.0, 100.0)
        assert claimed is not None and claimed.id == job_id
        assert (claimed.state, claimed.attempts, claimed.lease_owner,
                claimed.lease_expires_at) == ("running", 1, "node-a:1", 160.0)
        assert not store.finish_job(job_id, "node-b:2", {}, 101.0)  # not the lease owner
        after = store.fail_job_attempt(job_id, "node-a:1", "boom", 3, 102.0)
        assert after is not None and (after.state, after.attempts, after.last_error) == (
            "queued", 1, "boom")

        # a crash of node a while attempt 2 runs: re-queued once by the next node
        assert store.claim_job("node-a:1", 60.0, 103.0).attempts == 2  # type: ignore[union-attr]
        [requeued] = store.requeue_orphaned_jobs("node-c:3", 3, 110.0)
        assert (requeued.state, requeued.attempts, requeued.lease_owner) == ("queued", 2, None)
        assert requeued.last_error == ("interrupted: the node stopped while attempt 2 was "
                                       "running (lease owner node-a:1)")
        assert store.requeue_orphaned_jobs("node-c:3", 3, 111.0) == []  # exactly once

        # a clean shutdown hands the job back without counting the attempt
        assert store.claim_job("node-c:3", 60.0, 112.0).id == job_id  # type: ignore[union-attr]
        assert store.release_job(job_id, "node-c:3", "interrupted by a node shutdown", 113.0)
        assert store.job(job_id).attempts == 2  # type: ignore[union-attr]

        # the last attempt fails: failed, with the last error
        assert store.claim_job("node-c:3", 60.0, 114.0).attempts == 3  # type: ignore[union-attr]
        final = store.fail_job_attempt(job_id, "node-c:3", "still broken", 3, 115.0)
        assert final is not None and (final.state, final.finished_at) == ("failed", 115.0)
        assert store.claim_job("node-c:3", 60.0, 116.0).id == other  # type: ignore[union-attr]
        assert store.finish_job(other, "node-c:3", {"answer": 42}, 117.0)
        done = store.job(other)
        assert done is not None and done.state == "done" and done.result == {"answer": 42}
        assert store.claim_job("node-c:3", 60.0, 118.0) is None
        # a crash during the last attempt fails the job instead of re-queueing it
        third = _queue(store, "1.2.3", "9.3")
        for attempt in range(3):
            store.claim_job("node-d:4", 60.0, 120.0 + attempt)
            if attempt < 2:
                store.fail_job_attempt(third, "node-d:4", "flaky", 3, 120.5 + attempt)
        [gone] = store.requeue_orphaned_jobs("node-e:5", 3, 130.0)
        assert gone.state == "failed" and gone.attempts == 3
        assert store.counts()["jobs"] == {"queued": 0, "running": 0, "done": 1, "failed": 2}


def test_a_crash_after_the_last_attempt_ended_well_runs_it_again(tmp_path: Path) -> None:
    """The node died after the child's ok result, before the hand-over to the outbox: the
    results were not lost to the job's fault, so the attempt does not count (the worker writes
    the result file; ``attempt_ended_well`` reads it)."""
    from qsmnode.node.jobs import attempt_dir
    from qsmnode.node.worker import RESULT_FILENAME, attempt_ended_well

    with Store.in_state_dir(tmp_path) as store:
        job_id = _queue(store, "1.2.1", "9.1")
        for attempt in range(3):
            store.claim_job("node-a:1", 60.0, 100.0 + attempt)
            if attempt < 2:
                store.fail_job_attempt(job_id, "node-a:1", "flaky", 3, 100.5 + attempt)
        work = attempt_dir(tmp_path, job_id, 3)
        work.mkdir(parents=True)
        (work / RESULT_FILENAME).write_text('{"ok": true, "result": {}}')
        assert attempt_ended_well(tmp_path, job_id, 3)
        assert not attempt_ended_well(tmp_path, job_id, 2)
        [again] = store.requeue_orphaned_jobs(
            "node-b:2", 3, 110.0,
            finished=lambda job, attempt: attempt_ended_well(tmp_path, job, attempt))
        assert (again.state, again.attempts) == ("queued", 2)
        assert "ended well, before its results were handed over" in (again.last_error or "")
        # the next claim reruns attempt 3 (its folder is emptied before the run)
        assert store.claim_job("node-b:2", 60.0, 111.0).attempts == 3  # type: ignore[union-attr]


def test_recorded_problems_are_kept_once(tmp_path: Path) -> None:
    with Store.in_state_dir(tmp_path) as store:
        add(store, "1.1", "9.1", 1.0, study="1.2.1")
        store.complete_series("9.1", 1, "quiet", None, 1.0)
        problem = NewProblem("1.2.1", ("9.1",), "series 1: no phase")
        first = store.record_grouping("1.2.1", 1, [], [problem], 2.0)
        assert first is not None and len(first.new_problems) == 1
        again = store.record_grouping("1.2.1", 1, [], [problem], 3.0)
        assert again is not None and not again.new_problems and not again.resolved_problems
        assert store.record_grouping("1.2.1", 2, [], [], 4.0) is None  # stale count
        add(store, "1.2", "9.2", 5.0, study="1.2.1")  # a new open series of the study
        assert store.record_grouping("1.2.1", 2, [], [], 5.0) is None
        assert len(store.problems()) == 1


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Four simulated studies in a spool, grouped: four queued jobs (one per study)."""
    root = tmp_path_factory.mktemp("queued")
    files = {seed: write_study(root / "in" / str(seed), style, seed)
             for seed, style in ((61, "siemens"), (62, "philips"), (63, "enhanced"),
                                 (64, "siemens-xa"))}
    return {"root": root, "files": files}


def _state(tmp_path: Path, queued: dict[str, object],
           seeds: tuple[int, ...] = (61, 62, 63, 64)) -> Path:
    """A state directory with the studies of ``seeds`` received and grouped: a queued job
    each, in the order of ``seeds``."""
    state = tmp_path / "state"
    files: dict[int, list[Path]] = queued["files"]  # type: ignore[assignment]
    with Store.in_state_dir(state) as store:
        for n, seed in enumerate(seeds):
            ingest(state, store, files[seed], 1_000.0 + n)
        Tracker(settings_for(state), store, clock=Clock(2_000.0)).poll()
        assert len(store.jobs("queued")) == len(seeds)
    return state


def test_the_job_function_loads_the_acquisition_from_the_spool(
    tmp_path: Path, queued: dict[str, object]
) -> None:
    state = _state(tmp_path, queued)
    settings = settings_for(state)
    with Store.in_state_dir(state) as store:
        job = store.claim_job("test:1", 60.0, 2_001.0)
        assert job is not None
        spec = job_spec(store, job, settings)
        acquisition = store.acquisition(job.acquisition_id)
    assert spec.attempt == 1 and len(spec.files) == 72
    assert spec.work_dir == str(state / "jobs" / str(job.id) / "attempt-1")
    result = execute_job(spec)
    summary = result["acquisition"]
    assert acquisition is not None
    assert summary["shape"] == acquisition.summary["shape"] == [24, 28, 12]
    assert summary["echo_times_s"] == pytest.approx(acquisition.summary["echo_times_s"])
    assert np.allclose(summary["affine"], acquisition.summary["affine"])
    assert summary["has_phase"] and np.float32(-np.pi) <= summary["phase_range"][0] < 0
    assert result["stages"][0]["name"] == "check" and result["derived_objects"] == 0
    assert json.loads(json.dumps(result)) == result

    # files that no longer make the acquisition: a plain-language error
    broken = dataclasses.replace(spec, files=spec.files[1:])
    with pytest.raises(JobError, match=r"no longer make this acquisition: .*missing"):
        execute_job(broken)


def test_the_job_loads_the_trackers_plan_and_an_older_acquisition_is_grouped_again(
    tmp_path: Path, queued: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job carries the plan the tracker made (absolute paths) and loads it without
    summarizing or grouping the files again; a file that changed since fails it, naming the
    change. An acquisition recorded before plans were kept (a version 6 store, migrated) has
    none: its job groups the files again, as before."""
    import pydicom

    import qsmnode.dicom.load as load_module
    from qsmnode.node.jobs import load_job_acquisition
    from qsmnode.node.store import STORE_FILENAME

    state = _state(tmp_path, queued, (63, 61))
    settings = settings_for(state)
    with Store.in_state_dir(state) as store:
        jobs = store.jobs("queued")
        enhanced, classic = (job_spec(store, job, settings) for job in jobs)
    for spec in (enhanced, classic):
        assert spec.plan is not None and JobSpec.from_json(spec.to_json()) == spec
        paths = {row["path"] for row in spec.plan["instances"]}
        assert paths == set(spec.files) and all(Path(p).is_absolute() for p in paths)

    def no_grouping(*args: object, **kwargs: object) -> None:
        raise AssertionError("grouped again")

    with monkeypatch.context() as patch:
        patch.setattr(load_module, "group_acquisitions", no_grouping)
        patch.setattr(load_module, "summarize_files", no_grouping)
        for spec in (enhanced, classic):
            loaded = load_job_acquisition(spec)
            assert loaded.series_uids == spec.series_uids and loaded.gre.shape == (24, 28, 12)

    # a classic magnitude image whose echo time changed in the spool
    ds = pydicom.dcmread(classic.files[0])
    ds.EchoTime = "99"
    ds.save_as(classic.files[0])
    with pytest.raises(JobError, match=r"^the spool files no longer make this acquisition: "
                                       r"series 5, 6: .*changed since it was grouped: TE 99 ms "
                                       r"\(grouped with TE [0-9.]+ ms\)$"):
        load_job_acquisition(classic)
    (Path(classic.files[1])).write_bytes(b"not DICOM")
    with pytest.raises(JobError, match=r"^only 71 of 72 spool files could be read$"):
        load_job_acquisition(classic)

    # the store of the previous schema: the plan column dropped, the version set back
    db = sqlite3.connect(state / STORE_FILENAME, isolation_level=None)
    db.execute("ALTER TABLE acquisitions DROP COLUMN plan")
    db.execute("PRAGMA user_version = 6")
    db.close()
    with Store.in_state_dir(state, readonly=True) as old:
        assert old.acquisition_plan(jobs[0].acquisition_id) is None
    with Store.in_state_dir(state) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.acquisition_plan(jobs[0].acquisition_id) is None
        old_spec = job_spec(store, jobs[0], settings)
    assert old_spec.plan is None and old_spec.files == enhanced.files
    with monkeypatch.context() as patch:
        patch.setattr(load_module, "load_acquisition", no_grouping)  # not the plan's loader
        with pytest.raises(AssertionError, match="grouped again"):
            load_job_acquisition(dataclasses.replace(enhanced, plan=None))
    loaded = load_job_acquisition(old_spec)
    assert loaded.series_uids == enhanced.series_uids and loaded.gre.shape == (24, 28, 12)


def test_run_pipeline_checks_what_it_is_given(tmp_path: Path) -> None:
    """The pipeline's record of what it ran on (an Enhanced MR study on the grid the node
    tests run the real QSM on: on the 7 mm toy grid the χ map is refused as flat)."""
    from qsmnode.dicom.load import load_folder

    [loaded] = load_folder(write_qsm_study(tmp_path / "in", "enhanced", 63)[0].parent)
    result = run_pipeline(loaded, PipelineParams())  # type: ignore[arg-type]
    assert result.acquisition.vendor == "philips" and result.acquisition.n_echoes == 3
    assert result.acquisition.b0_direction == pytest.approx(
        tuple(loaded.gre.b0_direction))  # type: ignore[union-attr]


def test_resolve_job_function() -> None:
    assert resolve_job_function("qsmnode.node.jobs:execute_job") is execute_job
    with pytest.raises(ValueError, match="expected module:function"):
        resolve_job_function("qsmnode.node.jobs")


def _pool(state: Path, **workers: object) -> tuple[Store, WorkerPool]:
    settings = dataclasses.replace(settings_for(state),
                                   workers=WorkersConfig(**workers))  # type: ignore[arg-type]
    store = Store.in_state_dir(state)
    return store, WorkerPool(settings, store, "test-node:1",
                             job_function="tests.nodeutil:hooked_job")


def _run_until_settled(store: Store, pool: WorkerPool) -> dict[str, JobRecord]:
    """Run the pool until every job is done or failed; the jobs by study UID."""
    try:
        pool.start()
        jobs = wait_for(
            lambda: (lambda js: js if all(j.state in ("done", "failed") for j in js) else None)(
                store.jobs()),
            "every job to end", 120)
    finally:
        pool.stop()
    return {store.acquisition(j.acquisition_id).study_uid: j  # type: ignore[union-attr]
            for j in jobs}


def test_worker_children_succeed_crash_and_run_out_of_memory(
    tmp_path: Path, queued: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash uses every attempt; a job that needs more than its memory budget fails after
    one (it would need as much again), naming the budget and the key to raise."""
    state = _state(tmp_path, queued, (61, 62, 63))
    marker, memory_marker = tmp_path / "marker", tmp_path / "memory-marker"
    monkeypatch.setenv(HOOKS_ENV, json.dumps({
        study_uid(62): {"exit": 9, "marker": str(marker)},
        study_uid(63): {"allocate_mb": 1024, "marker": str(memory_marker)},
    }))
    store, pool = _pool(state, processes=2, memory_budget_mb=256, job_attempts=2)
    with store:
        by_study = _run_until_settled(store, pool)
    ok, crash, memory = (by_study[study_uid(seed)] for seed in (61, 62, 63))
    assert (ok.state, ok.attempts, ok.last_error) == ("done", 1, None)
    assert ok.result is not None and ok.result["acquisition"]["n_echoes"] == 3
    assert (crash.state, crash.attempts) == ("failed", 2)
    assert crash.last_error == "the worker process exited with status 9 without a result"
    assert len(marker.read_text().splitlines()) == 2  # one line per attempt
    assert (memory.state, memory.attempts) == ("failed", 1)
    assert len(memory_marker.read_text().splitlines()) == 1
    assert memory.last_error is not None and memory.last_error.startswith(
        "out of memory: the job needed more than the memory budget of 256 MiB "
        "(workers.memory_budget_mb)")
    assert memory.last_error.endswith(
        "not retried: raise workers.memory_budget_mb, then retry the job")
    assert (state / "jobs" / str(ok.id) / "attempt-1" / "result.json").is_file()


def test_an_error_from_the_input_fails_the_job_once_and_a_crash_is_retried(
    tmp_path: Path, queued: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Study 61: a phase image's echo time changed in the spool (the files no longer make the
    acquisition): failed after one attempt, with a reason naming the series. Study 64: the job
    function raises a ValueError: one attempt. Study 62: a crash: every attempt is used."""
    import pydicom

    state = _state(tmp_path, queued, (61, 62, 64))
    for path in sorted((state / "spool").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ds.StudyInstanceUID == study_uid(61) and "P" in ds.ImageType:
            ds.EchoTime = "99"
            ds.save_as(path)
            break
    monkeypatch.setenv(HOOKS_ENV, json.dumps({
        study_uid(62): {"exit": 9},
        study_uid(64): {"raise": "a value this job cannot use"},
    }))
    store, pool = _pool(state, processes=2, job_attempts=3)
    with store:
        by_study = _run_until_settled(store, pool)
    changed, crash, raised = (by_study[study_uid(seed)] for seed in (61, 62, 64))
    assert (changed.state, changed.attempts) == ("failed", 1)
    assert changed.last_error is not None
    assert changed.last_error.startswith("the spool files no longer make this acquisition")
    assert "series 5, 6" in changed.last_error and "TE 99 ms" in changed.last_error
    assert (raised.state, raised.attempts) == ("failed", 1)
    assert raised.last_error == ("the job function failed: ValueError: a value this job "
                                 "cannot use")
    assert (crash.state, crash.attempts) == ("failed", 3)


def test_an_exception_from_the_input_becomes_a_reason_naming_series_and_attribute(
    tmp_path: Path,
) -> None:
    """A header the builders cannot use (pydicom's own AttributeError for a missing
    attribute): the reason names the series, the stage and the attribute, and is final."""
    import pydicom

    from qsmnode.node.jobs import JobSpec, input_error

    try:
        pydicom.Dataset().AccessionNumber  # noqa: B018
    except AttributeError as exc:
        error = input_error(
            JobSpec(1, 1, 1, "1.2", ("1.2.5",), (), 2, True, str(tmp_path)),
            type("Loaded", (), {"series_numbers": (5, 6)})(), "derived", exc)
    assert not error.transient
    assert str(error).startswith("series 5, 6: derived DICOM failed: the source images lack "
                                 "the attribute AccessionNumber (AttributeError: ")
    assert str(error).endswith("not retried, the same input would fail the same way")
    unloaded = input_error(JobSpec(1, 1, 1, "1.2", ("1.2.5",), (), 2, True, str(tmp_path)),
                           None, "load", ValueError("bad"))
    assert str(unloaded).startswith("series UID 1.2.5: loading failed: the input could not "
                                    "be handled (ValueError: bad)")


def test_a_job_past_its_lease_is_killed(
    tmp_path: Path, queued: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state(tmp_path, queued, (64,))
    monkeypatch.setenv(HOOKS_ENV, json.dumps({study_uid(64): {"delay_s": 60}}))
    store, pool = _pool(state, job_attempts=1, lease_s=2.0)
    with store:
        [slow] = _run_until_settled(store, pool).values()
    assert (slow.state, slow.attempts) == ("failed", 1)
    assert slow.last_error == ("timed out: still running after workers.lease_s (2 s); the "
                               "worker was killed")


def test_a_stopping_pool_hands_its_running_job_back(
    tmp_path: Path, queued: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state(tmp_path, queued, (61,))
    marker = tmp_path / "marker"
    monkeypatch.setenv(HOOKS_ENV, json.dumps({
        study_uid(61): {"delay_s": 60, "marker": str(marker)},
    }))
    store, pool = _pool(state, processes=1)
    try:
        pool.start()
        wait_for(marker.exists, "the first job to start", 60)
        pid = int(marker.read_text().split()[0])
        started = time.monotonic()
        pool.stop()
        assert time.monotonic() - started < 10
        first = store.jobs()[0]
        assert (first.state, first.attempts, first.lease_owner) == ("queued", 0, None)
        assert first.last_error == "interrupted by a node shutdown; queued again"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        store.close()


def test_limit_memory_caps_the_address_space() -> None:
    import resource
    import subprocess
    import sys

    code = (
        "import numpy as np, resource\n"
        "from qsmnode.node.worker_child import limit_memory\n"
        "limit = limit_memory(64)\n"
        "assert resource.getrlimit(resource.RLIMIT_AS)[0] == limit\n"
        "try:\n"
        "    np.ones(512 * 2**20 // 8)\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "MemoryError", done.stderr
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # not us
    assert limit_memory  # imported for the child above


def test_a_version_1_store_is_migrated_and_still_readable(tmp_path: Path) -> None:
    import sqlite3

    from qsmnode.node.store import MIGRATIONS, STORE_FILENAME

    db = sqlite3.connect(tmp_path / STORE_FILENAME)
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    db.execute("INSERT INTO series (series_uid, study_uid, sop_class_uid, first_received_at, "
               "last_received_at) VALUES ('9.1', '1.2.1', '1.2.840.10008.5.1.4.1.1.4', 1, 2)")
    db.commit()
    db.close()
    with Store.in_state_dir(tmp_path, readonly=True) as old:  # a status beside an old node
        assert old.schema_version() == 1
        assert [s.series_uid for s in old.series()] == ["9.1"]
        assert old.counts()["jobs"] == {}
    with Store.in_state_dir(tmp_path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        [series] = store.series()
        assert (series.state, series.opened_at, series.completion) == ("open", None, None)
        assert store.acquisitions() == [] and store.jobs() == [] and store.problems() == []


def test_qsmnode_retry_runs_failed_jobs_again_from_the_spool(
    tmp_path: Path, queued: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``qsmnode retry``: a failed job runs again from the spool with its attempts reset (by
    job, study or all failed); a job whose images are gone is not queued, and says why."""
    import subprocess
    import sys

    from tests.conftest import REPO

    state = _state(tmp_path, queued, (61, 64))
    config = tmp_path / "qsmnode.toml"
    config.write_text(f'[paths]\nstate_dir = "{state}"\n')

    def retry(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qsmnode", "retry", *args, "--config",
                               str(config)], capture_output=True, text=True, timeout=60,
                              cwd=REPO)

    monkeypatch.setenv(HOOKS_ENV, json.dumps({
        study_uid(seed): {"raise": "the disk was gone"} for seed in (61, 64)}))
    store, pool = _pool(state, processes=1, job_attempts=1)
    with store:
        first = _run_until_settled(store, pool)
    assert {j.state for j in first.values()} == {"failed"}
    kept, gone = first[study_uid(61)], first[study_uid(64)]

    # the images of one job are gone (retention, a hand): that one cannot run again
    next(iter(sorted((state / "spool" / study_uid(64)).rglob("*.dcm")))).unlink()
    everything = retry("--all-failed")
    assert everything.returncode == 1
    assert f"job {gone.id} is not queued again: 1 of its 72 images are no longer" in (
        everything.stderr)
    assert f"job {kept.id} queued again" in everything.stdout
    assert retry("--job", str(kept.id)).returncode == 1  # queued now, not failed
    assert "not a failed job: it is queued" in retry("--job", str(kept.id)).stderr
    assert retry("--study", study_uid(64)).returncode == 1
    assert retry("--study", "1.2.3").returncode == 1

    monkeypatch.setenv(HOOKS_ENV, "{}")  # the cause is gone
    store, pool = _pool(state, processes=1, job_attempts=1)
    with store:
        again = _run_until_settled(store, pool)
    assert (again[study_uid(61)].state, again[study_uid(61)].attempts) == ("done", 1)
    assert again[study_uid(64)].state == "failed"


def test_a_full_disk_holds_the_job_until_space_returns_without_using_its_attempts(
    tmp_path: Path, queued: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the child (the disk filled during processing): the job is handed back, not
    failed, and the pool starts nothing until space has come back; then it runs and succeeds,
    with its single attempt unused by the full disk."""
    state = _state(tmp_path, queued, (61,))
    full, marker = tmp_path / "disk-full", tmp_path / "marker"
    full.touch()
    monkeypatch.setenv(HOOKS_ENV, json.dumps({
        study_uid(61): {"enospc_while": str(full), "marker": str(marker)}}))
    space = {"free": 0}
    settings = dataclasses.replace(settings_for(state), workers=WorkersConfig(
        processes=1, job_attempts=1))
    with Store.in_state_dir(state) as store:
        pool = WorkerPool(settings, store, "test-node:1", job_function="tests.nodeutil:hooked_job",
                          disk_space=lambda: (space["free"], 8 << 30))
        pool.start()
        try:
            [job] = wait_for(
                lambda: [j for j in store.jobs("queued")
                         if j.last_error and "the disk is full" in j.last_error] or None,
                "the job handed back for the full disk", 120)
            assert job.attempts == 0 and "No space left on device" in (job.last_error or "")
            full.unlink()  # space comes back
            space["free"] = 4 << 30  # above the floor (min_free_disk_mb, 1 GiB) and more
            [done] = wait_for(lambda: store.jobs("done") or None, "the job to run again", 120)
        finally:
            pool.stop()
    assert done.attempts == 1
    assert len(marker.read_text().splitlines()) == 2  # nothing started while the disk was full


CANARIES = {
    "PatientName": "Canaryname^Kestrel=CANARYIDEO",
    "PatientID": "CANARYID77",
    "PatientBirthDate": "1970-01-01",  # not DICOM DA: a malformed value
    "OtherPatientIDs": ["CANARYOTHER1", "CANARYOTHER2"],
    "AccessionNumber": "CANARYACC",
    "StudyID": "CANARYSTUDY",
    "StudyDescription": "Canary study\nwith a forged line",
    "ReferringPhysicianName": "Canarydoc^Finch",
    "InstitutionName": "Canary Institute",
    "PatientComments": "canarycomment",
}


def copies_with(paths: list[Path], values: dict[str, object], out: Path) -> list[Path]:
    """Copies of the files in ``out`` with ``values`` (keyword → value) set in each."""
    import pydicom

    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        copy = out / f"{len(copies)}.dcm"
        ds.save_as(copy)
        copies.append(copy)
    return copies


def test_error_text_never_quotes_the_patients_values(
    tmp_path: Path, queued: dict[str, object], monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Canaries in every patient-level attribute (a malformed birth date among them): a job
    whose library error and log line quote them records and logs neither."""

    files: dict[int, list[Path]] = queued["files"]  # type: ignore[assignment]
    copies = copies_with(files[61], CANARIES, tmp_path / "in")
    state = _state(tmp_path, {"files": {61: copies}}, (61,))
    monkeypatch.setenv(HOOKS_ENV, json.dumps({study_uid(61): {"raise_quoting": list(CANARIES)}}))
    store, pool = _pool(state, processes=1, job_attempts=1)
    with store:
        [job] = _run_until_settled(store, pool).values()
    logged = capfd.readouterr().err
    assert job.state == "failed" and job.last_error is not None
    assert "Unable to convert '<PatientName>', '<PatientID>', '<PatientBirthDate>'" in (
        job.last_error)
    assert "cannot use '<PatientName>'" in logged  # the child's log line, redacted
    for text in (job.last_error, logged):
        for fragment in ("anary", "ANARY", "1970-01-01", "Kestrel", "Finch"):
            assert fragment not in text, (fragment, text)


def test_malformed_header_dates_are_found_before_qsm_and_emptied_in_the_derived_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Dates and times in the DICOM format that are not real ones (month 13, hour 25) made
    highdicom raise while building the derived objects, after QSM: the job failed then. They
    are found when the job starts, before QSM, logged by attribute (never by value), and left
    empty in the derived objects: the job succeeds."""
    import logging

    import pydicom

    import qsmnode.pipeline
    from tests.nodeutil import write_qsm_study

    bad = {"PatientBirthDate": "19701301", "StudyDate": "20221340", "StudyTime": "250000"}
    # the real QSM runs (and its plausibility gate): the grid it gives a real χ map on
    source = write_qsm_study(tmp_path / "source", "siemens", 61)
    copies = copies_with(source, bad, tmp_path / "in")
    state = _state(tmp_path, {"files": {61: copies}}, (61,))
    settings = dataclasses.replace(settings_for(state), pipeline=dataclasses.replace(
        settings_for(state).pipeline, qsm=True, m1=False))
    with Store.in_state_dir(state) as store:
        job = store.claim_job("test:1", 600.0, 2_001.0)
        assert job is not None
        spec = job_spec(store, job, settings)
    real_run_pipeline = qsmnode.pipeline.run_pipeline
    logged_before_qsm = []

    def run_pipeline(*args: Any, **kwargs: Any) -> Any:
        logged_before_qsm.append(caplog.text)
        return real_run_pipeline(*args, **kwargs)

    monkeypatch.setattr(qsmnode.pipeline, "run_pipeline", run_pipeline)
    with caplog.at_level(logging.INFO):
        result = execute_job(spec)
    assert result["derived_objects"] > 0
    [before] = logged_before_qsm
    for keyword in bad:
        assert f"{keyword} not a valid value (left empty)" in before
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("qsmnode"))
    assert "series 5, 6: the derived objects will not copy the source header as it is" in ours
    for value in bad.values():
        assert value not in ours
    derived = json.loads((spec.derived_dir / MANIFEST_FILENAME).read_text())
    assert len(derived) == result["derived_objects"]
    for name in derived:
        ds = pydicom.dcmread(spec.derived_dir / name, stop_before_pixels=True)
        assert [ds.get(k) for k in bad] == ["", "", ""], name


# ================================================================================================
# worker pool edge cases: children stopped from outside, store errors while recording an
# outcome, reused attempt folders, and the shutdown of several children. The children run
# tests.nodeutil.scripted_job (no pipeline): what it does in each run of a job comes from
# $QSMNODE_TEST_SCRIPT, so these tests are quick.

SCRIPTED_JOB = "tests.nodeutil:scripted_job"


def _pool_settings(state: Path, **workers: Any) -> Settings:
    return dataclasses.replace(Settings(), paths=PathsConfig(state_dir=state),
                               workers=WorkersConfig(**workers))


def _queue_spooled(store: Store, state: Path, n: int) -> int:
    """A job for a one-instance acquisition whose spool file exists; its id."""
    study, series, sop = f"1.2.{n}", f"9.{n}", f"9.{n}.1"
    path = f"spool/{study}/{series}/{sop}.dcm"
    (state / path).parent.mkdir(parents=True, exist_ok=True)
    (state / path).write_bytes(b"not read by scripted_job")
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


def _script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
            actions: list[str] | dict[str, list[str]]) -> Path:
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    monkeypatch.setenv(SCRIPT_ENV, json.dumps({"marker_dir": str(marker_dir),
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


def _run_job_until_settled(pool: WorkerPool, store: Store, job_id: int,
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
    markers = _script(monkeypatch, tmp_path, ["sigkill", "sigkill", "sigkill"])
    job_id = _queue_spooled(store, state, 1)
    pool = WorkerPool(_pool_settings(state, job_attempts=2), store, "test-node:1",
                      job_function=SCRIPTED_JOB)
    job = _run_job_until_settled(pool, store, job_id)
    assert (job.state, job.attempts) == ("failed", 2)
    assert [a for _, a in _runs(markers, job_id)] == [1, 2]  # once per attempt, no more
    assert job.last_error == ("the worker process was killed by SIGKILL (the system may have "
                              "run out of memory; the memory budget is 8192 MiB)")


def test_a_child_killed_while_another_job_ran_runs_again_alone_without_using_an_attempt(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGKILL (the OOM killer) while another job ran: the machine's memory, not the job's
    fault. The job is handed back uncounted and runs again only once it can run alone (job 3,
    queued behind it, waits too); then it succeeds with its single attempt."""
    first, beside, behind = (_queue_spooled(store, state, n) for n in (1, 2, 3))
    markers = _script(monkeypatch, tmp_path, {str(first): ["sigkill:1"],
                                              str(beside): ["sleep:3"]})
    pool = WorkerPool(_pool_settings(state, processes=2, job_attempts=1), store, "test-node:1",
                      job_function=SCRIPTED_JOB)
    pool.start()
    try:
        jobs = [wait_for(_settled(store, j), f"job {j} to end") for j in (first, beside, behind)]
    finally:
        pool.stop()
    killed, other, queued_behind = jobs
    assert [(j.state, j.attempts, j.last_error) for j in jobs] == [("done", 1, None)] * 3
    assert [a for _, a in _runs(markers, first)] == [1, 1]  # run twice, one attempt
    assert killed.started_at is not None and other.finished_at is not None
    assert killed.started_at >= other.finished_at  # it ran again alone
    assert queued_behind.started_at is not None and killed.finished_at is not None
    assert queued_behind.started_at >= killed.finished_at  # one at a time until it had
    assert ("the worker process was killed by SIGKILL while 1 other job ran (the system may "
            "have run out of memory); not counted: the job runs again alone") in caplog.text


@pytest.mark.parametrize("case", ["killed again alone", "handed back too often"])
def test_a_child_killed_beside_another_job_does_not_run_forever(
    case: str, tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed again when it ran alone: that counts (the job may not fit in the machine).
    Handed back :data:`MEMORY_RELEASES` times already: the kill beside another job counts."""
    first, beside = (_queue_spooled(store, state, n) for n in (1, 2))
    if case == "handed back too often":
        monkeypatch.setattr(worker_module, "MEMORY_RELEASES", 0)
    markers = _script(monkeypatch, tmp_path, {str(first): ["sigkill:1", "sigkill"],
                                              str(beside): ["sleep:3"]})
    pool = WorkerPool(_pool_settings(state, processes=2, job_attempts=1), store, "test-node:1",
                      job_function=SCRIPTED_JOB)
    job = _run_job_until_settled(pool, store, first)
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.last_error == ("the worker process was killed by SIGKILL (the system may have "
                              "run out of memory; the memory budget is 8192 MiB)")
    assert len(_runs(markers, first)) == (2 if case == "killed again alone" else 1)


def test_a_child_stopped_with_sigterm_is_handed_back_without_counting_the_attempt(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``systemctl stop`` (KillMode=control-group) sends SIGTERM to the children too, before
    the pool is told to stop: that is the node stopping, not the job failing."""
    markers = _script(monkeypatch, tmp_path, ["sigterm"])
    job_id = _queue_spooled(store, state, 1)
    pool = WorkerPool(_pool_settings(state, job_attempts=1), store, "test-node:1",
                      job_function=SCRIPTED_JOB)
    job = _run_job_until_settled(pool, store, job_id)
    assert (job.state, job.attempts, job.last_error) == ("done", 1, None)
    assert job.result == {"run": 1}
    assert [a for _, a in _runs(markers, job_id)] == [1, 1]


def test_a_child_stopped_with_sigterm_every_time_does_not_run_forever(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    markers = _script(monkeypatch, tmp_path, ["sigterm"] * 10)
    job_id = _queue_spooled(store, state, 1)
    pool = WorkerPool(_pool_settings(state, job_attempts=2), store, "test-node:1",
                      job_function=SCRIPTED_JOB)
    job = _run_job_until_settled(pool, store, job_id)
    assert (job.state, job.attempts) == ("failed", 2)
    assert job.last_error == "the worker process was killed by SIGTERM"
    assert len(_runs(markers, job_id)) == 4  # 2 stops not counted, then 2 counted attempts


def test_a_store_error_while_recording_a_result_is_retried(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script(monkeypatch, tmp_path, [])
    job_id = _queue_spooled(store, state, 1)
    real_finish = store.finish_job
    calls = []

    def flaky_finish(*args: Any, **kwargs: Any) -> bool:
        calls.append(args)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(store, "finish_job", flaky_finish)
    pool = WorkerPool(_pool_settings(state), store, "test-node:1", job_function=SCRIPTED_JOB)
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
    _script(monkeypatch, tmp_path, [])
    job_id = _queue_spooled(store, state, 1)

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
    pool = WorkerPool(_pool_settings(state, job_attempts=1), store, "test-node:1",
                      job_function=SCRIPTED_JOB)
    job = _run_job_until_settled(pool, store, job_id, 15)
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.last_error == "1 of 1 spool files of acquisition 1 are missing"


def test_a_reused_attempt_folder_starts_clean(
    tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown hands a job back without counting the attempt, so its next run uses the
    same attempt folder: what the interrupted run left there must not be taken as results."""
    _script(monkeypatch, tmp_path, [])
    job_id = _queue_spooled(store, state, 1)
    claimed = store.claim_job("old:1", 60.0, 2.0)
    assert claimed is not None and claimed.attempts == 1
    work = state / "jobs" / str(job_id) / "attempt-1"
    derived = work / DERIVED_DIRNAME
    derived.mkdir(parents=True)
    (derived / "stale.dcm").write_bytes(b"half a file from the interrupted run")
    (derived / MANIFEST_FILENAME).write_text(json.dumps(["stale.dcm"]))
    (work / PROGRESS_FILENAME).write_text(json.dumps({"stage": "qsm"}))
    assert store.release_job(job_id, "old:1", "interrupted by a node shutdown", 3.0)

    pool = WorkerPool(_pool_settings(state, job_attempts=1), store, "test-node:2",
                      job_function=SCRIPTED_JOB)
    job = _run_job_until_settled(pool, store, job_id)
    assert (job.state, job.attempts, job.last_error) == ("done", 1, None)
    assert store.outbox(job_id=job_id) == []
    assert not (work / PROGRESS_FILENAME).exists()


def _start_hanging(tmp_path: Path, state: Path, store: Store, monkeypatch: pytest.MonkeyPatch,
                   count: int) -> tuple[WorkerPool, list[int], list[int]]:
    """A pool running ``count`` children that ignore SIGTERM; the job ids and child pids."""
    markers = _script(monkeypatch, tmp_path, ["hang"])
    jobs = [_queue_spooled(store, state, n) for n in range(1, count + 1)]
    monkeypatch.setattr(worker_module, "_TERMINATE_GRACE_S", 1.0)
    pool = WorkerPool(_pool_settings(state, processes=count), store, "test-node:1",
                      job_function=SCRIPTED_JOB)
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

    markers = _script(monkeypatch, tmp_path, ["hang"])
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
        f"'--job-function', {SCRIPTED_JOB!r}, '--parent-pid', str(os.getpid())], "
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


def test_a_flat_qsm_result_fails_the_job_once_with_nothing_to_send(tmp_path: Path) -> None:
    """A phase with no field in it (zero but for one corner voxel: it passes the load-time
    gates) gives a flat χ map: the plausibility gate after QSM fails the job after one of its
    three attempts, with the reason, and leaves nothing in the outbox."""
    from qsmnode.node.config import PipelineConfig
    from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom
    from tests.nodeutil import small_simulation

    gre = small_simulation().gre
    phase = np.zeros_like(gre.phase)
    phase[0, 0, 0, :] = 0.5
    files = write_dicom(dataclasses.replace(gre, phase=phase), tmp_path / "in", "siemens",
                        SimStudyInfo(seed=65))
    state = tmp_path / "state"
    settings = dataclasses.replace(
        settings_for(state), pipeline=PipelineConfig(qsm=True, m1=False),
        workers=WorkersConfig(processes=1, job_attempts=3))
    with Store.in_state_dir(state) as store:
        ingest(state, store, files, 1_000.0)
        Tracker(settings, store, clock=Clock(2_000.0)).poll()
        [job] = _run_until_settled(store, WorkerPool(settings, store, "test-node:1")).values()
        assert (job.state, job.attempts) == ("failed", 1)
        assert job.last_error is not None
        assert job.last_error.startswith("series 5, 6: implausibly flat result: the "
                                         "susceptibility (χ) map inside the χ mask spans 0 ppm")
        assert "below the plausibility floor" in job.last_error
        assert not store.outbox(job_id=job.id) and not store.sends()
    assert not any((state / "jobs" / str(job.id)).rglob(f"{DERIVED_DIRNAME}/*"))
