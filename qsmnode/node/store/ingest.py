"""Received instances and their series (the receiver's and the tracker's part of the store).

``series.received_count`` counts distinct instances. A late instance of a complete series
updates ``last_received_at`` and ``received_count`` (so ``received_count > completed_count``)
but leaves the state to the tracker, which re-opens the series
(:meth:`IngestMixin.reopen_late_series`). ``opened_at`` is when the series (re)opened (NULL:
at its first instance), ``completed_count`` the instance count when it was closed,
``completion`` why it was closed, ``grouped_at`` when its study was last grouped into
acquisitions (NULL: not yet), ``passed_over`` why the grouping passed it over (plainly not a
QSM candidate: not a problem, holds no images).

An instance received again after retention pruned its file is recorded again: its row gets the
new file (``pruned_at`` cleared).
"""

from __future__ import annotations

import time

from qsmnode.node.store.connection import StoreConnection
from qsmnode.node.store.records import (
    INSTANCE_COLUMNS,
    SERIES_COLUMNS,
    InstanceRecord,
    SeriesRecord,
    StudyReady,
)


class IngestMixin(StoreConnection):
    """Instances and series: recording receptions, and the tracker's view of them."""

    def add_instance(self, record: InstanceRecord, *, file_is_durable: bool = False) -> bool:
        """Record a received instance (and its series) in one transaction.

        Returns False, changing nothing, when the SOP Instance UID is already recorded (an
        instance whose file was pruned is recorded again: its row gets the new file).

        ``file_is_durable``: the caller has made the instance's file durable (fsynced, renamed
        into the spool, folder fsynced) and the node adds spool files missing from the store at
        start (:func:`qsmnode.node.recovery.recover`). Then this commit is made with
        ``synchronous=NORMAL``: durable when the process dies (the WAL is in the OS's cache),
        and after a power loss either still there or redone from the file at the next start.
        It skips one fsync per instance. Any later ``synchronous=FULL`` commit (every other
        state change) syncs the WAL, and with it every row before it, so nothing committed
        after such a row (a series completed, a job) can survive the row itself.
        """
        if self._add_instance(record, relaxed=file_is_durable):
            self.audit.record(
                "instance_stored", calling_ae=record.calling_ae, address=record.peer_address,
                study_uid=record.study_uid, series_uid=record.series_uid,
                sop_instance_uid=record.sop_instance_uid, sop_class_uid=record.sop_class_uid,
                bytes=record.size)
            return True
        return False

    def _add_instance(self, record: InstanceRecord, relaxed: bool) -> bool:
        if not relaxed:
            return self._insert_instance(record)
        with self._lock:  # no other transaction of this connection runs meanwhile
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                return self._insert_instance(record)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def _insert_instance(self, record: InstanceRecord) -> bool:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO series (series_uid, study_uid, series_number, modality, "
                "sop_class_uid, series_description, first_received_at, last_received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.series_uid, record.study_uid, record.series_number, record.modality,
                 record.sop_class_uid, record.series_description, record.received_at,
                 record.received_at),
            )
            cursor = db.execute(
                f"INSERT OR IGNORE INTO instances ({', '.join(INSTANCE_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in INSTANCE_COLUMNS)})",
                tuple(getattr(record, name) for name in INSTANCE_COLUMNS),
            )
            if cursor.rowcount == 0:
                if self._version < 4:
                    return False
                revived = db.execute(
                    "UPDATE instances SET pruned_at = NULL, path = ?, size = ?, "
                    "transfer_syntax_uid = ?, calling_ae = ?, peer_address = ?, received_at = ? "
                    "WHERE sop_instance_uid = ? AND pruned_at IS NOT NULL",
                    (record.path, record.size, record.transfer_syntax_uid, record.calling_ae,
                     record.peer_address, record.received_at, record.sop_instance_uid),
                )
                if revived.rowcount != 1:
                    return False
                # its study's age for retention counts from this reception again
                db.execute("UPDATE series SET last_received_at = max(last_received_at, ?) "
                           "WHERE series_uid = ?", (record.received_at, record.series_uid))
                return True
            db.execute(
                "UPDATE series SET received_count = received_count + 1, "
                "last_received_at = max(last_received_at, ?) WHERE series_uid = ?",
                (record.received_at, record.series_uid),
            )
            return True

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The recorded instance with this SOP Instance UID, if any."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        return None if row is None else InstanceRecord(**dict(row))

    def instances(self, series_uid: str | None = None) -> list[InstanceRecord]:
        """Recorded instances, of one series or all, in order of arrival."""
        sql = f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances"
        args: tuple[str, ...] = ()
        if series_uid is not None:
            sql += " WHERE series_uid = ?"
            args = (series_uid,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY received_at, rowid", args).fetchall()
        return [InstanceRecord(**dict(row)) for row in rows]

    def instance_paths(self) -> set[str]:
        """The ``path`` of every recorded instance whose file was not pruned (relative to the
        state directory)."""
        where = " WHERE pruned_at IS NULL" if self._version >= 4 else ""
        with self._lock:
            return {row[0] for row in self._db.execute(f"SELECT path FROM instances{where}")}

    def count_instances(self) -> int:
        """How many instances are recorded (pruned ones included)."""
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM instances").fetchone()[0])

    # ------------------------------------------------------------------------------------- series

    def series(self, state: str | None = None) -> list[SeriesRecord]:
        """Recorded series (all, or those in ``state``), oldest first."""
        sql = f"SELECT {', '.join(self._series_columns)} FROM series"
        args: tuple[str, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY first_received_at, rowid", args).fetchall()
        return [SeriesRecord(**dict(row)) for row in rows]

    def get_series(self, series_uid: str) -> SeriesRecord | None:
        """The recorded series with this UID, if any."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(self._series_columns)} FROM series WHERE series_uid = ?",
                (series_uid,),
            ).fetchone()
        return None if row is None else SeriesRecord(**dict(row))

    def set_expected_count(self, series_uid: str, count: int | None) -> None:
        """Record how many instances the series is expected to hold (None: unknown)."""
        with self.transaction() as db:
            db.execute("UPDATE series SET expected_count = ? WHERE series_uid = ?",
                       (count, series_uid))

    def mark_series_complete(self, series_uid: str, at: float | None = None) -> bool:
        """Mark an open series complete; False when it was not open."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'complete', completed_at = ?, "
                "completed_count = received_count WHERE series_uid = ? AND state = 'open'",
                (time.time() if at is None else at, series_uid),
            )
            done = cursor.rowcount == 1
        if done:
            self._audit_series(series_uid, None)
        return done

    def _audit_series(self, series_uid: str, completion: str | None) -> None:
        with self._lock:
            row = self._db.execute(
                "SELECT study_uid, completed_count FROM series WHERE series_uid = ?",
                (series_uid,)).fetchone()
        if row is not None:
            self.audit.record("series_complete", study_uid=row[0], series_uid=series_uid,
                              instances=row[1], completion=completion)

    def summary(self) -> dict[str, int]:
        """Counts for status displays: series (total, open, complete) and instances."""
        with self._lock:
            total, open_, complete = self._db.execute(
                "SELECT count(*), coalesce(sum(state = 'open'), 0), "
                "coalesce(sum(state = 'complete'), 0) FROM series"
            ).fetchone()
            instances, size = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM instances"
            ).fetchone()
        return {
            "series": int(total), "series_open": int(open_), "series_complete": int(complete),
            "instances": int(instances), "bytes": int(size),
        }

    # ------------------------------------------------------------------- series: the tracker's view

    def open_series(self) -> list[tuple[SeriesRecord, int | None]]:
        """The open series, oldest first, each with the largest ImagesInAcquisition its
        instances report (None when none does)."""
        columns = ", ".join(f"s.{c}" for c in SERIES_COLUMNS)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {columns}, (SELECT max(i.images_in_acquisition) FROM instances i "
                "WHERE i.series_uid = s.series_uid) AS iia FROM series s WHERE s.state = 'open' "
                "ORDER BY s.first_received_at, s.rowid"
            ).fetchall()
        out = []
        for row in rows:
            values = dict(row)
            iia = values.pop("iia")
            out.append((SeriesRecord(**values), None if iia is None else int(iia)))
        return out

    def complete_series(self, series_uid: str, seen_count: int, completion: str,
                        expected_count: int | None, at: float) -> bool:
        """Close an open series that still holds ``seen_count`` instances; False when it is not
        open any more or an instance arrived since (then nothing changes)."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'complete', completed_at = ?, "
                "completed_count = received_count, completion = ?, "
                "expected_count = coalesce(?, expected_count) "
                "WHERE series_uid = ? AND state = 'open' AND received_count = ?",
                (at, completion, expected_count, series_uid, seen_count),
            )
            done = cursor.rowcount == 1
        if done and self.audit.enabled:
            self._audit_series(series_uid, completion)
        return done

    def reopen_late_series(self, at: float) -> list[SeriesRecord]:
        """Re-open every complete series that received instances after it was closed; return
        them (as they were before re-opening). Their study will be grouped again."""
        columns = ", ".join(SERIES_COLUMNS)
        with self.transaction() as db:
            rows = db.execute(
                f"SELECT {columns} FROM series WHERE state = 'complete' "
                "AND completed_count IS NOT NULL AND received_count > completed_count"
            ).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE series SET state = 'open', opened_at = ?, completed_at = NULL, "
                    "completed_count = NULL, completion = NULL, grouped_at = NULL "
                    "WHERE series_uid = ?",
                    (at, row["series_uid"]),
                )
        return [SeriesRecord(**dict(row)) for row in rows]

    def studies_ready(self) -> list[StudyReady]:
        """Studies with no open series and at least one complete series not grouped yet."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid, sum(received_count), max(last_received_at), "
                "max(coalesce(opened_at, first_received_at)) FROM series GROUP BY study_uid "
                "HAVING sum(state = 'open') = 0 "
                "AND sum(state = 'complete' AND grouped_at IS NULL) > 0 "
                "ORDER BY min(first_received_at)"
            ).fetchall()
        return [StudyReady(r[0], int(r[1]), float(r[2]), float(r[3])) for r in rows]

    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        """The recorded instances of one study, in order of arrival."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances WHERE study_uid = ? "
                "ORDER BY received_at, rowid",
                (study_uid,),
            ).fetchall()
        return [InstanceRecord(**dict(row)) for row in rows]

    def pruned_instances(self, study_uid: str) -> set[str]:
        """The SOP Instance UIDs of a study's instances whose files retention removed (empty
        before the schema version that adds retention)."""
        if self._version < 4:
            return set()
        with self._lock:
            return {row[0] for row in self._db.execute(
                "SELECT sop_instance_uid FROM instances WHERE study_uid = ? "
                "AND pruned_at IS NOT NULL", (study_uid,))}
