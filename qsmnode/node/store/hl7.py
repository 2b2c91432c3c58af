"""The HL7 results to the RIS (version 6): the ``hl7_destinations`` and ``hl7_messages`` tables.

``hl7_destinations`` records when each configured RIS was first seen (``since``): a done job
gets a message for a destination only if it finished at or after then, so a RIS added later is
not flooded with old results. One ``hl7_messages`` row per done job and destination
(``UNIQUE (job_id, destination)``), keyed by its control ID (MSH-10): ``message`` (the ER7
text) is cleared once the RIS acknowledged it, so that no patient data stays longer than
needed; ``notes`` are plain remarks (no accession number, not assessable, ...), ``abnormal``
the worst abnormal flag. A message is ``pending`` until the RIS answers AA (``sent``, with
``sent_at`` and ``last_ack_code``), or AR, or its attempts run out (``failed``); one whose
message could not be built is recorded ``failed`` without text, with why. The sending is
:mod:`qsmnode.node.hl7_sender`'s, through :class:`qsmnode.node.hl7_queue.HL7Queue`.

Before version 6 the tables are missing: the readers answer empty, as the other aggregates do.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from qsmnode.node.store.connection import StoreConnection
from qsmnode.node.store.records import _Record

HL7_STATES = ("pending", "sent", "failed")
HL7_SCHEMA_VERSION = 6


@dataclass(frozen=True)
class QueuedMessage:
    """A message to record: built from a done job for one destination."""

    control_id: str
    destination: str
    job_id: int
    study_uid: str
    message: str
    notes: tuple[str, ...] = ()
    abnormal: str | None = None


@dataclass(frozen=True)
class DueMessage:
    """A pending message whose time has come."""

    control_id: str
    destination: str
    job_id: int
    study_uid: str
    message: str
    attempts: int


@dataclass(frozen=True)
class MessageOutcome:
    """One try: ``sent`` (AA), or ``error`` with ``next_try_at``, ``failed`` when given up
    (AR, or attempts used up); ``ack_code`` what the RIS answered (None: no answer)."""

    control_id: str
    destination: str
    sent: bool
    ack_code: str | None = None
    error: str | None = None
    next_try_at: float | None = None
    failed: bool = False


@dataclass(frozen=True)
class MessageRecord(_Record):
    """One message's delivery, for status displays (without its text)."""

    control_id: str
    destination: str
    job_id: int
    study_uid: str
    notes: tuple[str, ...]
    abnormal: str | None
    state: str
    attempts: int
    next_try_at: float
    last_ack_code: str | None
    last_error: str | None
    last_try_at: float | None
    sent_at: float | None
    created_at: float


@dataclass(frozen=True)
class HL7Summary(_Record):
    """Per destination: messages by state, attempts, the next try and the last error."""

    destination: str
    pending: int = 0
    sent: int = 0
    failed: int = 0
    attempts: int = 0
    next_try_at: float | None = None
    last_sent_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


_RECORD_COLUMNS = ("control_id", "destination", "job_id", "study_uid", "notes", "abnormal",
                   "state", "attempts", "next_try_at", "last_ack_code", "last_error",
                   "last_try_at", "sent_at", "created_at")


def _record(row: sqlite3.Row) -> MessageRecord:
    values = dict(row)
    values["notes"] = tuple(json.loads(values["notes"] or "[]"))
    return MessageRecord(**values)


def summarize_hl7(db: sqlite3.Connection) -> list[HL7Summary]:
    """:meth:`HL7Mixin.hl7_summary` on any connection to a store of version 6 or later (the
    read-only one of :mod:`qsmnode.node.store.queries`)."""
    out = []
    for row in db.execute(
            "SELECT destination, coalesce(sum(state = 'pending'), 0), "
            "coalesce(sum(state = 'sent'), 0), coalesce(sum(state = 'failed'), 0), "
            "coalesce(sum(attempts), 0), min(CASE WHEN state = 'pending' THEN next_try_at END), "
            "max(sent_at) FROM hl7_messages GROUP BY destination ORDER BY destination"
    ).fetchall():
        error = db.execute(
            "SELECT last_error, last_try_at FROM hl7_messages WHERE destination = ? "
            "AND state != 'sent' AND last_error IS NOT NULL ORDER BY last_try_at DESC, "
            "rowid DESC LIMIT 1", (row[0],)).fetchone()
        out.append(HL7Summary(row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4]),
                              row[5], row[6], None if error is None else error[0],
                              None if error is None else error[1]))
    return out


