"""The tracker: decides when received series are complete, then groups their study into
acquisitions and problems, and queues one job per acquisition.

It runs as a thread in the node (:meth:`Tracker.run`), one :meth:`Tracker.poll` every 0.5 s,
and works only from the store and the spool, so it picks up after a restart where it left off.

**When a series is complete** (no DICOM peer can say so; DOMAIN.md), the first rule that holds:

1. *Expected count reached*, where the headers tell it: an Enhanced MR series holds one
   instance with every frame (NumberOfFrames), so its first instance completes it; a classic
   series whose instances carry ImagesInAcquisition ``N`` is complete with ``N`` instances.
   When the series of one acquisition are split up (Siemens XA, one series per echo and part)
   and each carries the acquisition's ``N``, the open series of the study sharing that ``N``
   (each below it) complete together when their counts add up to ``N`` (slices × echoes ×
   parts).
2. *Quiet period*: no new instance of the series for ``tracker.quiet_period_s``.
3. *Maximum wait*: ``tracker.max_wait_s`` since the series (re)opened, even if instances still
   trickle in.

The store records why (``series.completion``: count, quiet or max_wait). Both times count
only while the node is up: after a restart they run from the start at the earliest, so a series
half received before the node went down gets its full quiet period to be finished.

**Grouping a study.** When none of a study's series is open and some are not grouped yet, and
its last instance is at least ``min(quiet_period_s, 1 s)`` old (a short settle time, so that
the next series of a sender that completes series by count has started arriving), the tracker
summarizes the study's spool files (headers only, cached), leaves out non-MR instances (log
line), and groups them with :func:`~qsmnode.dicom.load.group_acquisitions` under
``rules.min_echoes`` and ``rules.require_phase``. An accepted acquisition is recorded with its
plan (every frame, :mod:`qsmnode.dicom.grouping.stored`), which its job loads without grouping
again. Then the field-strength rule
(``rules.field_strengths_t``; empty = any; a match is within 0.1 T; an unknown field strength
passes): an acquisition outside it is recorded as ``ignored`` with the reason (no job), and a
problem whose series all have another field strength is passed over with a log line.

**Triage.** Series that are plainly not QSM candidates (``rules.pass_over``, the rule is in
:mod:`qsmnode.dicom.grouping`: localisers, BOLD, ASL, diffusion, derived maps, field maps, a
single magnitude echo, an unused T1w) and series of other SOP classes (reports, secondary
captures) are *passed over*: the reason is recorded on the series (``series.passed_over``,
shown by ``qsmnode status`` and the status page) and logged, and they are not problems (so
they neither wait for the quiet period nor hold their images). What the study is recognised
by (accession number, study date and time, description) is recorded with the grouping. If the
grouping finds a problem while the study is younger than the quiet period (a series completed
by count while the next is still on its way), the tracker waits for the quiet period (or the
maximum wait) before recording anything. Acquisitions, problems (logged, with their
plain-language reason) and jobs are recorded in one transaction (:meth:`Store.record_grouping`),
which does nothing if the study changed meanwhile; the tracker then tries again. A study's
instances are those of its series (an instance whose StudyInstanceUID differs from its series'
study, from a broken sender, is grouped with its series). A study whose grouping raises is
logged and tried again after ``FAILED_RETRY_S`` or when an image of it arrives; the other
studies go on.

**Same-session T1w.** A T1-weighted single-echo magnitude series (the rule is in
:mod:`qsmnode.dicom.grouping`) is not a problem: it becomes the anatomical reference of the
acquisition with its Frame of Reference, named in the acquisition's summary (``t1w``, and
``t1w_note`` with the choice among several or why one is not used). It is not one of the
acquisition's series. Limitation: a T1w that arrives after its study's acquisition was
recorded is not used for it (the acquisition is not processed twice).

**Idempotent.** An acquisition is identified by its set of series UIDs: grouping a study again
never records it twice nor queues a second job. A problem found again is not recorded again; a
problem not found again is marked resolved.

**Late instances.** An instance that arrives for a series already complete re-opens the series
(its maximum wait counts from then), and so its study: when the series completes again, the
study is grouped again. An acquisition whose series were already recorded is not processed
again (its job ran, or runs, on what was there); an acquisition that is new (e.g. the missing
slice of a reported problem arrived, or a late series made a different set) gets its job, and
the problems no longer found are marked resolved. Instances whose files retention removed
(the study was finished and delivered) are not read again: a late image of such a study is
grouped without them, and a problem says that they were removed.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.errors import InvalidDicomError

from qsmnode.dicom.grouping import plan_to_json
from qsmnode.dicom.headers import (
    ENHANCED_SOP_CLASSES,
    MR_SOP_CLASSES,
    InstanceInfo,
    summarize,
)
from qsmnode.dicom.load import AcquisitionPlan, PassedOver, Problem, group_acquisitions
from qsmnode.node.config import Settings
from qsmnode.node.redact import Redactor, dataset_values
from qsmnode.node.store import (
    GroupingOutcome,
    InstanceRecord,
    NewAcquisition,
    NewProblem,
    SeriesRecord,
    Store,
    StudyInfo,
    StudyReady,
    describe_summary,
    series_numbers_text,
)

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
SETTLE_S = 1.0
"""Longest settle time between a study's last instance and its grouping (capped by the quiet
period)."""
FIELD_STRENGTH_TOLERANCE_T = 0.1
FAILED_RETRY_S = 30.0
"""How long a study whose grouping raised waits before it is tried again (unless it changes)."""


def expected_instances(sop_class_uid: str, images_in_acquisition: int | None) -> int | None:
    """How many instances a series is expected to hold, when its headers tell (else None)."""
    if sop_class_uid in ENHANCED_SOP_CLASSES:
        return 1
    if images_in_acquisition is not None and images_in_acquisition > 0:
        return images_in_acquisition
    return None


def sop_class_name(uid: str) -> str:
    """The SOP class's name where pydicom knows it (else the UID)."""
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else f"SOP class {uid}"


