"""The store's record types: what goes in and comes out of :class:`~qsmnode.node.store.Store`
(frozen dataclasses, no ORM), the states its tables allow, and the small text helpers the
tracker and status displays share."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


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
    """An acquisition found by the grouping, to record (``ignored_reason``: left out by a rule).

    ``plan``: the grouping's plan as JSON (:func:`~qsmnode.dicom.grouping.plan_to_json`, paths
    relative to the state directory), which the acquisition's job loads; None: none kept."""

    study_uid: str
    series_uids: tuple[str, ...]
    summary: dict[str, Any]
    ignored_reason: str | None = None
    plan: dict[str, Any] | None = field(default=None, repr=False)


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
SERIES_STATES = ("open", "complete")
ACQUISITION_STATES = ("accepted", "ignored")
JOB_STATES = ("queued", "running", "done", "failed")
SEND_STATES = ("pending", "sent", "failed")

INSTANCE_COLUMNS = tuple(
    f.name for f in fields(InstanceRecord) if f.name not in ("modality", "series_description")
)
SERIES_COLUMNS = tuple(f.name for f in fields(SeriesRecord))
SERIES_COLUMNS_V1 = SERIES_COLUMNS[:12]
SERIES_COLUMNS_V2 = SERIES_COLUMNS[:16]
JOB_COLUMNS = tuple(f.name for f in fields(JobRecord))
OUTBOX_COLUMNS = tuple(f.name for f in fields(OutboxRecord))
SEND_COLUMNS = tuple(f.name for f in fields(SendRecord))


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


ACQUISITION_COLUMNS = ("id", "study_uid", "series_uids", "state", "reason", "summary",
                       "created_at", "updated_at")
"""The ``acquisitions`` columns of an :class:`AcquisitionRecord` (not its ``plan``: thousands
of frames, read only by :meth:`~qsmnode.node.store.Store.acquisition_plan`)."""


def acquisition_from_row(row: sqlite3.Row) -> AcquisitionRecord:
    """An ``acquisitions`` row (:data:`ACQUISITION_COLUMNS`) as its record."""
    return AcquisitionRecord(
        id=int(row["id"]), study_uid=row["study_uid"],
        series_uids=tuple(json.loads(row["series_uids"])), state=row["state"],
        reason=row["reason"], summary=json.loads(row["summary"]),
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


def problem_from_row(row: sqlite3.Row) -> ProblemRecord:
    """A ``problems`` row (all columns) as its record."""
    return ProblemRecord(
        id=int(row["id"]), study_uid=row["study_uid"],
        series_uids=tuple(json.loads(row["series_uids"])), reason=row["reason"],
        created_at=row["created_at"], resolved_at=row["resolved_at"],
    )


def job_from_row(row: sqlite3.Row) -> JobRecord:
    """A ``jobs`` row (:data:`JOB_COLUMNS`) as its record."""
    values = dict(row)
    values["result"] = None if values["result"] is None else json.loads(values["result"])
    return JobRecord(**values)
