"""The store: the node's durable state in one SQLite file (WAL mode) under the state directory.

Every state change is one transaction, committed with ``synchronous=FULL`` before the call
returns, so a change the caller was told about survives a crash or power loss. One exception:
a received instance whose spool file is already durable is recorded with ``synchronous=NORMAL``
(see :meth:`Store.add_instance`): the file is the durable record, and the node re-adds spool
files missing from the store when it starts.

Schema (version 6, in ``PRAGMA user_version``)::

    series(series_uid PK, study_uid, series_number, modality, sop_class_uid,
           series_description, expected_count, received_count,
           first_received_at, last_received_at, state 'open'|'complete', completed_at,
           opened_at, completed_count, completion 'count'|'quiet'|'max_wait', grouped_at,
           passed_over)
    studies(study_uid PK, accession_number, study_date, study_time, study_description,
            updated_at)
    instances(sop_instance_uid PK, sop_class_uid, study_uid, series_uid -> series,
              series_number, instance_number, number_of_frames, images_in_acquisition,
              transfer_syntax_uid, path, size, calling_ae, peer_address, received_at,
              pruned_at)
    acquisitions(id PK, study_uid, series_key UNIQUE, series_uids JSON,
                 state 'accepted'|'ignored', reason, summary JSON, created_at, updated_at)
    problems(id PK, study_uid, series_uids JSON, reason, created_at, resolved_at)
    jobs(id PK, acquisition_id UNIQUE -> acquisitions, state 'queued'|'running'|'done'|'failed',
         attempts, lease_owner, lease_expires_at, last_error, result JSON,
         created_at, updated_at, started_at, finished_at)
    outbox(sop_instance_uid PK, sop_class_uid, study_uid, series_uid, transfer_syntax_uid,
           series_number, modality, job_id -> jobs, path UNIQUE, size, created_at, pruned_at)
    sends(sop_instance_uid -> outbox, destination, state 'pending'|'sent'|'failed', attempts,
          next_try_at, last_status, last_error, last_try_at, sent_at, created_at, updated_at;
          PK (sop_instance_uid, destination))
    prunings(id PK, study_uid, kind 'spool'|'outbox', reason 'age'|'emergency', instances,
             bytes, at)
    hl7_destinations(name PK, since)
    hl7_messages(control_id, destination, job_id -> jobs, study_uid, message, notes JSON,
                 abnormal, state 'pending'|'sent'|'failed', attempts, next_try_at,
                 last_ack_code, last_error, last_try_at, sent_at, created_at, updated_at;
                 PK (control_id, destination), UNIQUE (job_id, destination))

Times are Unix seconds (float). ``instances.path`` is relative to the state directory.
``received_count`` counts distinct instances; a late instance of a complete series updates
``last_received_at`` and ``received_count`` (so ``received_count > completed_count``) but leaves
the state to the tracker, which re-opens the series.

Series (version 2 columns): ``opened_at`` is when the series (re)opened (NULL: its first
instance), ``completed_count`` the instance count when it was closed, ``completion`` why it was
closed, and ``grouped_at`` when its study was last grouped into acquisitions (NULL: not yet).

Acquisitions: one row per distinct set of series (``series_key``: the sorted series UIDs joined
by ``\\``), so the same acquisition is never recorded, nor processed, twice. ``summary`` holds
the plan: series UIDs and numbers, echo count, echo times, shape, affine, vendor, field
strength. ``state`` is ``accepted`` (it has a job) or ``ignored`` (a rule left it out;
``reason`` says which). Problems are images that make no acquisition, with a plain-language
reason; a later grouping of the same study that no longer finds one sets its ``resolved_at``.

Jobs: one per accepted acquisition. A worker claims a queued job in one transaction (state
``running``, ``attempts + 1``, ``lease_owner``, ``lease_expires_at``); the attempt ends in
``done`` (with ``result``), back in ``queued`` (failed, attempts left) or ``failed`` (the last
error kept in ``last_error``). :meth:`Store.requeue_orphaned_jobs` hands the running jobs of a
dead owner back to the queue, once per crash.

Outbox and sends (version 3): one ``outbox`` row per derived instance written to
``<state_dir>/outbox`` (``path`` relative to the state directory; ``job_id`` the job that made
it), and one ``sends`` row per instance and configured destination. The rows of a job's outbox
and their sends are recorded in the transaction that marks the job done
(:meth:`Store.finish_job`), so a job is never done without its results queued. A send is
``pending`` until the destination confirms it (``sent``, with ``sent_at`` and the DIMSE
``last_status``) or its attempts run out (``failed``); ``attempts`` counts the tries made,
``next_try_at`` is when the sender may try again, ``last_error`` says why the last try failed.
An instance recorded again (the job ran again: deterministic UIDs give the same instance) keeps
its sends, except that ``failed`` ones are queued again. :meth:`Store.requeue_sends` is what
``qsmnode resend`` changes.

Retention (version 4): when the files of a finished, delivered study are removed
(:mod:`qsmnode.node.retention`), its ``instances`` or ``outbox`` rows are kept with
``pruned_at`` set, and a ``prunings`` row records what went, why and when
(:meth:`Store.prune_study`). Pruned rows are left out of :meth:`Store.instance_paths` and
:meth:`Store.outbox_paths` (what the recoveries at start compare with the files) and of
``qsmnode resend``; an instance received again after its file was pruned is recorded again.

Audit: with an :class:`~qsmnode.node.audit.AuditLog`, the store writes an event after each
commit of a received instance, a series completed, a grouping (acquisitions, problems), and a
job started, done, failed or queued again.

Triage and studies (version 5): ``series.passed_over`` is why the grouping passed a series
over (plainly not a QSM candidate: not a problem, holds no images), NULL otherwise; ``studies``
holds what a study is recognised by in status displays (accession number, study date and time,
study description; never patient data), written when the study is grouped.

HL7 results (version 6): ``hl7_messages`` holds one ORU^R01 per done job and configured
``[[hl7.destinations]]`` entry (:mod:`qsmnode.node.hl7_queue`): its deterministic message
control ID, the ER7 text (cleared once the RIS acknowledged it, so that no patient data stays
longer than needed), ``notes`` (JSON list of plain remarks: no accession number, not
assessable, ...), ``abnormal`` (the worst abnormal flag, or NULL) and the delivery state like
``sends``, with ``last_ack_code`` (AA, AE, AR) from the RIS. ``hl7_destinations`` records when
each HL7 destination was first configured: results finished before then are not sent to it.

Later schema versions append to :data:`MIGRATIONS`; opening a store applies the missing ones,
each in one transaction. The API is small and has no ORM: records in, records out.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qsmnode.node.audit import NULL_AUDIT, AuditLog

STORE_FILENAME = "qsmnode.sqlite3"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE series (
        series_uid         TEXT PRIMARY KEY,
        study_uid          TEXT NOT NULL,
        series_number      INTEGER,
        modality           TEXT,
        sop_class_uid      TEXT NOT NULL,
        series_description TEXT,
        expected_count     INTEGER,
        received_count     INTEGER NOT NULL DEFAULT 0,
        first_received_at  REAL NOT NULL,
        last_received_at   REAL NOT NULL,
        state              TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'complete')),
        completed_at       REAL
    );
    CREATE INDEX series_study ON series (study_uid);
    CREATE INDEX series_state ON series (state);
    CREATE TABLE instances (
        sop_instance_uid      TEXT PRIMARY KEY,
        sop_class_uid         TEXT NOT NULL,
        study_uid             TEXT NOT NULL,
        series_uid            TEXT NOT NULL REFERENCES series (series_uid),
        series_number         INTEGER,
        instance_number       INTEGER,
        number_of_frames      INTEGER,
        images_in_acquisition INTEGER,
        transfer_syntax_uid   TEXT NOT NULL,
        path                  TEXT NOT NULL UNIQUE,
        size                  INTEGER NOT NULL,
        calling_ae            TEXT NOT NULL,
        peer_address          TEXT NOT NULL,
        received_at           REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances (series_uid);
    """,
    """
    ALTER TABLE series ADD COLUMN opened_at REAL;
    ALTER TABLE series ADD COLUMN completed_count INTEGER;
    ALTER TABLE series ADD COLUMN completion TEXT
        CHECK (completion IN ('count', 'quiet', 'max_wait'));
    ALTER TABLE series ADD COLUMN grouped_at REAL;
    CREATE INDEX instances_study ON instances (study_uid);
    CREATE TABLE acquisitions (
        id           INTEGER PRIMARY KEY,
        study_uid    TEXT NOT NULL,
        series_key   TEXT NOT NULL UNIQUE,
        series_uids  TEXT NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('accepted', 'ignored')),
        reason       TEXT,
        summary      TEXT NOT NULL,
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL
    );
    CREATE INDEX acquisitions_study ON acquisitions (study_uid);
    CREATE TABLE problems (
        id           INTEGER PRIMARY KEY,
        study_uid    TEXT NOT NULL,
        series_uids  TEXT NOT NULL,
        reason       TEXT NOT NULL,
        created_at   REAL NOT NULL,
        resolved_at  REAL
    );
    CREATE INDEX problems_study ON problems (study_uid);
    CREATE TABLE jobs (
        id               INTEGER PRIMARY KEY,
        acquisition_id   INTEGER NOT NULL UNIQUE REFERENCES acquisitions (id),
        state            TEXT NOT NULL DEFAULT 'queued'
                         CHECK (state IN ('queued', 'running', 'done', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        lease_owner      TEXT,
        lease_expires_at REAL,
        last_error       TEXT,
        result           TEXT,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        started_at       REAL,
        finished_at      REAL
    );
    CREATE INDEX jobs_state ON jobs (state);
    """,
    """
    CREATE TABLE outbox (
        sop_instance_uid    TEXT PRIMARY KEY,
        sop_class_uid       TEXT NOT NULL,
        study_uid           TEXT NOT NULL,
        series_uid          TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        series_number       INTEGER,
        modality            TEXT,
        job_id              INTEGER REFERENCES jobs (id),
        path                TEXT NOT NULL UNIQUE,
        size                INTEGER NOT NULL,
        created_at          REAL NOT NULL
    );
    CREATE INDEX outbox_study ON outbox (study_uid);
    CREATE INDEX outbox_job ON outbox (job_id);
    CREATE TABLE sends (
        sop_instance_uid TEXT NOT NULL REFERENCES outbox (sop_instance_uid),
        destination      TEXT NOT NULL,
        state            TEXT NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'sent', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_try_at      REAL NOT NULL,
        last_status      INTEGER,
        last_error       TEXT,
        last_try_at      REAL,
        sent_at          REAL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        PRIMARY KEY (sop_instance_uid, destination)
    );
    CREATE INDEX sends_due ON sends (state, next_try_at);
    CREATE INDEX sends_destination ON sends (destination, state);
    """,
    """
    ALTER TABLE instances ADD COLUMN pruned_at REAL;
    ALTER TABLE outbox ADD COLUMN pruned_at REAL;
    CREATE TABLE prunings (
        id         INTEGER PRIMARY KEY,
        study_uid  TEXT NOT NULL,
        kind       TEXT NOT NULL CHECK (kind IN ('spool', 'outbox')),
        reason     TEXT NOT NULL CHECK (reason IN ('age', 'emergency')),
        instances  INTEGER NOT NULL,
        bytes      INTEGER NOT NULL,
        at         REAL NOT NULL
    );
    CREATE INDEX prunings_study ON prunings (study_uid);
    CREATE INDEX outbox_pruned ON outbox (pruned_at);
    """,
    """
    ALTER TABLE series ADD COLUMN passed_over TEXT;
    CREATE TABLE studies (
        study_uid          TEXT PRIMARY KEY,
        accession_number   TEXT,
        study_date         TEXT,
        study_time         TEXT,
        study_description  TEXT,
        updated_at         REAL NOT NULL
    );
    """,
    """
    CREATE TABLE hl7_destinations (
        name        TEXT PRIMARY KEY,
        since       REAL NOT NULL
    );
    CREATE TABLE hl7_messages (
        control_id       TEXT NOT NULL,
        destination      TEXT NOT NULL,
        job_id           INTEGER NOT NULL REFERENCES jobs (id),
        study_uid        TEXT NOT NULL,
        message          TEXT,
        notes            TEXT NOT NULL DEFAULT '[]',
        abnormal         TEXT,
        state            TEXT NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'sent', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_try_at      REAL NOT NULL,
        last_ack_code    TEXT,
        last_error       TEXT,
        last_try_at      REAL,
        sent_at          REAL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        PRIMARY KEY (control_id, destination),
        UNIQUE (job_id, destination)
    );
    CREATE INDEX hl7_messages_due ON hl7_messages (state, next_try_at);
    CREATE INDEX hl7_messages_study ON hl7_messages (study_uid);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be opened or used (the message names the file and the problem)."""


