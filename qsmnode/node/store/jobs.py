"""Jobs: one per accepted acquisition, and its leases.

A worker claims a queued job in one transaction (state ``running``, ``attempts + 1``,
``lease_owner``, ``lease_expires_at``); the attempt ends in ``done`` (with ``result``, and the
job's outbox recorded in the same transaction, so a job is never done without its results
queued), back in ``queued`` (failed, attempts left) or ``failed`` (the last error kept in
``last_error``). :meth:`JobsMixin.requeue_orphaned_jobs` hands the running jobs of a dead owner
back to the queue, once per crash.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from qsmnode.node.store.connection import StoreConnection
from qsmnode.node.store.delivery import record_outbox_rows
from qsmnode.node.store.records import (
    INSTANCE_COLUMNS,
    JOB_COLUMNS,
    InstanceRecord,
    JobRecord,
    OutboxRecord,
    job_from_row,
)


def _job_by_id(db: sqlite3.Connection, job_id: int) -> JobRecord:
    """The job with this id, read in the caller's transaction (it exists)."""
    return job_from_row(db.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone())


class JobsMixin(StoreConnection):
    """The job queue: claiming, finishing, failing, releasing and retrying jobs."""

    def jobs(self, state: str | None = None) -> list[JobRecord]:
        """Jobs (all, or those in ``state``), oldest first."""
        sql, args = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs", ()
        if state is not None:
            sql, args = sql + " WHERE state = ?", (state,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [job_from_row(row) for row in rows]

    def job(self, job_id: int) -> JobRecord | None:
        """The job with this id, if any."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        return None if row is None else job_from_row(row)

    def claim_job(self, owner: str, lease_s: float, now: float) -> JobRecord | None:
        """Claim the oldest queued job for ``owner``: running, one more attempt, leased until
        ``now + lease_s``. None when no job is queued."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, "
                "lease_expires_at = ?, started_at = ?, finished_at = NULL, updated_at = ? "
                "WHERE id = ?",
                (owner, now + lease_s, now, now, row["id"]),
            )
            job = _job_by_id(db, row["id"])
        self.audit.record("job_started", job_id=job.id, acquisition_id=job.acquisition_id,
                          attempt=job.attempts, owner=owner)
        return job

    def finish_job(self, job_id: int, owner: str, result: dict[str, Any], now: float,
                   outbox: Sequence[OutboxRecord] = (), destinations: Sequence[str] = ()
                   ) -> bool:
        """Mark a running job of ``owner`` done with its result, and record its ``outbox``
        instances with a pending send to each of ``destinations``, in one transaction. False
        when the job is not running under that lease any more (nothing changes then)."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'done', result = ?, last_error = NULL, "
                "lease_owner = NULL, lease_expires_at = NULL, finished_at = ?, updated_at = ? "
                "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (json.dumps(result), now, now, job_id, owner),
            )
            if cursor.rowcount != 1:
                return False
            record_outbox_rows(db, outbox, destinations, now)
            row = db.execute("SELECT acquisition_id, attempts FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
        self.audit.record("job_done", job_id=job_id, acquisition_id=row[0], attempt=row[1],
                          derived_instances=len(outbox))
        return True

    def fail_job_attempt(self, job_id: int, owner: str, error: str, max_attempts: int,
                         now: float) -> JobRecord | None:
        """End a failed attempt of a running job of ``owner``: queued again while attempts are
        left, else failed. ``error`` becomes ``last_error``. None when the job is not running
        under that lease."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = CASE WHEN attempts >= ? THEN 'failed' ELSE 'queued' END, "
                "last_error = ?, lease_owner = NULL, lease_expires_at = NULL, "
                "finished_at = CASE WHEN attempts >= ? THEN ? ELSE NULL END, updated_at = ? "
                "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (max_attempts, error, max_attempts, now, now, job_id, owner),
            )
            if cursor.rowcount != 1:
                return None
            job = _job_by_id(db, job_id)
        self._audit_job_failed(job)
        return job

    def _audit_job_failed(self, job: JobRecord) -> None:
        self.audit.record("job_failed" if job.state == "failed" else "job_requeued",
                          job_id=job.id, acquisition_id=job.acquisition_id,
                          attempt=job.attempts, error=job.last_error,
                          final=job.state == "failed")

    def release_job(self, job_id: int, owner: str, note: str, now: float) -> bool:
        """Hand a running job of ``owner`` back to the queue without counting the attempt
        (the node is stopping: not the job's fault)."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0), "
                "last_error = ?, lease_owner = NULL, lease_expires_at = NULL, updated_at = ? "
                "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (note, now, job_id, owner),
            )
            released = cursor.rowcount == 1
        if released:
            self.audit.record("job_requeued", job_id=job_id, error=note, final=False)
        return released

    def retry_jobs(self, now: float, *, job_ids: Sequence[int] | None = None,
                   study_uid: str | None = None) -> list[JobRecord]:
        """Queue failed jobs again with their attempts reset (``qsmnode retry``): those of
        ``job_ids``, or of the study ``study_uid``, or every failed job when both are None.
        Jobs not failed are left as they are. Returns the jobs queued again."""
        sql = ("SELECT j.id, j.last_error FROM jobs j JOIN acquisitions a "
               "ON a.id = j.acquisition_id WHERE j.state = 'failed'")
        args: list[Any] = []
        if job_ids is not None:
            sql += f" AND j.id IN ({', '.join('?' for _ in job_ids)})"
            args += list(job_ids)
        if study_uid is not None:
            sql += " AND a.study_uid = ?"
            args.append(study_uid)
        with self.transaction() as db:
            rows = db.execute(sql + " ORDER BY j.id", args).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, last_error = ?, "
                    "lease_owner = NULL, lease_expires_at = NULL, finished_at = NULL, "
                    "updated_at = ? WHERE id = ?",
                    (f"queued again by qsmnode retry; it had failed: {row['last_error']}", now,
                     row["id"]))
            jobs = [_job_by_id(db, row["id"]) for row in rows]
        for job in jobs:
            self.audit.record("job_requeued", job_id=job.id, acquisition_id=job.acquisition_id,
                              attempt=0, error=job.last_error, final=False, retried=True)
        return jobs

    def requeue_orphaned_jobs(self, live_owner: str, max_attempts: int, now: float,
                              finished: Callable[[int, int], bool] | None = None,
                              ) -> list[JobRecord]:
        """Running jobs whose lease owner is not ``live_owner`` (the caller knows those owners
        are dead) go back to the queue, or to failed when their attempts are used up. The
        interrupted attempt counts, unless ``finished(job_id, attempt)`` says it had ended
        well and only its hand-over to the outbox was cut short (not the job's fault: it runs
        again, whatever its attempts). Each crash re-queues a job once: afterwards it is
        queued, not running. Returns the jobs as they are now."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, attempts, lease_owner FROM jobs WHERE state = 'running' "
                "AND (lease_owner IS NULL OR lease_owner != ?)",
                (live_owner,),
            ).fetchall()
            for row in rows:
                attempts = int(row["attempts"])
                if finished is not None and finished(int(row["id"]), attempts):
                    db.execute(
                        "UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0), "
                        "last_error = ?, lease_owner = NULL, lease_expires_at = NULL, "
                        "updated_at = ? WHERE id = ?",
                        (f"interrupted: the node stopped after attempt {attempts} ended well, "
                         "before its results were handed over; not counted", now, row["id"]))
                    continue
                error = (f"interrupted: the node stopped while attempt {attempts} was running "
                         f"(lease owner {row['lease_owner']})")
                exhausted = attempts >= max_attempts
                db.execute(
                    "UPDATE jobs SET state = ?, last_error = ?, lease_owner = NULL, "
                    "lease_expires_at = NULL, finished_at = ?, updated_at = ? WHERE id = ?",
                    ("failed" if exhausted else "queued", error, now if exhausted else None,
                     now, row["id"]),
                )
            ids = [row["id"] for row in rows]
            jobs = [_job_by_id(db, job_id) for job_id in ids]
        for job in jobs:
            self._audit_job_failed(job)
        return jobs

    def job_instances(self, job_id: int) -> list[InstanceRecord]:
        """The instances of the series of a job's acquisition, in order of arrival."""
        with self._lock:
            row = self._db.execute(
                "SELECT a.series_uids FROM jobs j JOIN acquisitions a ON a.id = j.acquisition_id "
                "WHERE j.id = ?", (job_id,)).fetchone()
            if row is None:
                return []
            uids = json.loads(row[0])
            marks = ", ".join("?" for _ in uids)
            rows = self._db.execute(
                f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances "
                f"WHERE series_uid IN ({marks}) ORDER BY received_at, rowid", uids).fetchall()
        return [InstanceRecord(**dict(r)) for r in rows]
