"""What the HTTP endpoint reports, read from the store at request time.

The node's state is in the store (:mod:`qsmnode.node.store`), so the metrics are not counted in
memory: every scrape, health check and status page opens the store **read-only** with its own
SQLite connection (``file:...?mode=ro``), reads one consistent snapshot (one read transaction)
and closes it. A reader never blocks the node (WAL mode), never writes, and sees what a restart
would see.

The SQL here is written against the schema in :mod:`qsmnode.node.store.connection` and only
reads. Tables added by later schema versions (``acquisitions``, ``problems`` and ``jobs`` in
version 2; ``outbox`` and ``sends`` in version 3) may be missing: what they would report is then
left out (metrics) or shown as unavailable (status page), never an error.

:class:`NodeCollector` is a ``prometheus_client`` custom collector; :func:`make_registry` puts
it into a private registry. The metrics:

- ``qsmnode_up`` (gauge): 1 when the store could be read, else 0 (then only the disk
  metrics and the version follow);
- ``qsmnode_build_info{version}`` (info): the qsmnode version;
- ``qsmnode_store_schema_version`` (gauge): ``PRAGMA user_version`` of the store;
- ``qsmnode_instances_received_total`` (counter): instances recorded in the store;
- ``qsmnode_last_instance_received_timestamp_seconds`` (gauge): when the latest one arrived;
- ``qsmnode_series{state}`` (gauge): series by state, ``open`` and ``complete``;
- ``qsmnode_series_completed_total`` (counter): series closed as complete;
- ``qsmnode_acquisitions{state}`` (gauge): ``accepted`` and ``ignored``;
- ``qsmnode_problems_open`` (gauge): unresolved problems;
- ``qsmnode_jobs{state}`` (gauge): ``queued``, ``running``, ``done``, ``failed``;
- ``qsmnode_job_processing_seconds`` (histogram: ``_bucket{le}``, ``_count``, ``_sum``): run
  time of the done jobs, ``finished_at - started_at`` of their successful attempt;
- ``qsmnode_job_last_processing_seconds`` (gauge): that of the job that finished last;
- ``qsmnode_sends{destination,state}`` (gauge): ``pending``, ``sent``, ``failed`` (only with
  a ``sends`` table);
- ``qsmnode_hl7_messages{destination,state}`` (gauge): HL7 ORU^R01 results to each RIS,
  ``pending``, ``sent``, ``failed`` (only with an ``hl7_messages`` table, version 6);
- ``qsmnode_retained_bytes{kind}`` (gauge): bytes of the files kept, ``spool`` and ``outbox``,
  and ``qsmnode_pruned_bytes_total{kind,reason}`` (counter): bytes removed by retention, by
  ``age`` or ``emergency`` (both only with a ``prunings`` table, version 4);
- ``qsmnode_free_disk_bytes`` (gauge): free space on the state directory's file system;
- ``qsmnode_min_free_disk_bytes`` (gauge): the floor, ``listener.min_free_disk_mb``.

The ``_total`` counters are counts of store rows: they only go down if rows are deleted (or a
late instance re-opens a complete series), which Prometheus treats as a counter reset.

:func:`read_status` gathers what the status page shows. The store holds no patient names or
IDs, and nothing here reads any.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from qsmnode import __version__
from qsmnode.node.store import SCHEMA_VERSION, STORE_FILENAME
from qsmnode.node.store.hl7 import HL7Summary, summarize_hl7

MIB = 1024 * 1024

SERIES_STATES = ("open", "complete")
ACQUISITION_STATES = ("accepted", "ignored")
JOB_STATES = ("queued", "running", "done", "failed")
SEND_STATES = ("pending", "sent", "failed")

PROCESSING_BUCKETS_S = (15.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds of the job run-time histogram, in seconds (the latency target is 2 minutes)."""

READ_TIMEOUT_S = 2.0
"""Longest wait for a lock on the store (a reader rarely waits in WAL mode)."""


class StoreUnavailable(Exception):
    """The store cannot be read (the message names the file and the problem)."""


