"""The store's read-only queries: what the status readers show, each read from one snapshot.

The metrics (:mod:`qsmnode.node.metrics`), the health check and the status page
(:mod:`qsmnode.node.http`) read the store here, at request time, not from counts kept in memory:
:func:`read_store` opens the store **read-only** with its own SQLite connection
(``file:...?mode=ro``, ``PRAGMA query_only``), reads one consistent snapshot (one read
transaction) and closes it. A reader never blocks the node (WAL mode), never writes, and sees
what a restart would see.

A reader migrates nothing: a store written by an older qsmnode may lack the tables and columns
of later schema versions (:data:`~qsmnode.node.store.connection.MIGRATIONS`, where the schema
is written). What they would report is then left out (metrics) or ``None`` (shown as unavailable
on the status page), never an error.

- :func:`read_counts`: the counts the metrics and the status page's summary report
  (:class:`Counts`);
- :func:`read_status`: the status page's rows (:class:`Status`);
- :func:`readable_version`: the health check's read.

The store holds no patient names or IDs, and nothing here reads any.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsmnode.node.store.connection import SCHEMA_VERSION, STORE_FILENAME
from qsmnode.node.store.hl7 import HL7Summary, summarize_hl7
from qsmnode.node.store.records import (
    ACQUISITION_STATES,
    JOB_STATES,
    PRUNE_KINDS,
    PRUNE_REASONS,
    SEND_STATES,
    SERIES_STATES,
    result_notes,
)

PROCESSING_BUCKETS_S = (15.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds of the job run-time histogram, in seconds (the latency target is 2 minutes)."""

READ_TIMEOUT_S = 2.0
"""Longest wait for a lock on the store (a reader rarely waits in WAL mode)."""


class StoreUnavailable(Exception):
    """The store cannot be read (the message names the file and the problem)."""


def store_path(state_dir: Path | str) -> Path:
    """The store's file in ``state_dir``."""
    return Path(state_dir) / STORE_FILENAME