class _Record:
    """Mixin of the record dataclasses: :meth:`as_dict` gives JSON-ready fields."""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dictionary (tuples as lists), for JSON and status displays."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}


@dataclass(frozen=True)
class InstanceRecord(_Record):
    """One received instance, as recorded. ``path`` is relative to the state directory."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    calling_ae: str
    peer_address: str
    received_at: float
    series_number: int | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None
    images_in_acquisition: int | None = None
    modality: str | None = None
    series_description: str | None = None


@dataclass(frozen=True)
class SeriesRecord(_Record):
    """One series as recorded."""

    series_uid: str
    study_uid: str
    series_number: int | None
    modality: str | None
    sop_class_uid: str
    series_description: str | None
    expected_count: int | None
    received_count: int
    first_received_at: float
    last_received_at: float
    state: str
    completed_at: float | None
    opened_at: float | None = None
    completed_count: int | None = None
    completion: str | None = None
    grouped_at: float | None = None
    passed_over: str | None = None
    """Why the grouping passed the series over (plainly not a QSM candidate; not a problem),
    or None."""


@dataclass(frozen=True)
class StudyInfo(_Record):
    """What a radiographer recognises a study by (never the patient's name, ID or birth
    date): from the headers, recorded when the study is grouped. Empty strings where the
    headers have nothing."""

    study_uid: str
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class AcquisitionRecord(_Record):
    """One recorded acquisition: its series, whether it is processed, and its plan summary."""

    id: int
    study_uid: str
    series_uids: tuple[str, ...]
    state: str
    reason: str | None
    summary: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ProblemRecord(_Record):
    """Images of a study that make no acquisition, and why (plain language)."""

    id: int
    study_uid: str
    series_uids: tuple[str, ...]
    reason: str
    created_at: float
    resolved_at: float | None


@dataclass(frozen=True)
class JobRecord(_Record):
    """One job: the processing of one accepted acquisition."""

    id: int
    acquisition_id: int
    state: str
    attempts: int
    lease_owner: str | None
    lease_expires_at: float | None
    last_error: str | None
    result: dict[str, Any] | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class NewAcquisition:
    """An acquisition found by the grouping, to record (``ignored_reason``: left out by a rule)."""

    study_uid: str
    series_uids: tuple[str, ...]
    summary: dict[str, Any]
    ignored_reason: str | None = None


@dataclass(frozen=True)
class NewProblem:
    """A problem found by the grouping, to record."""

    study_uid: str
    series_uids: tuple[str, ...]
    reason: str


@dataclass
class GroupingOutcome:
    """What :meth:`Store.record_grouping` changed."""

    created: list[AcquisitionRecord] = field(default_factory=list)
    """Acquisitions recorded now (new, or an ignored one now accepted)."""
    jobs: list[JobRecord] = field(default_factory=list)
    """Jobs queued now, one per newly accepted acquisition."""
    known: list[AcquisitionRecord] = field(default_factory=list)
    """Acquisitions found again (same series): nothing changed, no second job."""
    new_problems: list[ProblemRecord] = field(default_factory=list)
    resolved_problems: list[ProblemRecord] = field(default_factory=list)


@dataclass(frozen=True)
class StudyReady:
    """A study whose series are all complete and some not grouped yet."""

    study_uid: str
    instance_count: int
    last_received_at: float
    opened_at: float
    """The latest time a series of the study (re)opened."""


@dataclass(frozen=True)
class OutboxRecord(_Record):
    """One derived instance in the outbox. ``path`` is relative to the state directory."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    created_at: float
    series_number: int | None = None
    modality: str | None = None
    job_id: int | None = None