class HL7Mixin(StoreConnection):
    """HL7 destinations and the ORU^R01 messages to them (empty answers before version 6)."""

    @property
    def hl7_available(self) -> bool:
        """The store has the HL7 tables (version 6 or later)."""
        return self._version >= HL7_SCHEMA_VERSION

    def register_hl7_destinations(self, names: Sequence[str], now: float) -> dict[str, float]:
        """Record the destinations not seen before (since ``now``); return name -> since."""
        with self.transaction() as db:
            for name in names:
                db.execute("INSERT OR IGNORE INTO hl7_destinations (name, since) VALUES (?, ?)",
                           (name, now))
            rows = db.execute("SELECT name, since FROM hl7_destinations").fetchall()
        return {row[0]: float(row[1]) for row in rows if row[0] in names}

    def hl7_unqueued_jobs(self, destination: str, since: float, limit: int = 20) -> list[int]:
        """Done jobs finished at or after ``since`` without a message to ``destination``,
        oldest first."""
        with self.reading() as db:
            rows = db.execute(
                "SELECT j.id FROM jobs j WHERE j.state = 'done' "
                "AND coalesce(j.finished_at, j.updated_at) >= ? AND NOT EXISTS (SELECT 1 FROM "
                "hl7_messages m WHERE m.job_id = j.id AND m.destination = ?) "
                "ORDER BY j.id LIMIT ?", (since, destination, limit)).fetchall()
        return [int(row[0]) for row in rows]

    def add_hl7_message(self, message: QueuedMessage, now: float) -> bool:
        """Record a message, pending and due now; False (nothing changes) when its job already
        has one for the destination, or its control ID is already queued there."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO hl7_messages (control_id, destination, job_id, study_uid, "
                "message, notes, abnormal, next_try_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (message.control_id, message.destination, message.job_id, message.study_uid,
                 message.message, json.dumps(list(message.notes)), message.abnormal, now, now,
                 now))
            return cursor.rowcount == 1

    def add_unbuildable_hl7_message(self, control_id: str, destination: str, job_id: int,
                                    study_uid: str, error: str, now: float) -> bool:
        """Record a job whose message cannot be built as failed, with why (shown in the
        status; not tried again)."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO hl7_messages (control_id, destination, job_id, study_uid, "
                "state, last_error, next_try_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'failed', ?, ?, ?, ?)",
                (control_id, destination, job_id, study_uid, error, now, now, now))
            return cursor.rowcount == 1

    def due_hl7_messages(self, destination: str, now: float, limit: int = 50
                         ) -> list[DueMessage]:
        """Pending messages to ``destination`` due at ``now``, in the order recorded."""
        with self.reading() as db:
            rows = db.execute(
                "SELECT control_id, destination, job_id, study_uid, message, attempts "
                "FROM hl7_messages WHERE destination = ? AND state = 'pending' "
                "AND next_try_at <= ? AND message IS NOT NULL ORDER BY rowid LIMIT ?",
                (destination, now, limit)).fetchall()
        return [DueMessage(**dict(row)) for row in rows]

    def hl7_next_try_at(self, destinations: Sequence[str]) -> float | None:
        """The earliest next try of a pending message to one of ``destinations``."""
        if not destinations:
            return None
        marks = ", ".join("?" for _ in destinations)
        with self.reading() as db:
            row = db.execute(
                "SELECT min(next_try_at) FROM hl7_messages WHERE state = 'pending' "
                f"AND destination IN ({marks})", tuple(destinations)).fetchone()
        return None if row[0] is None else float(row[0])

    def record_hl7_try(self, outcome: MessageOutcome, now: float) -> bool:
        """Record one try (one more attempt) of a pending message; False when it is not
        pending any more."""
        with self.transaction() as db:
            if outcome.sent:
                cursor = db.execute(
                    "UPDATE hl7_messages SET state = 'sent', attempts = attempts + 1, "
                    "message = NULL, last_ack_code = ?, last_error = NULL, last_try_at = ?, "
                    "sent_at = ?, updated_at = ? WHERE control_id = ? AND destination = ? "
                    "AND state = 'pending'",
                    (outcome.ack_code, now, now, now, outcome.control_id, outcome.destination))
            else:
                cursor = db.execute(
                    "UPDATE hl7_messages SET state = ?, attempts = attempts + 1, "
                    "last_ack_code = ?, last_error = ?, last_try_at = ?, next_try_at = ?, "
                    "updated_at = ? WHERE control_id = ? AND destination = ? "
                    "AND state = 'pending'",
                    ("failed" if outcome.failed else "pending", outcome.ack_code, outcome.error,
                     now, outcome.next_try_at if outcome.next_try_at is not None else now, now,
                     outcome.control_id, outcome.destination))
            return cursor.rowcount == 1

    def requeue_failed_hl7(self, now: float, study_uid: str | None = None) -> int:
        """Queue failed messages again, due now, attempts reset (``qsmnode resend``), of one
        study or all: those that still have their text (rejected, or attempts used up) under
        the same control ID; one that could not be built is forgotten, so that the sender
        builds it again from its job (a fixed configuration, a fixed header) at its next pass.
        Returns how many."""
        if not self.hl7_available:
            return 0
        where, args = ("AND study_uid = ? ", (study_uid,)) if study_uid is not None else ("", ())
        with self.transaction() as db:
            again = int(db.execute(
                "UPDATE hl7_messages SET state = 'pending', attempts = 0, next_try_at = ?, "
                "updated_at = ? WHERE state = 'failed' AND message IS NOT NULL "
                f"{where}", (now, now, *args)).rowcount)
            rebuilt = int(db.execute(
                "DELETE FROM hl7_messages WHERE state = 'failed' AND message IS NULL "
                f"AND attempts = 0 {where}", args).rowcount)
            return again + rebuilt

    def hl7_messages(self, state: str | None = None, destination: str | None = None,
                     limit: int = 1000) -> list[MessageRecord]:
        """Messages (without their text), newest first."""
        if not self.hl7_available:
            return []
        clauses, args = [], []
        for clause, value in (("state = ?", state), ("destination = ?", destination)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.reading() as db:
            rows = db.execute(f"SELECT {', '.join(_RECORD_COLUMNS)} FROM hl7_messages{where} "
                              "ORDER BY rowid DESC LIMIT ?", (*args, limit)).fetchall()
        return [_record(row) for row in rows]

    def hl7_summary(self) -> list[HL7Summary]:
        """Per destination with messages (see :class:`HL7Summary`)."""
        if not self.hl7_available:
            return []
        with self.reading() as db:
            return summarize_hl7(db)