@contextmanager
def read_store(state_dir: Path | str) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the store of ``state_dir``, inside one read transaction (one
    consistent snapshot), closed afterwards. Raises :class:`StoreUnavailable` when the store is
    missing, unreadable, or newer than this qsmnode understands; SQLite errors while reading
    become :class:`StoreUnavailable` too."""
    path = store_path(state_dir)
    if not path.is_file():
        raise StoreUnavailable(f"{path}: no store here (has the node run yet?)")
    uri = f"{path.absolute().as_uri()}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=READ_TIMEOUT_S,
                             check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"{path}: {exc}") from exc
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA query_only = ON")
        db.execute("BEGIN")
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{path}: schema version {version} is newer than this qsmnode understands "
                f"({SCHEMA_VERSION})")
        yield db
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"{path}: {exc}") from exc
    finally:
        db.close()  # ends the read transaction


def schema_version(db: sqlite3.Connection) -> int:
    """The schema version of the snapshot (``PRAGMA user_version``)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def table_names(db: sqlite3.Connection) -> frozenset[str]:
    """The tables the store has (older schema versions lack some)."""
    return frozenset(row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'"))


def column_names(db: sqlite3.Connection, table: str) -> frozenset[str]:
    """The columns of ``table`` (empty when it is missing)."""
    return frozenset(row[1] for row in db.execute(f"PRAGMA table_info({table})"))


def readable_version(db: sqlite3.Connection) -> int:
    """The schema version, once the ``series`` table (in every version) could be read: what
    the health check asks of a snapshot."""
    version = schema_version(db)
    db.execute("SELECT count(*) FROM series").fetchone()
    return version


# --------------------------------------------------------------------------------------------
# Counts (the metrics and the status page's summary)


@dataclass(frozen=True)
class Processing:
    """Run times of the done jobs (their last attempt: ``finished_at - started_at``)."""

    count: int = 0
    sum_s: float = 0.0
    buckets: tuple[tuple[float, int], ...] = ()
    """(upper bound in seconds, jobs at most that long), cumulative, without +Inf."""
    last_s: float | None = None
    """The run time of the done job that finished last."""


@dataclass(frozen=True)
class Counts:
    """One snapshot of the store's counts. A dict is empty when its table is missing."""

    schema_version: int
    instances: int
    last_received_at: float | None
    series: dict[str, int]
    series_completed: int
    acquisitions: dict[str, int] = field(default_factory=dict)
    problems_open: int | None = None
    jobs: dict[str, int] = field(default_factory=dict)
    processing: Processing | None = None
    sends: dict[str, dict[str, int]] = field(default_factory=dict)
    """destination -> state -> count."""
    has_sends: bool = False
    retained_bytes: dict[str, int] = field(default_factory=dict)
    """kind (spool, outbox) -> bytes of the files kept; empty before version 4."""
    pruned_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    """(kind, reason) -> bytes removed by retention."""
    hl7: dict[str, dict[str, int]] | None = None
    """HL7 destination -> state -> ORU messages (None before version 6)."""


def _by_state(db: sqlite3.Connection, sql: str, states: tuple[str, ...]) -> dict[str, int]:
    found = {row[0]: int(row[1]) for row in db.execute(sql)}
    return {state: found.get(state, 0) for state in states}


def _processing(db: sqlite3.Connection) -> Processing:
    durations = [
        max(float(row[0]), 0.0) for row in db.execute(
            "SELECT finished_at - started_at FROM jobs WHERE state = 'done' "
            "AND started_at IS NOT NULL AND finished_at IS NOT NULL")
    ]
    last = db.execute(
        "SELECT finished_at - started_at FROM jobs WHERE state = 'done' "
        "AND started_at IS NOT NULL AND finished_at IS NOT NULL "
        "ORDER BY finished_at DESC, id DESC LIMIT 1").fetchone()
    buckets = tuple((bound, sum(1 for d in durations if d <= bound))
                    for bound in PROCESSING_BUCKETS_S)
    return Processing(len(durations), float(sum(durations)), buckets,
                      None if last is None else max(float(last[0]), 0.0))


def read_counts(db: sqlite3.Connection) -> Counts:
    """The counts of one snapshot (``db`` from :func:`read_store`)."""
    tables = table_names(db)
    instances = int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
    series = _by_state(db, "SELECT state, count(*) FROM series GROUP BY state", SERIES_STATES)
    last = db.execute("SELECT max(last_received_at) FROM series").fetchone()[0]
    completed = int(db.execute(
        "SELECT count(*) FROM series WHERE state = 'complete'").fetchone()[0])
    counts: dict[str, Any] = {}
    if "acquisitions" in tables:
        counts["acquisitions"] = _by_state(
            db, "SELECT state, count(*) FROM acquisitions GROUP BY state", ACQUISITION_STATES)
    if "problems" in tables:
        counts["problems_open"] = int(db.execute(
            "SELECT count(*) FROM problems WHERE resolved_at IS NULL").fetchone()[0])
    if "jobs" in tables:
        counts["jobs"] = _by_state(db, "SELECT state, count(*) FROM jobs GROUP BY state",
                                   JOB_STATES)
        counts["processing"] = _processing(db)
    if "sends" in tables:
        sends: dict[str, dict[str, int]] = {}
        for row in db.execute("SELECT destination, state, count(*) FROM sends "
                              "GROUP BY destination, state ORDER BY destination"):
            sends.setdefault(row[0], dict.fromkeys(SEND_STATES, 0))[row[1]] = int(row[2])
        counts["sends"] = sends
        counts["has_sends"] = True
    if "hl7_messages" in tables:
        hl7: dict[str, dict[str, int]] = {}
        for row in db.execute("SELECT destination, state, count(*) FROM hl7_messages "
                              "GROUP BY destination, state ORDER BY destination"):
            hl7.setdefault(row[0], dict.fromkeys(SEND_STATES, 0))[row[1]] = int(row[2])
        counts["hl7"] = hl7
    if "prunings" in tables:
        counts["retained_bytes"] = {
            kind: int(db.execute(f"SELECT coalesce(sum(size), 0) FROM {table} "
                                 "WHERE pruned_at IS NULL").fetchone()[0])
            for kind, table in (("spool", "instances"), ("outbox", "outbox"))}
        pruned = {(row[0], row[1]): int(row[2]) for row in db.execute(
            "SELECT kind, reason, sum(bytes) FROM prunings GROUP BY kind, reason")}
        counts["pruned_bytes"] = {(kind, reason): pruned.get((kind, reason), 0)
                                  for kind in PRUNE_KINDS for reason in PRUNE_REASONS}
    return Counts(
        schema_version=schema_version(db), instances=instances,
        last_received_at=None if last is None else float(last), series=series,
        series_completed=completed, **counts,
    )


# --------------------------------------------------------------------------------------------
# The status page's rows


@dataclass(frozen=True)
class StudyRow:
    """A study as a radiographer recognises it: accession number, study date and time,
    descriptions and the sending AE (empty before the study is grouped, or on an older store;
    never patient name, ID or birth date)."""

    study_uid: str
    first_received_at: float
    last_received_at: float
    instances: int
    series: int
    series_open: int
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    series_descriptions: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()


@dataclass(frozen=True)
class PassedOverRow:
    """A series the grouping passed over (plainly not a QSM candidate), and why."""

    study_uid: str
    series_number: int | None
    series_description: str
    reason: str


@dataclass(frozen=True)
class JobRow:
    """An acquisition and its job (``job_*`` None: it has none, e.g. ignored)."""

    acquisition_id: int
    study_uid: str
    series_numbers: tuple[int | None, ...]
    echoes: int | None
    acquisition_state: str
    reason: str | None
    created_at: float
    job_id: int | None
    job_state: str | None
    attempts: int | None
    started_at: float | None
    finished_at: float | None
    last_error: str | None
    follow_up: str | None = None
    """A done job's follow-up note (its comparison with earlier results), if it has one."""
    notes: tuple[str, ...] = ()
    """What a done job's result says beyond "done" (:func:`result_notes`): why QSM was not
    computed, why the M1 analysis did not run or is not reliable, the follow-up."""


@dataclass(frozen=True)
class ProblemRow:
    id: int
    study_uid: str
    reason: str
    created_at: float


@dataclass(frozen=True)
class DeliveryRow:
    destination: str
    pending: int
    sent: int
    failed: int
    last_sent_at: float | None
    next_try_at: float | None
    last_error: str | None
    last_error_at: float | None


@dataclass(frozen=True)
class Status:
    """What the status page shows. A list is None when its table is missing (older store)."""

    counts: Counts
    studies: list[StudyRow]
    jobs: list[JobRow] | None
    problems: list[ProblemRow] | None
    deliveries: list[DeliveryRow] | None
    passed_over: list[PassedOverRow] | None = None
    """None on a store without triage (before version 5)."""
    results: list[HL7Summary] | None = None
    """HL7 results to the RIS per destination; None before version 6."""
    failed_jobs: list[JobRow] | None = None
    """Failed jobs, most recently failed first (however old their acquisition: they stay
    until run again); None when the store has no jobs table."""


def _json_or_none(text: str | None) -> Any:
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def _plan(summary_text: str | None) -> tuple[tuple[int | None, ...], int | None]:
    """Series numbers and echo count from an acquisition's summary JSON (tolerant)."""
    try:
        summary = json.loads(summary_text or "{}")
    except ValueError:
        return (), None
    if not isinstance(summary, dict):
        return (), None
    numbers = summary.get("series_numbers") or ()
    echoes = summary.get("n_echoes")
    return (tuple(n if isinstance(n, int) else None for n in numbers)
            if isinstance(numbers, list) else (),
            echoes if isinstance(echoes, int) else None)


def read_status(db: sqlite3.Connection, limit: int = 25,
                failed_limit: int = 100) -> Status:
    """The status page's rows from one snapshot: the ``limit`` most recent studies,
    acquisitions with their jobs, and open problems, newest first; up to ``failed_limit``
    failed jobs, most recently failed first; and per-destination delivery."""
    tables = table_names(db)
    studies = [
        StudyRow(row[0], float(row[1]), float(row[2]), int(row[3]), int(row[4]), int(row[5]))
        for row in db.execute(
            "SELECT study_uid, min(first_received_at), max(last_received_at), "
            "sum(received_count), count(*), sum(state = 'open') FROM series "
            "GROUP BY study_uid ORDER BY max(last_received_at) DESC LIMIT ?", (limit,))
    ]
    jobs = failed_jobs = None
    if {"acquisitions", "jobs"} <= tables:
        jobs = _job_rows(db, "", "a.id DESC", limit)
        failed_jobs = _job_rows(db, "WHERE j.state = 'failed'",
                                "coalesce(j.finished_at, j.updated_at) DESC, j.id DESC",
                                failed_limit)
    problems = None
    if "problems" in tables:
        problems = [
            ProblemRow(int(row[0]), row[1], row[2], float(row[3]))
            for row in db.execute(
                "SELECT id, study_uid, reason, created_at FROM problems "
                "WHERE resolved_at IS NULL ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        ]
    deliveries = None
    if "sends" in tables:
        deliveries = []
        tried = "last_try_at" if "last_try_at" in column_names(db, "sends") else "updated_at"
        for row in db.execute(
                "SELECT destination, sum(state = 'pending'), sum(state = 'sent'), "
                "sum(state = 'failed'), max(sent_at), "
                "min(CASE WHEN state = 'pending' THEN next_try_at END) "
                "FROM sends GROUP BY destination ORDER BY destination"):
            error = db.execute(
                f"SELECT last_error, {tried} FROM sends WHERE destination = ? "
                "AND state != 'sent' AND last_error IS NOT NULL "
                f"ORDER BY {tried} DESC LIMIT 1", (row[0],)).fetchone()
            deliveries.append(DeliveryRow(
                row[0], int(row[1]), int(row[2]), int(row[3]), row[4], row[5],
                None if error is None else error[0], None if error is None else error[1]))
    studies = _recognisable(db, tables, studies)
    passed_over = None
    if "passed_over" in column_names(db, "series"):
        passed_over = [
            PassedOverRow(row[0], row[1], row[2] or "", row[3])
            for row in db.execute(
                "SELECT study_uid, series_number, series_description, passed_over FROM series "
                "WHERE passed_over IS NOT NULL ORDER BY last_received_at DESC, series_number "
                "LIMIT ?", (limit * 20,))
        ]
    results = summarize_hl7(db) if "hl7_messages" in tables else None
    return Status(read_counts(db), studies, jobs, problems, deliveries, passed_over, results,
                  failed_jobs)


def _job_rows(db: sqlite3.Connection, where: str, order: str, limit: int) -> list[JobRow]:
    """Acquisitions with their jobs (``where`` and ``order`` are SQL over ``a`` and ``j``)."""
    rows = []
    for row in db.execute(
            "SELECT a.id, a.study_uid, a.summary, a.state, a.reason, a.created_at, "
            "j.id, j.state, j.attempts, j.started_at, j.finished_at, j.last_error, "
            "json_extract(j.result, '$.m1.follow_up.note'), "
            "json_extract(j.result, '$.qsm_not_computed'), json_extract(j.result, '$.m1.error'), "
            "json_extract(j.result, '$.m1.flags') "
            f"FROM acquisitions a LEFT JOIN jobs j ON j.acquisition_id = a.id {where} "
            f"ORDER BY {order} LIMIT ?", (limit,)):
        numbers, echoes = _plan(row[2])
        notes = () if row[7] != "done" else result_notes({
            "qsm_not_computed": row[13],
            "m1": {"error": row[14], "flags": _json_or_none(row[15]),
                   "follow_up": {"note": row[12]}}})
        rows.append(JobRow(int(row[0]), row[1], numbers, echoes, row[3], row[4],
                           float(row[5]), row[6], row[7], row[8], row[9], row[10], row[11],
                           row[12], notes))
    return rows


def _recognisable(db: sqlite3.Connection, tables: frozenset[str],
                  studies: list[StudyRow]) -> list[StudyRow]:
    """The rows with what a radiographer recognises a study by: the ``studies`` table's
    accession number, date, time and description (version 5), the series descriptions and
    the sending AE titles."""
    if not studies:
        return studies
    uids = [s.study_uid for s in studies]
    marks = ", ".join("?" for _ in uids)
    info: dict[str, tuple[str, str, str, str]] = {}
    if "studies" in tables:
        for row in db.execute(
                "SELECT study_uid, accession_number, study_date, study_time, "
                f"study_description FROM studies WHERE study_uid IN ({marks})", uids):
            info[row[0]] = tuple(v or "" for v in row[1:])  # type: ignore[assignment]
    descriptions: dict[str, list[str]] = {}
    for row in db.execute(
            f"SELECT study_uid, series_description FROM series WHERE study_uid IN ({marks}) "
            "ORDER BY series_number", uids):
        if row[1] and row[1] not in descriptions.setdefault(row[0], []):
            descriptions[row[0]].append(row[1])
    senders: dict[str, set[str]] = {}
    for row in db.execute(
            f"SELECT DISTINCT study_uid, calling_ae FROM instances WHERE study_uid IN ({marks})",
            uids):
        senders.setdefault(row[0], set()).add(row[1])
    out = []
    for study in studies:
        accession, date, time_, description = info.get(study.study_uid, ("", "", "", ""))
        out.append(dataclasses.replace(
            study, accession_number=accession, study_date=date, study_time=time_,
            study_description=description,
            series_descriptions=tuple(descriptions.get(study.study_uid, ())),
            senders=tuple(sorted(senders.get(study.study_uid, ())))))
    return out