def store_path(state_dir: Path | str) -> Path:
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
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def table_names(db: sqlite3.Connection) -> frozenset[str]:
    """The tables the store has (older schema versions lack some)."""
    return frozenset(row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'"))


def column_names(db: sqlite3.Connection, table: str) -> frozenset[str]:
    """The columns of ``table`` (empty when it is missing)."""
    return frozenset(row[1] for row in db.execute(f"PRAGMA table_info({table})"))


def free_disk_bytes(state_dir: Path | str) -> int:
    """Free space, in bytes, on the file system of ``state_dir`` (raises OSError)."""
    return int(shutil.disk_usage(state_dir).free)


# --------------------------------------------------------------------------------------------
# Counts (metrics and the status page's summary)


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
                                  for kind in ("spool", "outbox")
                                  for reason in ("age", "emergency")}
    return Counts(
        schema_version=schema_version(db), instances=instances,
        last_received_at=None if last is None else float(last), series=series,
        series_completed=completed, **counts,
    )


# --------------------------------------------------------------------------------------------
# Prometheus


class NodeCollector(Collector):
    """Reads the store of ``state_dir`` at every scrape and reports it as metrics.

    A store that cannot be read gives ``qsmnode_up 0`` (and the disk metrics), not an error.
    """

    def __init__(self, state_dir: Path | str, min_free_disk_bytes: int = 0) -> None:
        self.state_dir = Path(state_dir)
        self.min_free_disk_bytes = int(min_free_disk_bytes)

    def collect(self) -> Iterator[Metric]:
        try:
            with read_store(self.state_dir) as db:
                counts: Counts | None = read_counts(db)
        except StoreUnavailable:
            counts = None
        yield GaugeMetricFamily("qsmnode_up", "1 when the node's store could be read, else 0",
                                value=0 if counts is None else 1)
        yield InfoMetricFamily("qsmnode_build", "The qsmnode version",
                               value={"version": __version__})
        yield from self._disk()
        if counts is not None:
            yield from self._store(counts)

    def _disk(self) -> Iterator[Metric]:
        try:
            free = free_disk_bytes(self.state_dir)
        except OSError:
            free = None
        if free is not None:
            yield GaugeMetricFamily(
                "qsmnode_free_disk_bytes",
                "Free space on the file system of the state directory (spool, outbox, store)",
                value=free)
        yield GaugeMetricFamily(
            "qsmnode_min_free_disk_bytes",
            "Free-space floor (listener.min_free_disk_mb): below it reception answers 0xA700",
            value=self.min_free_disk_bytes)

    def _store(self, counts: Counts) -> Iterator[Metric]:
        yield GaugeMetricFamily("qsmnode_store_schema_version", "Schema version of the store",
                                value=counts.schema_version)
        yield CounterMetricFamily("qsmnode_instances_received",
                                  "DICOM instances received and recorded in the store",
                                  value=counts.instances)
        if counts.last_received_at is not None:
            yield GaugeMetricFamily("qsmnode_last_instance_received_timestamp_seconds",
                                    "Unix time the latest instance was received",
                                    value=counts.last_received_at)
        yield _labelled(GaugeMetricFamily("qsmnode_series", "Series by state",
                                          labels=["state"]), counts.series)
        yield CounterMetricFamily("qsmnode_series_completed",
                                  "Series closed as complete (expected count or quiet period)",
                                  value=counts.series_completed)
        if counts.acquisitions:
            yield _labelled(GaugeMetricFamily("qsmnode_acquisitions", "Acquisitions by state",
                                              labels=["state"]), counts.acquisitions)
        if counts.problems_open is not None:
            yield GaugeMetricFamily("qsmnode_problems_open",
                                    "Images that make no acquisition, unresolved",
                                    value=counts.problems_open)
        if counts.jobs:
            yield _labelled(GaugeMetricFamily("qsmnode_jobs", "Processing jobs by state",
                                              labels=["state"]), counts.jobs)
        processing = counts.processing
        if processing is not None:
            buckets: list[tuple[str, float]] = [(repr(b), n) for b, n in processing.buckets]
            buckets.append(("+Inf", processing.count))
            yield HistogramMetricFamily(
                "qsmnode_job_processing_seconds",
                "Run time of the done jobs (their successful attempt), from the jobs table",
                buckets=buckets, sum_value=processing.sum_s)
            if processing.last_s is not None:
                yield GaugeMetricFamily("qsmnode_job_last_processing_seconds",
                                        "Run time of the job that finished last",
                                        value=processing.last_s)
        if counts.has_sends:
            sends = GaugeMetricFamily("qsmnode_sends",
                                      "Deliveries of derived instances by destination and state",
                                      labels=["destination", "state"])
            for destination, states in counts.sends.items():
                for state, number in states.items():
                    sends.add_metric([destination, state], number)
            yield sends
        if counts.hl7 is not None:
            hl7 = GaugeMetricFamily("qsmnode_hl7_messages",
                                    "HL7 ORU^R01 results to the RIS by destination and state",
                                    labels=["destination", "state"])
            for destination, states in counts.hl7.items():
                for state, number in states.items():
                    hl7.add_metric([destination, state], number)
            yield hl7
        if counts.retained_bytes:
            yield _labelled(GaugeMetricFamily("qsmnode_retained_bytes",
                                              "Bytes of the files kept in the spool and outbox",
                                              labels=["kind"]), counts.retained_bytes)
            pruned = CounterMetricFamily("qsmnode_pruned_bytes",
                                         "Bytes of files removed by retention (age or emergency)",
                                         labels=["kind", "reason"])
            for (kind, reason), number in counts.pruned_bytes.items():
                pruned.add_metric([kind, reason], number)
            yield pruned