@dataclass(frozen=True)
class SendRecord(_Record):
    """The delivery of one outbox instance to one destination."""

    sop_instance_uid: str
    destination: str
    state: str
    attempts: int
    next_try_at: float
    last_status: int | None
    last_error: str | None
    last_try_at: float | None
    sent_at: float | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class DueSend:
    """A pending send whose time has come, with what the sender needs from the outbox."""

    sop_instance_uid: str
    destination: str
    attempts: int
    """Tries made so far."""
    sop_class_uid: str
    transfer_syntax_uid: str
    study_uid: str
    series_uid: str
    path: str


@dataclass(frozen=True)
class SendOutcome:
    """The result of one try of a send, to record.

    ``sent``: the destination confirmed it (``status`` success or warning). Otherwise
    ``error`` says why, and the send waits until ``next_try_at``, or is ``failed`` when
    ``give_up`` (its attempts are used up).
    """

    sop_instance_uid: str
    destination: str
    sent: bool
    status: int | None = None
    error: str | None = None
    next_try_at: float | None = None
    give_up: bool = False


@dataclass(frozen=True)
class DestinationSummary(_Record):
    """The delivery state of one destination, for status displays."""

    destination: str
    pending: int = 0
    sent: int = 0
    failed: int = 0
    attempts: int = 0
    """Tries made, all sends together."""
    retries: int = 0
    """Tries beyond the first, all sends together."""
    max_attempts: int = 0
    """The most tries one send has needed so far."""
    next_try_at: float | None = None
    """The earliest retry of a pending send."""
    last_sent_at: float | None = None
    last_error: str | None = None
    """The error of the latest failed try of a send not delivered yet."""
    last_error_at: float | None = None


