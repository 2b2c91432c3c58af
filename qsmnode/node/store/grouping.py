"""Acquisitions, problems and studies: what the grouping of a study found.

Acquisitions: one row per distinct set of series (``series_key``: the sorted series UIDs joined
by ``\\``, :func:`~qsmnode.node.store.records.series_key`), so the same acquisition is never
recorded, nor processed, twice. ``summary`` holds the plan: series UIDs and numbers, echo
count, echo times, shape, affine, vendor, field strength. ``plan`` (from version 7; NULL
before) holds the grouping's whole plan, every frame of it (:mod:`qsmnode.dicom.grouping.stored`):
the job loads it instead of grouping the files again; it is read only by
:meth:`GroupingMixin.acquisition_plan`, never with the records. ``state`` is ``accepted`` (it has a
job) or ``ignored`` (a rule left it out; ``reason`` says which). Problems are images that make
no acquisition, with a plain-language reason; a later grouping of the same study that no
longer finds one sets its ``resolved_at``. ``studies`` holds what a study is recognised by in
status displays (accession number, study date and time, description; never patient data),
written when the study is grouped.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from qsmnode.node.store.connection import StoreConnection
from qsmnode.node.store.records import (
    ACQUISITION_COLUMNS,
    JOB_COLUMNS,
    AcquisitionRecord,
    GroupingOutcome,
    NewAcquisition,
    NewProblem,
    ProblemRecord,
    StudyInfo,
    acquisition_from_row,
    job_from_row,
    problem_from_row,
    series_key,
)

_SELECT_ACQUISITIONS = f"SELECT {', '.join(ACQUISITION_COLUMNS)} FROM acquisitions"


class GroupingMixin(StoreConnection):
    """Recording a study's grouping (acquisitions with their jobs, problems), and reading it."""

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
                problem_from_row(row) for row in db.execute(
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
        row = db.execute(f"{_SELECT_ACQUISITIONS} WHERE series_key = ?", (key,)).fetchone()
        if row is not None and not (row["state"] == "ignored" and state == "accepted"):
            outcome.known.append(acquisition_from_row(row))
            return
        summary = json.dumps(new.summary)
        plan = None if new.plan is None else json.dumps(new.plan)
        if row is None:
            cursor = db.execute(
                "INSERT INTO acquisitions (study_uid, series_key, series_uids, state, reason, "
                "summary, plan, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (new.study_uid, key, json.dumps(list(new.series_uids)), state,
                 new.ignored_reason, summary, plan, at, at),
            )
            acquisition_id = int(cursor.lastrowid or 0)
        else:
            acquisition_id = int(row["id"])
            db.execute(
                "UPDATE acquisitions SET state = 'accepted', reason = NULL, summary = ?, "
                "plan = ?, updated_at = ? WHERE id = ?",
                (summary, plan, at, acquisition_id),
            )
        record = acquisition_from_row(
            db.execute(f"{_SELECT_ACQUISITIONS} WHERE id = ?", (acquisition_id,)).fetchone()
        )
        outcome.created.append(record)
        if state == "accepted":
            cursor = db.execute(
                "INSERT OR IGNORE INTO jobs (acquisition_id, created_at, updated_at) "
                "VALUES (?, ?, ?)",
                (acquisition_id, at, at),
            )
            if cursor.rowcount:
                outcome.jobs.append(job_from_row(db.execute(
                    f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE acquisition_id = ?",
                    (acquisition_id,)).fetchone()))

    def acquisitions(self, study_uid: str | None = None) -> list[AcquisitionRecord]:
        """Recorded acquisitions (of one study, or all), in order of recording."""
        sql, args = _SELECT_ACQUISITIONS, ()
        if study_uid is not None:
            sql, args = sql + " WHERE study_uid = ?", (study_uid,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [acquisition_from_row(row) for row in rows]

    def acquisition(self, acquisition_id: int) -> AcquisitionRecord | None:
        """The recorded acquisition with this id, if any."""
        with self._lock:
            row = self._db.execute(f"{_SELECT_ACQUISITIONS} WHERE id = ?",
                                   (acquisition_id,)).fetchone()
        return None if row is None else acquisition_from_row(row)

    def acquisition_plan(self, acquisition_id: int) -> dict[str, Any] | None:
        """The grouping's plan recorded with an acquisition (JSON, paths relative to the state
        directory); None when it has none (recorded before version 7, or no such
        acquisition)."""
        if self._version < 7:
            return None
        with self._lock:
            row = self._db.execute("SELECT plan FROM acquisitions WHERE id = ?",
                                   (acquisition_id,)).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

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
        return [problem_from_row(row) for row in rows]
