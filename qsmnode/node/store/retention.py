"""Retention (version 4): what of a finished, delivered study's files may go, and what went.

When retention (:mod:`qsmnode.node.retention`) removes a study's files, its ``instances`` or
``outbox`` rows are kept with ``pruned_at`` set, and a ``prunings`` row records what went, why
and when (:meth:`RetentionMixin.prune_study`). Pruned rows are left out of
:meth:`~qsmnode.node.store.Store.instance_paths` and
:meth:`~qsmnode.node.store.Store.outbox_paths` (what the recoveries at start compare with the
files) and of ``qsmnode resend``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from qsmnode.node.store.connection import StoreConnection
from qsmnode.node.store.records import PRUNE_KINDS, PRUNE_REASONS, Pruning, StudyRetention


class RetentionMixin(StoreConnection):
    """Finished studies, pruning their files, and the record of prunings."""

    def _settled_at(self, db: sqlite3.Connection, study_uid: str,
                    destinations: Sequence[str]) -> float | None:
        """When a study's work ended, or None while any is left: a series open or not grouped,
        or with an instance received since it completed (the tracker re-opens it at its next
        pass), a job queued or running, or a derived instance (whose file is kept) not yet
        ``sent`` to every one of ``destinations`` (with none configured, nothing is
        delivered)."""
        busy = db.execute(
            "SELECT count(*) FROM series WHERE study_uid = ? "
            "AND (state = 'open' OR grouped_at IS NULL "
            "OR received_count > coalesce(completed_count, received_count))",
            (study_uid,)).fetchone()[0]
        busy += db.execute(
            "SELECT count(*) FROM jobs j JOIN acquisitions a ON a.id = j.acquisition_id "
            "WHERE a.study_uid = ? AND j.state IN ('queued', 'running')",
            (study_uid,)).fetchone()[0]
        if busy:
            return None
        live = db.execute("SELECT count(*) FROM outbox WHERE study_uid = ? AND pruned_at IS NULL",
                          (study_uid,)).fetchone()[0]
        if live:
            if not destinations:
                return None
            marks = ", ".join("?" for _ in destinations)
            undelivered = db.execute(
                "SELECT count(*) FROM outbox o WHERE o.study_uid = ? AND o.pruned_at IS NULL "
                "AND (EXISTS (SELECT 1 FROM sends s WHERE s.sop_instance_uid = o.sop_instance_uid "
                "AND s.state != 'sent') OR (SELECT count(DISTINCT s.destination) FROM sends s "
                "WHERE s.sop_instance_uid = o.sop_instance_uid AND s.state = 'sent' "
                f"AND s.destination IN ({marks})) < ?)",
                (study_uid, *destinations, len(set(destinations)))).fetchone()[0]
            if undelivered:
                return None
        row = db.execute(
            "SELECT max(t) FROM ("
            "SELECT max(max(last_received_at, coalesce(grouped_at, 0))) AS t FROM series "
            "WHERE study_uid = ? "
            "UNION ALL SELECT max(j.updated_at) FROM jobs j "
            "JOIN acquisitions a ON a.id = j.acquisition_id WHERE a.study_uid = ? "
            "UNION ALL SELECT max(s.updated_at) FROM sends s JOIN outbox o "
            "USING (sop_instance_uid) WHERE o.study_uid = ? "
            "UNION ALL SELECT max(created_at) FROM problems WHERE study_uid = ? "
            "UNION ALL SELECT max(created_at) FROM outbox WHERE study_uid = ?)",
            (study_uid,) * 5).fetchone()
        return None if row[0] is None else float(row[0])

    def _spool_held(self, db: sqlite3.Connection, study_uid: str) -> str:
        """Why a study's received images must stay although its work is finished, or "":
        an unresolved problem (the missing slice or series may still come, and then its
        acquisition is processed) or a failed job (nothing has processed its images). Ignored
        acquisitions and images that are no acquisition's by design (a T1w reference,
        non-MR) do not hold them."""
        problem = db.execute(
            "SELECT id, reason FROM problems WHERE study_uid = ? AND resolved_at IS NULL "
            "ORDER BY id LIMIT 1", (study_uid,)).fetchone()
        if problem is not None:
            return (f"problem {problem[0]} is unresolved ({problem[1]}); its images are not "
                    "processed yet")
        job = db.execute(
            "SELECT j.id FROM jobs j JOIN acquisitions a ON a.id = j.acquisition_id "
            "WHERE a.study_uid = ? AND j.state = 'failed' ORDER BY j.id LIMIT 1",
            (study_uid,)).fetchone()
        return "" if job is None else f"job {job[0]} failed: nothing has processed its images"

    def finished_studies(self, destinations: Sequence[str]) -> list[StudyRetention]:
        """The studies that keep files (spool or outbox) and whose work is finished: every
        series grouped, no job queued or running, every derived instance delivered to all of
        ``destinations``. Oldest (by ``settled_at``) first. Empty before version 4."""
        if self._version < 4:
            return []
        out = []
        with self._lock:
            studies = [row[0] for row in self._db.execute(
                "SELECT study_uid FROM instances WHERE pruned_at IS NULL UNION "
                "SELECT study_uid FROM outbox WHERE pruned_at IS NULL")]
            for study_uid in studies:
                settled = self._settled_at(self._db, study_uid, destinations)
                if settled is None:
                    continue
                spool = self._db.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM instances "
                    "WHERE study_uid = ? AND pruned_at IS NULL", (study_uid,)).fetchone()
                outbox = self._db.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM outbox "
                    "WHERE study_uid = ? AND pruned_at IS NULL", (study_uid,)).fetchone()
                out.append(StudyRetention(study_uid, settled, int(spool[0]), int(spool[1]),
                                          int(outbox[0]), int(outbox[1]),
                                          self._spool_held(self._db, study_uid)))
        out.sort(key=lambda study: (study.settled_at, study.study_uid))
        return out

    def prune_study(self, study_uid: str, kind: str, reason: str, destinations: Sequence[str],
                    now: float, settled_before: float | None = None) -> Pruning | None:
        """Mark the files of one study as pruned, in one transaction, if its work is finished
        (see :meth:`finished_studies`) and, with ``settled_before``, it settled before then;
        received images (``spool``) only if nothing holds them (:meth:`_spool_held`).
        ``kind``: the ``spool`` (received instances) or the ``outbox`` (derived instances).
        Records a ``prunings`` row and returns it with the paths to delete (the caller deletes
        them after this commit); None when nothing is pruned."""
        if kind not in PRUNE_KINDS or reason not in PRUNE_REASONS:
            raise ValueError(f"prune_study: kind {kind!r}, reason {reason!r}")
        table = "instances" if kind == "spool" else "outbox"
        with self.transaction() as db:
            settled = self._settled_at(db, study_uid, destinations)
            if settled is None or (settled_before is not None and settled > settled_before):
                return None
            if kind == "spool" and self._spool_held(db, study_uid):
                return None
            rows = db.execute(f"SELECT path, size FROM {table} WHERE study_uid = ? "
                              "AND pruned_at IS NULL ORDER BY rowid", (study_uid,)).fetchall()
            if not rows:
                return None
            db.execute(f"UPDATE {table} SET pruned_at = ? WHERE study_uid = ? "
                       "AND pruned_at IS NULL", (now, study_uid))
            size = sum(int(row[1]) for row in rows)
            cursor = db.execute(
                "INSERT INTO prunings (study_uid, kind, reason, instances, bytes, at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (study_uid, kind, reason, len(rows), size, now))
            job_ids: tuple[int, ...] = ()
            if kind == "spool":
                job_ids = tuple(int(row[0]) for row in db.execute(
                    "SELECT j.id FROM jobs j JOIN acquisitions a ON a.id = j.acquisition_id "
                    "WHERE a.study_uid = ? ORDER BY j.id", (study_uid,)))
        return Pruning(int(cursor.lastrowid or 0), study_uid, kind, reason, len(rows), size, now,
                       tuple(row[0] for row in rows), job_ids)

    def prunings(self, limit: int = 20, study_uid: str | None = None) -> list[Pruning]:
        """The latest prunings (of one study), newest first (empty before version 4)."""
        if self._version < 4:
            return []
        where, args = ("WHERE study_uid = ? ", (study_uid, limit)) if study_uid else ("", (limit,))
        with self._lock:
            rows = self._db.execute(
                "SELECT id, study_uid, kind, reason, instances, bytes, at FROM prunings "
                f"{where}ORDER BY id DESC LIMIT ?", args).fetchall()
        return [Pruning(**dict(row)) for row in rows]

    def retention_summary(self) -> dict[str, dict[str, int]]:
        """Per kind (spool, outbox): instances and bytes kept, and pruned (zero before
        version 4, where nothing is pruned)."""
        out = {}
        for kind, table in (("spool", "instances"), ("outbox", "outbox")):
            if kind == "outbox" and self._version < 3:
                out[kind] = {"instances": 0, "bytes": 0, "pruned_instances": 0,
                             "pruned_bytes": 0}
                continue
            pruned = "pruned_at IS NOT NULL" if self._version >= 4 else "0"
            with self._lock:
                row = self._db.execute(
                    f"SELECT coalesce(sum(NOT ({pruned})), 0), "
                    f"coalesce(sum(CASE WHEN {pruned} THEN 0 ELSE size END), 0), "
                    f"coalesce(sum({pruned}), 0), "
                    f"coalesce(sum(CASE WHEN {pruned} THEN size ELSE 0 END), 0) FROM {table}"
                ).fetchone()
            out[kind] = {"instances": int(row[0]), "bytes": int(row[1]),
                         "pruned_instances": int(row[2]), "pruned_bytes": int(row[3])}
        return out