@dataclass(frozen=True)
class StudyRetention(_Record):
    """A study whose work is finished, so that retention may remove its files (see
    :meth:`Store.finished_studies`), with what it still keeps on disk."""

    study_uid: str
    settled_at: float
    """Its latest event: an instance received, grouping, a job's end, a send."""
    spool_instances: int
    spool_bytes: int
    outbox_instances: int
    outbox_bytes: int
    spool_held: str = ""
    """Why its received images must stay although its work is finished ("" when they may go):
    an unresolved problem or a failed job (see :meth:`Store.prune_study`)."""


@dataclass(frozen=True)
class Pruning(_Record):
    """Files of one study removed by retention (``kind`` spool or outbox, ``reason`` age or
    emergency). ``paths`` (relative to the state directory) and ``job_ids`` (whose work
    folders go with the spool) are given by :meth:`Store.prune_study`, not kept."""

    id: int
    study_uid: str
    kind: str
    reason: str
    instances: int
    bytes: int
    at: float
    paths: tuple[str, ...] = ()
    job_ids: tuple[int, ...] = ()


PRUNE_KINDS = ("spool", "outbox")
PRUNE_REASONS = ("age", "emergency")
ACQUISITION_STATES = ("accepted", "ignored")
JOB_STATES = ("queued", "running", "done", "failed")
SEND_STATES = ("pending", "sent", "failed")