def _study_info(study_uid: str, infos: list[InstanceInfo]) -> StudyInfo:
    """What the study is recognised by, from the first instance that says (never patient
    data)."""
    def first(attribute: str) -> str:
        return next((getattr(i, attribute) for i in infos
                     if i.study_uid == study_uid and getattr(i, attribute)), "")

    return StudyInfo(study_uid, first("accession_number"), first("study_date"),
                     first("study_time"), first("study_description"))


def plan_summary(plan: AcquisitionPlan) -> dict[str, Any]:
    """The JSON summary of a plan recorded with its acquisition.

    ``t1w`` names the same-session T1w reference (its series is not one of the acquisition's,
    so the acquisition's identity stays its GRE series; the job takes the T1w's files from
    here), or is None; ``t1w_note`` says which T1w was chosen and why others are not used;
    ``left_out`` which images of its series it does not use (e.g. a B0 field map), logged.
    """
    affine = np.asarray(plan.affine, dtype=np.float64)
    t1w = None
    if plan.t1w is not None:
        t1w = {**plan.t1w.to_json(),
               "instances": len({r.sop_instance_uid for r in plan.t1w.frames})}
    return {
        "series_uids": list(plan.series_uids),
        "series_numbers": list(plan.series_numbers),
        "series_description": plan.series_description,
        "vendor": str(plan.vendor),
        "field_strength_t": plan.field_strength_t,
        "n_echoes": plan.n_echoes,
        "echo_times_s": list(plan.echo_times_s),
        "shape": [plan.columns, plan.rows, plan.n_slices],
        "voxel_size_mm": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
        "affine": affine.tolist(),
        "has_phase": plan.phase is not None,
        "frame_of_reference_uid": plan.frame_of_reference_uid,
        "instances": len(plan.sop_instance_uids),
        "t1w": t1w,
        "t1w_note": plan.t1w_note,
        "left_out": plan.left_out,
    }


