"""The outbox and its sends (version 3): delivering derived instances to the destinations.

One ``outbox`` row per derived instance written to ``<state_dir>/outbox`` (``job_id``: the job
that made it), and one ``sends`` row per instance and configured destination, recorded in the
transaction that marks the job done (:meth:`~qsmnode.node.store.Store.finish_job`). A send is
``pending`` until the destination confirms it (``sent``, with ``sent_at`` and the DIMSE
``last_status``) or its attempts run out (``failed``); ``attempts`` counts the tries made,
``next_try_at`` is when the sender may try again, ``last_error`` says why the last try failed.
An instance recorded again (the job ran again: deterministic UIDs give the same instance) keeps
its sends, except that ``failed`` ones are queued again. :meth:`DeliveryMixin.requeue_sends` is
what ``qsmnode resend`` changes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from qsmnode.node.store.connection import StoreConnection
from qsmnode.node.store.records import (
    ACQUISITION_STATES,
    JOB_STATES,
    OUTBOX_COLUMNS,
    SEND_COLUMNS,
    SEND_STATES,
    DestinationSummary,
    DueSend,
    OutboxRecord,
    SendOutcome,
    SendRecord,
)


def record_outbox_rows(db: sqlite3.Connection, records: Sequence[OutboxRecord],
                       destinations: Sequence[str], now: float) -> int:
    """Insert or refresh outbox rows and their sends; return how many sends were queued
    (new ones, and failed ones queued again)."""
    columns = ", ".join(OUTBOX_COLUMNS)
    marks = ", ".join("?" for _ in OUTBOX_COLUMNS)
    refresh = ", ".join([*(f"{c} = excluded.{c}" for c in OUTBOX_COLUMNS
                           if c not in ("sop_instance_uid", "created_at")),
                         "pruned_at = NULL"])
    queued = 0
    for record in records:
        db.execute(
            f"INSERT INTO outbox ({columns}) VALUES ({marks}) "
            f"ON CONFLICT (sop_instance_uid) DO UPDATE SET {refresh}",
            tuple(getattr(record, c) for c in OUTBOX_COLUMNS),
        )
        for destination in destinations:
            cursor = db.execute(
                "INSERT INTO sends (sop_instance_uid, destination, next_try_at, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (sop_instance_uid, destination) DO UPDATE SET "
                "state = 'pending', attempts = 0, next_try_at = excluded.next_try_at, "
                "updated_at = excluded.updated_at WHERE sends.state = 'failed'",
                (record.sop_instance_uid, destination, now, now, now),
            )
            queued += cursor.rowcount
    return queued


class DeliveryMixin(StoreConnection):
    """Outbox instances and their sends to the destinations; counts for status displays."""

    def record_outbox(self, records: Sequence[OutboxRecord], destinations: Sequence[str],
                      now: float) -> int:
        """Record outbox instances, each with a pending send to every one of
        ``destinations``, in one transaction; return how many sends were queued."""
        with self.transaction() as db:
            return record_outbox_rows(db, records, destinations, now)

    def outbox(self, study_uid: str | None = None, job_id: int | None = None
               ) -> list[OutboxRecord]:
        """Outbox instances (all, of a study, or of a job), in order of recording."""
        sql, clauses, args = f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM outbox", [], []
        if study_uid is not None:
            clauses.append("study_uid = ?")
            args.append(study_uid)
        if job_id is not None:
            clauses.append("job_id = ?")
            args.append(job_id)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY rowid", args).fetchall()
        return [OutboxRecord(**dict(row)) for row in rows]

    def outbox_paths(self) -> set[str]:
        """The ``path`` of every outbox instance whose file was not pruned (relative to the
        state directory)."""
        if self._version < 3:
            return set()
        where = " WHERE pruned_at IS NULL" if self._version >= 4 else ""
        with self._lock:
            return {row[0] for row in self._db.execute(f"SELECT path FROM outbox{where}")}

    def outbox_summary(self) -> dict[str, int]:
        """The outbox's instance count and bytes, files not pruned (zero before version 3)."""
        if self._version < 3:
            return {"instances": 0, "bytes": 0}
        where = " WHERE pruned_at IS NULL" if self._version >= 4 else ""
        with self._lock:
            count, size = self._db.execute(
                f"SELECT count(*), coalesce(sum(size), 0) FROM outbox{where}").fetchone()
        return {"instances": int(count), "bytes": int(size)}

    def sends(self, state: str | None = None, destination: str | None = None,
              study_uid: str | None = None) -> list[SendRecord]:
        """Sends, filtered by state, destination and study, in order of their instances."""
        if self._version < 3:
            return []
        columns = ", ".join(f"s.{c}" for c in SEND_COLUMNS)
        sql = f"SELECT {columns} FROM sends s JOIN outbox o USING (sop_instance_uid)"
        clauses, args = [], []
        for clause, value in (("s.state = ?", state), ("s.destination = ?", destination),
                              ("o.study_uid = ?", study_uid)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY o.rowid, s.destination", args).fetchall()
        return [SendRecord(**dict(row)) for row in rows]

    def due_sends(self, now: float, destinations: Sequence[str], limit: int = 1000
                  ) -> list[DueSend]:
        """Pending sends to ``destinations`` whose ``next_try_at`` has come, at most
        ``limit``, in the order their instances were recorded."""
        if not destinations:
            return []
        marks = ", ".join("?" for _ in destinations)
        with self._lock:
            rows = self._db.execute(
                "SELECT s.sop_instance_uid, s.destination, s.attempts, o.sop_class_uid, "
                "o.transfer_syntax_uid, o.study_uid, o.series_uid, o.path "
                "FROM sends s JOIN outbox o USING (sop_instance_uid) "
                f"WHERE s.state = 'pending' AND s.next_try_at <= ? AND s.destination IN ({marks}) "
                "ORDER BY o.rowid, s.destination LIMIT ?",
                (now, *destinations, limit),
            ).fetchall()
        return [DueSend(**dict(row)) for row in rows]

    def next_send_at(self, destinations: Sequence[str]) -> float | None:
        """The earliest ``next_try_at`` of a pending send to ``destinations`` (None: none)."""
        if not destinations:
            return None
        marks = ", ".join("?" for _ in destinations)
        with self._lock:
            row = self._db.execute(
                f"SELECT min(next_try_at) FROM sends WHERE state = 'pending' "
                f"AND destination IN ({marks})", tuple(destinations)).fetchone()
        return None if row[0] is None else float(row[0])

    def record_send_outcomes(self, outcomes: Sequence[SendOutcome], now: float) -> int:
        """Record the tries of a batch in one transaction: each counts one attempt. Only
        pending sends change (a send queued again meanwhile by ``resend`` keeps its new
        state). Returns how many changed."""
        changed = 0
        with self.transaction() as db:
            for outcome in outcomes:
                if outcome.sent:
                    cursor = db.execute(
                        "UPDATE sends SET state = 'sent', attempts = attempts + 1, "
                        "last_status = ?, last_error = NULL, last_try_at = ?, sent_at = ?, "
                        "updated_at = ? "
                        "WHERE sop_instance_uid = ? AND destination = ? AND state = 'pending'",
                        (outcome.status, now, now, now, outcome.sop_instance_uid,
                         outcome.destination),
                    )
                else:
                    cursor = db.execute(
                        "UPDATE sends SET state = ?, attempts = attempts + 1, last_status = ?, "
                        "last_error = ?, last_try_at = ?, next_try_at = ?, updated_at = ? "
                        "WHERE sop_instance_uid = ? AND destination = ? AND state = 'pending'",
                        ("failed" if outcome.give_up else "pending", outcome.status,
                         outcome.error, now,
                         now if outcome.next_try_at is None else outcome.next_try_at, now,
                         outcome.sop_instance_uid, outcome.destination),
                    )
                changed += cursor.rowcount
        return changed

    def requeue_sends(self, now: float, *, study_uid: str | None = None,
                      failed_only: bool = False, destinations: Sequence[str] = ()) -> int:
        """Queue sends again, due now, with their attempts reset (``qsmnode resend``).

        ``study_uid``: every send of the study's outbox instances, sent ones included, and a
        new send for each of ``destinations`` an instance has none for yet (a destination
        added since). ``failed_only``: only failed sends (of the study, or all). Returns how
        many sends are queued by it.
        """
        with self.transaction() as db:
            clauses = ["1"]
            args: list[Any] = [now, now]
            if failed_only:
                clauses.append("state = 'failed'")
            if study_uid is not None:
                clauses.append("sop_instance_uid IN "
                               "(SELECT sop_instance_uid FROM outbox WHERE study_uid = ?)")
                args.append(study_uid)
            # files pruned by retention cannot be sent again
            clauses.append("sop_instance_uid NOT IN "
                           "(SELECT sop_instance_uid FROM outbox WHERE pruned_at IS NOT NULL)")
            queued = db.execute(
                "UPDATE sends SET state = 'pending', attempts = 0, next_try_at = ?, "
                "last_status = NULL, last_error = NULL, sent_at = NULL, updated_at = ? "
                f"WHERE {' AND '.join(clauses)}", args,
            ).rowcount
            if study_uid is not None and not failed_only:
                for row in db.execute("SELECT sop_instance_uid FROM outbox WHERE study_uid = ? "
                                      "AND pruned_at IS NULL", (study_uid,)).fetchall():
                    for destination in destinations:
                        queued += db.execute(
                            "INSERT OR IGNORE INTO sends (sop_instance_uid, destination, "
                            "next_try_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                            (row[0], destination, now, now, now),
                        ).rowcount
        return queued

    def delivery(self) -> list[DestinationSummary]:
        """Per destination with sends: counts by state, attempts, the next retry and the last
        error of a send not delivered yet. Empty before version 3."""
        if self._version < 3:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, sum(state = 'pending'), sum(state = 'sent'), "
                "sum(state = 'failed'), sum(attempts), sum(max(attempts - 1, 0)), "
                "max(attempts), min(CASE WHEN state = 'pending' THEN next_try_at END), "
                "max(sent_at) FROM sends GROUP BY destination ORDER BY destination"
            ).fetchall()
            out = []
            for row in rows:
                error = self._db.execute(
                    "SELECT last_error, last_try_at FROM sends WHERE destination = ? "
                    "AND state != 'sent' AND last_error IS NOT NULL "
                    "ORDER BY last_try_at DESC LIMIT 1", (row[0],)).fetchone()
                out.append(DestinationSummary(
                    row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4]), int(row[5]),
                    int(row[6]), row[7], row[8],
                    None if error is None else error[0], None if error is None else error[1],
                ))
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Acquisitions, jobs, problems and sends by state, for status displays (empty
        before the schema version that adds them)."""
        if self._version < 2:
            return {"acquisitions": {}, "jobs": {}, "problems": {}, "sends": {}}
        with self._lock:
            acquisitions = dict(self._db.execute(
                "SELECT state, count(*) FROM acquisitions GROUP BY state").fetchall())
            jobs = dict(self._db.execute(
                "SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
            open_, resolved = self._db.execute(
                "SELECT coalesce(sum(resolved_at IS NULL), 0), "
                "coalesce(sum(resolved_at IS NOT NULL), 0) FROM problems").fetchone()
            sends = {} if self._version < 3 else dict(self._db.execute(
                "SELECT state, count(*) FROM sends GROUP BY state").fetchall())
        return {
            "acquisitions": {s: int(acquisitions.get(s, 0)) for s in ACQUISITION_STATES},
            "jobs": {s: int(jobs.get(s, 0)) for s in JOB_STATES},
            "problems": {"open": int(open_), "resolved": int(resolved)},
            "sends": {} if self._version < 3 else {s: int(sends.get(s, 0))
                                                    for s in SEND_STATES},
        }