_INSTANCE_COLUMNS = tuple(
    f.name for f in fields(InstanceRecord) if f.name not in ("modality", "series_description")
)
_SERIES_COLUMNS = tuple(f.name for f in fields(SeriesRecord))
_SERIES_COLUMNS_V1 = _SERIES_COLUMNS[:12]
_SERIES_COLUMNS_V2 = _SERIES_COLUMNS[:16]
_JOB_COLUMNS = tuple(f.name for f in fields(JobRecord))
_OUTBOX_COLUMNS = tuple(f.name for f in fields(OutboxRecord))
_SEND_COLUMNS = tuple(f.name for f in fields(SendRecord))


def series_key(series_uids: tuple[str, ...] | list[str]) -> str:
    """The identity of an acquisition: its sorted, distinct series UIDs joined by a backslash."""
    return "\\".join(sorted(set(series_uids)))


def study_when(date: str, time_: str) -> str:
    """StudyDate and StudyTime (DICOM DA/TM) as ``2022-07-11 12:05`` (as given when they are
    not in the DICOM form; empty when absent)."""
    day = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else date
    hhmm = time_[:4]
    clock = f"{hhmm[:2]}:{hhmm[2:]}" if len(hhmm) == 4 and hhmm.isdigit() else time_
    return " ".join(part for part in (day, clock) if part)


def series_numbers_text(numbers: Any) -> str:
    """``5, 6`` (``?`` for a series without a number)."""
    return ", ".join("?" if n is None else str(n) for n in numbers)


def describe_summary(summary: dict[str, Any]) -> str:
    """An acquisition's plan summary in one line (logs and status): series, echoes, TEs,
    shape, vendor and field strength."""
    tes = ", ".join(f"{t * 1000:g}" for t in summary.get("echo_times_s", ()))
    shape = "×".join(str(n) for n in summary.get("shape", ()))
    b0 = summary.get("field_strength_t")
    field_text = "" if b0 is None else f" {b0:g} T"
    description = summary.get("series_description") or ""
    return (f"series {series_numbers_text(summary.get('series_numbers', ()))}"
            f"{f' {description!r}' if description else ''}, {summary.get('n_echoes')} echoes "
            f"(TE {tes} ms), {shape}, {summary.get('vendor')}{field_text}")