@dataclass
class TrackerPass:
    """What one :meth:`Tracker.poll` did (for tests and logs)."""

    reopened: list[str] = field(default_factory=list)
    completed: dict[str, str] = field(default_factory=dict)
    """Series UID -> completion (count, quiet, max_wait)."""
    grouped: dict[str, GroupingOutcome] = field(default_factory=dict)
    """Study UID -> what was recorded."""
    waiting: list[str] = field(default_factory=list)
    """Studies ready but not grouped yet (settling, or problems within the quiet period)."""


class Tracker:
    """Series completion and acquisition grouping (see the module docstring).

    ``on_jobs`` is called after jobs were queued (the node wakes its worker pool).
    ``clock`` gives the time (Unix seconds); tests pass their own.
    """

    def __init__(self, settings: Settings, store: Store, *,
                 on_jobs: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 started_at: float | None = None) -> None:
        """``started_at``: when the node started (its clock). The quiet period and the maximum
        wait count only time the node was up: from the last instance (or the opening) or from
        ``started_at``, whichever is later, so a series half received before the node went
        down is not completed at once when it comes back (the scanner may still be sending)."""
        self.settings = settings
        self.started_at = started_at
        self.store = store
        self.state_dir = Path(settings.paths.state_dir)
        self.on_jobs = on_jobs
        self.clock = clock
        self._summaries: dict[str, InstanceInfo | str] = {}  # path -> summary, or why not
        self._waiting_logged: set[tuple[str, int]] = set()
        self._failed: dict[tuple[str, int], float] = {}  # (study, count) -> its grouping raised

    # ----------------------------------------------------------------------------------- the loop

    def run(self, stop: threading.Event, interval_s: float = POLL_INTERVAL_S) -> None:
        """Poll until ``stop`` is set. Errors are logged and the loop goes on."""
        while not stop.is_set():
            try:
                self.poll()
            except Exception:
                log.exception("tracker: unexpected error (retrying)")
            stop.wait(interval_s)

    def poll(self) -> TrackerPass:
        """One pass: re-open late series, complete series, group the studies that are ready."""
        now = self.clock()
        result = TrackerPass()
        for series in self.store.reopen_late_series(now):
            late = series.received_count - (series.completed_count or 0)
            log.info(
                "series %s (number %s) of study %s: %d instance%s arrived after it was "
                "complete; re-opened, and its study will be grouped again (an acquisition "
                "already recorded is not processed twice)", series.series_uid,
                series.series_number, series.study_uid, late, "" if late == 1 else "s")
            result.reopened.append(series.series_uid)
        self.update_series(now, result)
        self.group_ready_studies(now, result)
        return result

    # -------------------------------------------------------------------------- series completion

    def update_series(self, now: float, result: TrackerPass | None = None) -> TrackerPass:
        """Complete the open series whose time has come (see the module docstring)."""
        result = result if result is not None else TrackerPass()
        tracker = self.settings.tracker
        open_series = self.store.open_series()
        groups: dict[tuple[str, int], list[SeriesRecord]] = defaultdict(list)
        for series, iia in open_series:
            if (iia is not None and iia > 0 and series.sop_class_uid not in ENHANCED_SOP_CLASSES
                    and series.received_count < iia):
                groups[(series.study_uid, iia)].append(series)
        group_done = {
            s.series_uid
            for (_, iia), members in groups.items()
            if len(members) > 1 and sum(m.received_count for m in members) == iia
            for s in members
        }
        since_start = self.started_at if self.started_at is not None else float("-inf")
        for series, iia in open_series:
            expected = expected_instances(series.sop_class_uid, iia)
            opened = series.opened_at if series.opened_at is not None else (
                series.first_received_at)
            opened = max(opened, since_start)
            last = max(series.last_received_at, since_start)
            if expected is not None and series.received_count >= expected:
                completion, why = "count", f"expected count {expected} reached"
            elif series.series_uid in group_done:
                completion, why = "count", (f"with the other series of its acquisition, the "
                                            f"expected count {iia} reached")
            elif now - last >= tracker.quiet_period_s:
                completion, why = "quiet", (f"nothing new for {tracker.quiet_period_s:g} s "
                                            "(quiet period)")
            elif now - opened >= tracker.max_wait_s:
                completion, why = "max_wait", (f"open for {tracker.max_wait_s:g} s "
                                               "(maximum wait)")
            else:
                if expected is not None and expected != series.expected_count:
                    self.store.set_expected_count(series.series_uid, expected)
                continue
            if self.store.complete_series(series.series_uid, series.received_count, completion,
                                          expected, now):
                log.info("series %s (number %s) of study %s complete with %d instance%s: %s",
                         series.series_uid, series.series_number, series.study_uid,
                         series.received_count, "" if series.received_count == 1 else "s",
                         why)
                result.completed[series.series_uid] = completion
        return result

    # ----------------------------------------------------------------------------------- grouping

    def group_ready_studies(self, now: float, result: TrackerPass | None = None) -> TrackerPass:
        """Group every study whose series are all complete (and not grouped yet)."""
        result = result if result is not None else TrackerPass()
        for ready in self.store.studies_ready():
            key = (ready.study_uid, ready.instance_count)
            failed_at = self._failed.get(key)
            if failed_at is not None and now - failed_at < FAILED_RETRY_S:
                result.waiting.append(ready.study_uid)
                continue
            try:
                outcome = self.group_study(ready, now)
            except Exception as exc:
                # one study's fault never holds up the others; it is tried again later
                if failed_at is None:
                    log.error("study %s: grouping failed (%s); tried again every %g s, and "
                              "when an image of it arrives", ready.study_uid,
                              self._redacted_error(ready.study_uid, exc), FAILED_RETRY_S)
                self._failed[key] = now
                outcome = None
            if outcome is None:
                result.waiting.append(ready.study_uid)
            else:
                result.grouped[ready.study_uid] = outcome
        return result

    def group_study(self, ready: StudyReady, now: float) -> GroupingOutcome | None:
        """Group one ready study and record the outcome; None when it must wait (settling,
        problems within the quiet period, or it changed while being read)."""
        tracker = self.settings.tracker
        if now - ready.last_received_at < min(tracker.quiet_period_s, SETTLE_S):
            return None
        instances = self.store.study_instances(ready.study_uid)
        if len(instances) != ready.instance_count:
            # a series is its study's even when one of its instances names another study (a
            # broken sender): the count is the study's series', so take their instances
            instances = [record for series in self.store.series()
                         if series.study_uid == ready.study_uid
                         for record in self.store.instances(series.series_uid)]
        if len(instances) != ready.instance_count:
            return None  # an instance arrived meanwhile: next pass
        pruned = self.store.pruned_instances(ready.study_uid)
        passed_over: dict[str, str] = {}
        infos, unreadable = self._summarize([r for r in instances
                                             if r.sop_instance_uid not in pruned], passed_over)
        rules = self.settings.rules
        results = group_acquisitions(infos, min_echoes=rules.min_echoes,
                                     require_phase=rules.require_phase,
                                     pass_over=rules.pass_over, qsm_series=rules.qsm_series)
        acquisitions: list[NewAcquisition] = []
        problems: list[NewProblem] = []
        removed: dict[str, int] = defaultdict(int)
        for record in instances:
            if record.sop_instance_uid in pruned:
                removed[record.series_uid] += 1
        for series_uid, count in removed.items():
            problems.append(NewProblem(
                ready.study_uid, (series_uid,),
                f"series UID {series_uid}: {count} earlier image{'' if count == 1 else 's'} "
                f"{'was' if count == 1 else 'were'} removed by retention after the study was "
                "finished; the images that came since are grouped without "
                f"{'it' if count == 1 else 'them'}"))
        for series_uid, reasons in unreadable.items():
            problems.append(NewProblem(
                ready.study_uid, (series_uid,),
                f"series UID {series_uid}: {len(reasons)} spool file"
                f"{'' if len(reasons) == 1 else 's'} could not be read ({reasons[0]})"))
        strengths = self._field_strengths(infos)
        redact = functools.cache(lambda: self._study_redactor(ready.study_uid))  # once, if needed
        for item in results:
            if isinstance(item, AcquisitionPlan):
                summary = plan_summary(item)
                refusal = self._field_strength_refusal(item.field_strength_t)
                if refusal is not None:
                    log.info("study %s: ignored acquisition (%s): %s", ready.study_uid,
                             describe_summary(summary), refusal)
                plan = None if refusal is not None else plan_to_json(item, self.state_dir)
                acquisitions.append(NewAcquisition(item.study_uid or ready.study_uid,
                                                   tuple(item.series_uids), summary, refusal,
                                                   plan))
            elif isinstance(item, PassedOver):
                for series_uid in item.series_uids:  # the why can quote a description
                    passed_over[series_uid] = redact()(item.why)
            else:
                self._add_problem(item, redact()(item.reason), ready.study_uid, strengths,
                                  problems, passed_over)
        if problems and (now - ready.last_received_at < tracker.quiet_period_s
                         and now - ready.opened_at < tracker.max_wait_s):
            key = (ready.study_uid, ready.instance_count)
            if key not in self._waiting_logged:
                self._waiting_logged.add(key)
                log.info("study %s: grouping finds %d problem%s; waiting for the quiet period "
                         "in case more images are on their way", ready.study_uid, len(problems),
                         "" if len(problems) == 1 else "s")
            return None
        outcome = self.store.record_grouping(ready.study_uid, ready.instance_count,
                                             acquisitions, problems, now, passed_over,
                                             _study_info(ready.study_uid, infos))
        if outcome is None:
            return None
        self._forget(instances)
        self._log_outcome(ready.study_uid, outcome, len(instances))
        numbers = {r.series_uid: r.series_number for r in instances}
        for series_uid, why in passed_over.items():
            log.info("study %s: series %s (number %s) passed over: %s", ready.study_uid,
                     series_uid, numbers.get(series_uid), why)
        if outcome.jobs and self.on_jobs is not None:
            self.on_jobs()
        return outcome

    def _add_problem(self, problem: Problem, reason: str, study_uid: str,
                     strengths: dict[str, float | None], problems: list[NewProblem],
                     passed_over: dict[str, str]) -> None:
        """Record ``problem`` with ``reason`` (its reason redacted), or pass its series over
        when their field strength is not accepted."""
        values = [strengths.get(uid) for uid in problem.series_uids]
        known = [v for v in values if v is not None]
        refused = [v for v in known if self._field_strength_refusal(v) is not None]
        if values and len(refused) == len(values):
            listed = ", ".join(f"{v:g}" for v in sorted(set(refused)))
            log.info("study %s: ignored series %s: field strength %s T is not among "
                     "rules.field_strengths_t (not processed: %s)", study_uid,
                     series_numbers_text(problem.series_numbers), listed, reason)
            for series_uid in problem.series_uids:
                passed_over[series_uid] = (f"field strength {listed} T is not among "
                                           "rules.field_strengths_t")
            return
        problems.append(NewProblem(problem.study_uid or study_uid, tuple(problem.series_uids),
                                   reason))

    def _field_strength_refusal(self, value: float | None) -> str | None:
        """Why the field-strength rule leaves an acquisition out (None: it does not)."""
        accepted = self.settings.rules.field_strengths_t
        if not accepted or value is None:
            return None
        if any(abs(value - b0) <= FIELD_STRENGTH_TOLERANCE_T for b0 in accepted):
            return None
        listed = ", ".join(f"{b0:g}" for b0 in accepted)
        return f"field strength {value:g} T is not among rules.field_strengths_t ({listed} T)"

    @staticmethod
    def _field_strengths(infos: list[InstanceInfo]) -> dict[str, float | None]:
        strengths: dict[str, float | None] = {}
        for info in infos:
            if strengths.get(info.series_uid) is None:
                strengths[info.series_uid] = info.field_strength_t
        return strengths

    def _summarize(self, instances: list[InstanceRecord], passed_over: dict[str, str],
                   ) -> tuple[list[InstanceInfo], dict[str, list[str]]]:
        """Header summaries of the MR instances (cached by path), and the series whose files
        could not be read, with the reasons. Series of other SOP classes (reports, secondary
        captures) go into ``passed_over``."""
        infos: list[InstanceInfo] = []
        unreadable: dict[str, list[str]] = defaultdict(list)
        skipped: dict[tuple[str, str], int] = defaultdict(int)
        for record in instances:
            if record.sop_class_uid not in MR_SOP_CLASSES:
                skipped[(record.series_uid, record.sop_class_uid)] += 1
                continue
            path = str(self.state_dir / record.path)
            summary = self._summaries.get(path)
            if summary is None:
                try:
                    summary = summarize(path)
                except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
                    # the reason becomes a problem (store, status page): no patient value
                    summary = Redactor(dataset_values([path]))(f"{type(exc).__name__}: {exc}")
                self._summaries[path] = summary
            if isinstance(summary, str):
                unreadable[record.series_uid].append(summary)
            else:
                infos.append(summary)
        for (series_uid, sop_class), count in skipped.items():
            log.info("series %s: %d instance%s of SOP class %s left out of the grouping "
                     "(not MR images)", series_uid, count, "" if count == 1 else "s", sop_class)
            name = sop_class_name(sop_class)
            passed_over[series_uid] = f"not an MR image ({name}): not a QSM acquisition"
        return infos, dict(unreadable)

    def _study_redactor(self, study_uid: str) -> Redactor:
        """What keeps the study's patient and study values (names, IDs, dates, descriptions:
        :mod:`qsmnode.node.redact`) out of a text, read from one file per series, as a job's
        errors are kept free of its acquisition's: for the reasons of problems and of series
        passed over, which can quote a series description that names the patient."""
        first: dict[str, str] = {}  # one file per series: the patient and study values
        for record in self.store.study_instances(study_uid):
            first.setdefault(record.series_uid, str(self.state_dir / record.path))
        return Redactor(dataset_values(list(first.values())))

    def _redacted_error(self, study_uid: str, exc: BaseException) -> str:
        """An unexpected grouping error for the log: its type, its message without the
        study's patient and study values, and where in the code it was raised (no traceback:
        its frames could quote a dataset's values)."""
        text = self._study_redactor(study_uid)(f"{type(exc).__name__}: {exc}")
        frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f" at {Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
        return text + where

    def _forget(self, instances: list[InstanceRecord]) -> None:
        for record in instances:
            self._summaries.pop(str(self.state_dir / record.path), None)
        studies = {record.study_uid for record in instances}
        self._waiting_logged = {k for k in self._waiting_logged if k[0] not in studies}

    def _log_outcome(self, study_uid: str, outcome: GroupingOutcome, n_instances: int) -> None:
        jobs = {job.acquisition_id: job.id for job in outcome.jobs}
        for acquisition in outcome.created:
            what = describe_summary(acquisition.summary)
            if acquisition.state == "accepted":
                log.info("study %s: acquisition %d: %s; job %s queued", study_uid,
                         acquisition.id, what, jobs.get(acquisition.id, "?"))
                if acquisition.summary.get("left_out"):
                    log.info("study %s: acquisition %d: %s", study_uid, acquisition.id,
                             acquisition.summary["left_out"])
                if acquisition.summary.get("t1w_note"):
                    log.info("study %s: acquisition %d: %s", study_uid, acquisition.id,
                             acquisition.summary["t1w_note"])
            else:
                log.info("study %s: acquisition %d recorded as ignored: %s (%s)", study_uid,
                         acquisition.id, what, acquisition.reason)
        for acquisition in outcome.known:
            log.info("study %s grouped again: acquisition %d (series %s) is already recorded; "
                     "it is not processed again", study_uid, acquisition.id,
                     series_numbers_text(acquisition.summary.get("series_numbers", ())))
        for problem in outcome.new_problems:
            log.warning("study %s: problem %d: %s", study_uid, problem.id, problem.reason)
        for problem in outcome.resolved_problems:
            log.info("study %s: problem %d resolved (not found when the study was grouped "
                     "again)", study_uid, problem.id)
        if not (outcome.created or outcome.known or outcome.new_problems):
            log.info("study %s: %d instance%s grouped, no acquisition and no new problem",
                     study_uid, n_instances, "" if n_instances == 1 else "s")