def _labelled(family: GaugeMetricFamily, values: dict[str, int]) -> GaugeMetricFamily:
    for label, value in values.items():
        family.add_metric([label], value)
    return family


def make_registry(state_dir: Path | str, min_free_disk_bytes: int = 0) -> CollectorRegistry:
    """A private registry (not prometheus_client's global one) holding a :class:`NodeCollector`
    for ``state_dir``. Nothing is read until it is collected."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(state_dir, min_free_disk_bytes))
    return registry


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


def result_notes(result: Mapping[str, Any] | None) -> tuple[str, ...]:
    """What a done job's result (:meth:`qsmnode.pipeline.PipelineResult.to_json`) says that a
    physicist must see beside "done", one line each, in this order:

    - why QSM was not computed (``qsm_not_computed``: a 2-D protocol with slice gaps gets R2*
      and the M1 T2*-signal and thickness analysis instead, and says so);
    - why the M1 analysis could not run (``m1.error``), or that its measures are not reliable
      (the failed ``m1_measures_reliable`` flag, naming the failed checks);
    - the follow-up note (``m1.follow_up.note``), prefixed "follow-up: ".

    Tolerant: an older, partial or odd record gives what it holds, never an error."""
    from qsmnode.m1.result import RELIABILITY_FLAG

    if not isinstance(result, Mapping):
        return ()
    notes = []
    qsm = result.get("qsm_not_computed")
    if isinstance(qsm, str) and qsm:
        notes.append(qsm + "; R2*, T2* signal ratio and thickness computed instead")
    m1 = result.get("m1")
    m1 = m1 if isinstance(m1, Mapping) else {}
    error = m1.get("error")
    if isinstance(error, str) and error:
        notes.append(error)
    flags = m1.get("flags")
    for flag in flags if isinstance(flags, list) else ():
        if (isinstance(flag, Mapping) and flag.get("name") == RELIABILITY_FLAG
                and not flag.get("passed")):
            notes.append(str(flag.get("text") or "the M1 measures are not reliable"))
    follow = m1.get("follow_up")
    note = follow.get("note") if isinstance(follow, Mapping) else None
    if isinstance(note, str) and note:
        notes.append(f"follow-up: {note}")
    return tuple(notes)


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