def _acquisition(row: sqlite3.Row) -> AcquisitionRecord:
    return AcquisitionRecord(
        id=int(row["id"]), study_uid=row["study_uid"],
        series_uids=tuple(json.loads(row["series_uids"])), state=row["state"],
        reason=row["reason"], summary=json.loads(row["summary"]),
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


def _problem(row: sqlite3.Row) -> ProblemRecord:
    return ProblemRecord(
        id=int(row["id"]), study_uid=row["study_uid"],
        series_uids=tuple(json.loads(row["series_uids"])), reason=row["reason"],
        created_at=row["created_at"], resolved_at=row["resolved_at"],
    )


def _job(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["result"] = None if values["result"] is None else json.loads(values["result"])
    return JobRecord(**values)


class Store:
    """The SQLite store. Thread-safe: one connection, serialised by a lock.

    ``readonly=True`` opens an existing store without writing (no migrations), for status
    readers running beside the node. ``audit``: where the state changes are also written as
    events, after their commit (:mod:`qsmnode.node.audit`; by default nowhere).
    """

    def __init__(self, path: Path, *, readonly: bool = False,
                 audit: AuditLog = NULL_AUDIT) -> None:
        self.path = Path(path)
        self.audit = audit
        self._lock = threading.RLock()
        try:
            if readonly:
                if not self.path.is_file():
                    raise StoreError(f"{self.path}: no store here (has the node run yet?)")
                uri = f"{self.path.absolute().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                           check_same_thread=False, timeout=10.0)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, isolation_level=None,
                                           check_same_thread=False, timeout=10.0)
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.row_factory = sqlite3.Row
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this qsmnode "
                    f"understands ({SCHEMA_VERSION}); upgrade qsmnode"
                )
            if not readonly:
                self._migrate(version)
                version = SCHEMA_VERSION
            self._version = version
            self._series_columns = (_SERIES_COLUMNS if version >= 5 else _SERIES_COLUMNS_V2
                                    if version >= 2 else _SERIES_COLUMNS_V1)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, readonly: bool = False,
                     audit: AuditLog = NULL_AUDIT) -> Store:
        """The store of a node whose state directory is ``state_dir``."""
        return cls(Path(state_dir) / STORE_FILENAME, readonly=readonly, audit=audit)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # a failed COMMIT (disk full, I/O error, busy) may leave the transaction open,
                # and every later BEGIN would then fail: end it here, whatever happened
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, held for reads (no transaction is opened): for modules that keep
        their own tables here (:mod:`qsmnode.node.hl7_queue`)."""
        with self._lock:
            yield self._db

    @property
    def version(self) -> int:
        """The schema version of the open store (older when opened read-only)."""
        return self._version

    def _migrate(self, version: int) -> None:
        for number in range(version, SCHEMA_VERSION):
            with self.transaction() as db:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")

    # ---------------------------------------------------------------------------------- instances

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
                f"INSERT OR IGNORE INTO instances ({', '.join(_INSTANCE_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _INSTANCE_COLUMNS)})",
                tuple(getattr(record, name) for name in _INSTANCE_COLUMNS),
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
                f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        return None if row is None else InstanceRecord(**dict(row))

    def instances(self, series_uid: str | None = None) -> list[InstanceRecord]:
        """Recorded instances, of one series or all, in order of arrival."""
        sql = f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances"
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
        columns = ", ".join(f"s.{c}" for c in _SERIES_COLUMNS)
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
        columns = ", ".join(_SERIES_COLUMNS)
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
                f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances WHERE study_uid = ? "
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

    # ------------------------------------------------------------------ acquisitions and problems

    def record_grouping(self, study_uid: str, instance_count: int,
                        acquisitions: list[NewAcquisition], problems: list[NewProblem],
                        at: float, passed_over: dict[str, str] | None = None,
                        study: StudyInfo | None = None) -> GroupingOutcome | None:
        """Record the grouping of one study in one transaction; None (nothing changed) when the
        study changed since it was read: a series (re)opened or the instance count differs.

        - An acquisition whose series are already recorded is left as it is (no second job),
          unless it was ignored and is now accepted: then it is accepted and gets its job.
        - A new accepted acquisition gets a queued job.
        - Problems already recorded (same series, same reason) stay; unresolved problems of the
          study not found again get ``resolved_at``.
        - Every complete series of the study is marked grouped; ``passed_over`` (series UID
          -> reason) is recorded on its series, and cleared on the study's other series.
        - ``study``: what the study is recognised by (accession number, date, description).
        """
        outcome = GroupingOutcome()
        with self.transaction() as db:
            open_, count = db.execute(
                "SELECT coalesce(sum(state = 'open'), 0), coalesce(sum(received_count), 0) "
                "FROM series WHERE study_uid = ?",
                (study_uid,),
            ).fetchone()
            if open_ or count != instance_count:
                return None
            for new in acquisitions:
                self._record_acquisition(db, new, at, outcome)
            unresolved = [
                _problem(row) for row in db.execute(
                    "SELECT * FROM problems WHERE study_uid = ? AND resolved_at IS NULL "
                    "ORDER BY id", (study_uid,))
            ]
            found = {(tuple(p.series_uids), p.reason) for p in problems}
            for old in unresolved:
                if (old.series_uids, old.reason) not in found:
                    db.execute("UPDATE problems SET resolved_at = ? WHERE id = ?", (at, old.id))
                    outcome.resolved_problems.append(old)
            known = {(p.series_uids, p.reason) for p in unresolved}
            for problem in problems:
                if (tuple(problem.series_uids), problem.reason) in known:
                    continue
                cursor = db.execute(
                    "INSERT INTO problems (study_uid, series_uids, reason, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (problem.study_uid, json.dumps(list(problem.series_uids)), problem.reason,
                     at),
                )
                known.add((tuple(problem.series_uids), problem.reason))
                outcome.new_problems.append(ProblemRecord(
                    int(cursor.lastrowid or 0), problem.study_uid, tuple(problem.series_uids),
                    problem.reason, at, None))
            db.execute(
                "UPDATE series SET grouped_at = ?, passed_over = NULL WHERE study_uid = ? "
                "AND state = 'complete'",
                (at, study_uid),
            )
            for series_uid, reason in (passed_over or {}).items():
                db.execute("UPDATE series SET passed_over = ? WHERE series_uid = ?",
                           (reason, series_uid))
            if study is not None:
                db.execute(
                    "INSERT OR REPLACE INTO studies (study_uid, accession_number, study_date, "
                    "study_time, study_description, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (study.study_uid, study.accession_number, study.study_date,
                     study.study_time, study.study_description, at))
        self._audit_grouping(outcome)
        return outcome

    def _audit_grouping(self, outcome: GroupingOutcome) -> None:
        jobs = {job.acquisition_id: job.id for job in outcome.jobs}
        for acquisition in outcome.created:
            self.audit.record(
                "acquisition_grouped", study_uid=acquisition.study_uid,
                acquisition_id=acquisition.id, series_uids=list(acquisition.series_uids),
                state=acquisition.state, reason=acquisition.reason,
                job_id=jobs.get(acquisition.id))
        for event, problems in (("problem_recorded", outcome.new_problems),
                                ("problem_resolved", outcome.resolved_problems)):
            for problem in problems:
                self.audit.record(event, study_uid=problem.study_uid, problem_id=problem.id,
                                  series_uids=list(problem.series_uids), reason=problem.reason)

    def _record_acquisition(self, db: sqlite3.Connection, new: NewAcquisition, at: float,
                            outcome: GroupingOutcome) -> None:
        key = series_key(new.series_uids)
        state = "accepted" if new.ignored_reason is None else "ignored"
        row = db.execute("SELECT * FROM acquisitions WHERE series_key = ?", (key,)).fetchone()
        if row is not None and not (row["state"] == "ignored" and state == "accepted"):
            outcome.known.append(_acquisition(row))
            return
        summary = json.dumps(new.summary)
        if row is None:
            cursor = db.execute(
                "INSERT INTO acquisitions (study_uid, series_key, series_uids, state, reason, "
                "summary, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (new.study_uid, key, json.dumps(list(new.series_uids)), state,
                 new.ignored_reason, summary, at, at),
            )
            acquisition_id = int(cursor.lastrowid or 0)
        else:
            acquisition_id = int(row["id"])
            db.execute(
                "UPDATE acquisitions SET state = 'accepted', reason = NULL, summary = ?, "
                "updated_at = ? WHERE id = ?",
                (summary, at, acquisition_id),
            )
        record = _acquisition(
            db.execute("SELECT * FROM acquisitions WHERE id = ?", (acquisition_id,)).fetchone()
        )
        outcome.created.append(record)
        if state == "accepted":
            cursor = db.execute(
                "INSERT OR IGNORE INTO jobs (acquisition_id, created_at, updated_at) "
                "VALUES (?, ?, ?)",
                (acquisition_id, at, at),
            )
            if cursor.rowcount:
                outcome.jobs.append(_job(db.execute(
                    f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE acquisition_id = ?",
                    (acquisition_id,)).fetchone()))

    def acquisitions(self, study_uid: str | None = None) -> list[AcquisitionRecord]:
        """Recorded acquisitions (of one study, or all), in order of recording."""
        sql, args = "SELECT * FROM acquisitions", ()
        if study_uid is not None:
            sql, args = sql + " WHERE study_uid = ?", (study_uid,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [_acquisition(row) for row in rows]

    def acquisition(self, acquisition_id: int) -> AcquisitionRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM acquisitions WHERE id = ?",
                                   (acquisition_id,)).fetchone()
        return None if row is None else _acquisition(row)

    def studies(self) -> dict[str, StudyInfo]:
        """What each grouped study is recognised by (empty before version 5)."""
        if self._version < 5:
            return {}
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid, accession_number, study_date, study_time, "
                "study_description FROM studies").fetchall()
        return {row["study_uid"]: StudyInfo(**{k: row[k] or "" for k in row.keys()})
                for row in rows}

    def study_senders(self) -> dict[str, tuple[str, ...]]:
        """The calling AE titles that sent each study's instances, sorted."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT study_uid, calling_ae FROM instances").fetchall()
        senders: dict[str, set[str]] = {}
        for row in rows:
            senders.setdefault(row[0], set()).add(row[1])
        return {uid: tuple(sorted(aes)) for uid, aes in senders.items()}

    def problems(self, *, include_resolved: bool = False) -> list[ProblemRecord]:
        """Recorded problems, oldest first (by default only those not resolved since)."""
        sql = "SELECT * FROM problems"
        if not include_resolved:
            sql += " WHERE resolved_at IS NULL"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id").fetchall()
        return [_problem(row) for row in rows]

    # --------------------------------------------------------------------------------------- jobs

    def jobs(self, state: str | None = None) -> list[JobRecord]:
        """Jobs (all, or those in ``state``), oldest first."""
        sql, args = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs", ()
        if state is not None:
            sql, args = sql + " WHERE state = ?", (state,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [_job(row) for row in rows]

    def job(self, job_id: int) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        return None if row is None else _job(row)

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
            job = _job(db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?",
                                  (row["id"],)).fetchone())
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
            self._record_outbox(db, outbox, destinations, now)
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
            job = _job(db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone())
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
            jobs = [_job(db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?",
                                    (row["id"],)).fetchone()) for row in rows]
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
            jobs = [
                _job(db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?",
                                (job_id,)).fetchone())
                for job_id in ids
            ]
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
                f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances "
                f"WHERE series_uid IN ({marks}) ORDER BY received_at, rowid", uids).fetchall()
        return [InstanceRecord(**dict(r)) for r in rows]

    # ------------------------------------------------------------------------- outbox and sends

    def _record_outbox(self, db: sqlite3.Connection, records: Sequence[OutboxRecord],
                       destinations: Sequence[str], now: float) -> int:
        """Insert or refresh outbox rows and their sends; return how many sends were queued
        (new ones, and failed ones queued again)."""
        columns = ", ".join(_OUTBOX_COLUMNS)
        marks = ", ".join("?" for _ in _OUTBOX_COLUMNS)
        refresh = ", ".join([*(f"{c} = excluded.{c}" for c in _OUTBOX_COLUMNS
                               if c not in ("sop_instance_uid", "created_at")),
                             "pruned_at = NULL"])
        queued = 0
        for record in records:
            db.execute(
                f"INSERT INTO outbox ({columns}) VALUES ({marks}) "
                f"ON CONFLICT (sop_instance_uid) DO UPDATE SET {refresh}",
                tuple(getattr(record, c) for c in _OUTBOX_COLUMNS),
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

    def record_outbox(self, records: Sequence[OutboxRecord], destinations: Sequence[str],
                      now: float) -> int:
        """Record outbox instances, each with a pending send to every one of
        ``destinations``, in one transaction; return how many sends were queued."""
        with self.transaction() as db:
            return self._record_outbox(db, records, destinations, now)

    def outbox(self, study_uid: str | None = None, job_id: int | None = None
               ) -> list[OutboxRecord]:
        """Outbox instances (all, of a study, or of a job), in order of recording."""
        sql, clauses, args = f"SELECT {', '.join(_OUTBOX_COLUMNS)} FROM outbox", [], []
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
        columns = ", ".join(f"s.{c}" for c in _SEND_COLUMNS)
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

    # ---------------------------------------------------------------------------------- retention

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
