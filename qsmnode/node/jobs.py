"""Jobs: what a worker child is given, and what it runs.

A job processes one accepted acquisition. The node (parent side) turns a claimed job into a
:class:`JobSpec` with :func:`job_spec`: plain data (JSON), the acquisition's series and the
absolute paths of their spool files, the plan the tracker grouped them into (recorded with the
acquisition, :mod:`qsmnode.dicom.grouping.stored`), the grouping rules, and the attempt's
output folder. The worker child (:mod:`qsmnode.node.worker_child`) runs a *job function* on
it, by default :func:`execute_job`:

1. check that every spool file of the job is still there and readable, and that the plan's
   files are among them (:func:`load_job_acquisition`);
2. :func:`~qsmnode.dicom.load.load_acquisition` the plan from the spool files, with its T1w,
   each file checked against the summary it was grouped with as it is read (a file changed
   since fails the job, naming what changed); an acquisition recorded before plans were kept
   (an upgraded store) is grouped again from its files with the same rules instead, and the
   plan made of exactly the job's series is loaded;
3. read the M1 atlas and the normative table, look up the patient's earlier results, and
   give them with the acquisition to :func:`qsmnode.pipeline.process_acquisition`, the one
   entry point ``qsmnode process`` calls too (:func:`process_acquisition` here; it checks the
   source header the derived objects copy from before QSM, logging the attributes it cannot
   copy, never their values);
4. write the derived datasets it returns into the attempt's ``derived`` folder
   (:func:`write_job_outputs`), and return the result as JSON.

The parent, which owns the store, moves the derived files into the outbox and records them
with their sends in the transaction that marks the job done (:func:`job_outputs` lists them;
see :mod:`qsmnode.node.outbox`).

A job function takes a :class:`JobSpec` and returns a JSON-ready dictionary; it raises
:class:`JobError` (or any exception) to fail the attempt with a message. It never touches the
store: the parent records the outcome. The job function is the seam for other executors (a
distributed engine would submit the same function with the same spec).

The T1w is a help, never a condition: when its files are gone, unreadable, or no longer make a
T1w reference, the job runs on the GRE alone and the M1 record says why
(:attr:`~qsmnode.dicom.load.LoadedAcquisition.t1w_error`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsmnode.node.config import Settings
from qsmnode.node.store import JobRecord, Store
from qsmnode.qsm import DEFAULT_METHOD

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DEFAULT_JOB_FUNCTION = "qsmnode.node.jobs:execute_job"
JOBS_DIRNAME = "jobs"
DERIVED_DIRNAME = "derived"
log = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
PROGRESS_FILENAME = "progress.json"
STAGE_NAMES = {"load": "loading", "priors": "earlier results", "check": "checking",
               "qsm": "QSM", "m1": "M1 analysis", "derived": "derived DICOM",
               "write": "writing files"}
"""What an attempt's progress stages (:func:`execute_job`) are called on screens."""


class JobError(RuntimeError):
    """A job cannot be done; the message says why in plain words (it becomes last_error).

    ``transient``: the cause may pass (the attempt is retried while attempts are left); by
    default it does not (an error in the input: the job fails at once)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


_MISSING_ATTRIBUTE = re.compile(r"object has no attribute '([A-Z][A-Za-z0-9]+)'")


def input_error(spec: JobSpec, loaded: Any, stage: str, exc: Exception) -> JobError:
    """A plain-language, final :class:`JobError` for an exception raised while an attempt
    worked on its input: which series, which stage, and what (a DICOM attribute a source image
    lacks is named); the exception follows as detail."""
    numbers = getattr(loaded, "series_numbers", None)
    if numbers:
        series = f"series {', '.join('?' if n is None else str(n) for n in numbers)}"
    else:
        series = f"series UID{'s' if len(spec.series_uids) > 1 else ''} " + ", ".join(
            spec.series_uids)
    what = STAGE_NAMES.get(stage, stage)
    text = str(exc)
    missing = _MISSING_ATTRIBUTE.search(text) if isinstance(exc, AttributeError) else None
    if missing is None and isinstance(exc, KeyError) and exc.args and isinstance(
            exc.args[0], str) and re.fullmatch(r"[A-Z][A-Za-z0-9]+", exc.args[0]):
        missing = re.match(r"(.+)", exc.args[0])
    if missing is not None:
        why = f"the source images lack the attribute {missing.group(1)}"
    else:
        why = "the input could not be handled"
    detail = text if len(text) <= 200 else text[:200] + " …"
    return JobError(f"{series}: {what} failed: {why} ({type(exc).__name__}: {detail}); not "
                    "retried, the same input would fail the same way")


@dataclass(frozen=True)
class JobSpec:
    """Everything a job function needs, as plain data.

    Attributes:
        job_id, acquisition_id, attempt: which job and which try (1-based).
        study_uid, series_uids: the acquisition.
        files: absolute paths of every spool file of those series.
        t1w_series_uid, t1w_files: the acquisition's same-session T1w reference (its summary's
            ``t1w``) and the absolute paths of its spool files; None and empty without one.
        t1w_error: why the T1w named in the summary cannot be given (files missing).
        min_echoes, require_phase, pass_over, qsm_series: the grouping rules (``[rules]``).
        qsm, qsm_method, m1, atlas: what the pipeline computes (``[pipeline]`` in the
            configuration).
        m1_normative_table: the normative table file for z-scores (None: no z-scores).
        z_flag: the |z| at or beyond which the key images and the KOS flag a deep-layer χ.
        follow_up: where to look for the patient's earlier results
            (:meth:`qsmnode.node.followup.FollowUpSource.to_json`); None: no follow-up.
        work_dir: this attempt's folder (spec, result, progress, ``derived/``).
        plan: the acquisition's plan as the tracker grouped it
            (:func:`~qsmnode.dicom.grouping.plan_to_json`, absolute paths); None for an
            acquisition recorded before plans were kept: the job groups its files again.
    """

    job_id: int
    acquisition_id: int
    attempt: int
    study_uid: str
    series_uids: tuple[str, ...]
    files: tuple[str, ...]
    min_echoes: int
    require_phase: bool
    work_dir: str
    qsm: bool = True
    qsm_method: str = DEFAULT_METHOD
    m1: bool = True
    atlas: str = "hcpex"
    m1_normative_table: str | None = None
    z_flag: float = 2.0
    t1w_series_uid: str | None = None
    t1w_files: tuple[str, ...] = ()
    t1w_error: str = ""
    pass_over: bool = True
    qsm_series: tuple[str, ...] = ()
    follow_up: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None

    @property
    def progress_path(self) -> Path:
        """Where the attempt writes the pipeline stage it is in (see :func:`execute_job`)."""
        return Path(self.work_dir) / PROGRESS_FILENAME

    @property
    def derived_dir(self) -> Path:
        """Where the attempt's derived datasets go as files (see :func:`write_job_outputs`)."""
        return Path(self.work_dir) / DERIVED_DIRNAME

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        data = json.loads(text)
        data["series_uids"] = tuple(data["series_uids"])
        data["files"] = tuple(data["files"])
        data["t1w_files"] = tuple(data.get("t1w_files", ()))
        data["qsm_series"] = tuple(data.get("qsm_series", ()))
        return cls(**data)


def attempt_dir(state_dir: Path, job_id: int, attempt: int) -> Path:
    """The folder of one attempt of a job, under the state directory."""
    return Path(state_dir) / JOBS_DIRNAME / str(job_id) / f"attempt-{attempt}"


def job_spec(store: Store, job: JobRecord, settings: Settings) -> JobSpec:
    """The spec of a claimed job, from the store.

    Raises:
        JobError: the acquisition is gone or its files are not all in the spool.
    """
    acquisition = store.acquisition(job.acquisition_id)
    if acquisition is None:
        raise JobError(f"acquisition {job.acquisition_id} is not in the store")
    state_dir = settings.paths.state_dir
    instances = store.job_instances(job.id)
    files = tuple(str(state_dir / record.path) for record in instances)
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise JobError(
            f"{len(missing)} of {len(files)} spool files of acquisition {acquisition.id} are "
            f"missing (first: {missing[0] if missing else 'none recorded'})"
        )
    t1w_uid, t1w_files, t1w_error = _t1w_files(store, acquisition.summary, state_dir)
    plan = store.acquisition_plan(acquisition.id)
    if plan is not None:  # the paths made absolute, like ``files``
        from qsmnode.dicom.grouping import plan_from_json, plan_to_json

        try:
            plan = plan_to_json(plan_from_json(plan, state_dir))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise JobError(f"the recorded plan of acquisition {acquisition.id} cannot be "
                           f"read ({type(exc).__name__}: {exc})") from None
    return JobSpec(
        job_id=job.id,
        acquisition_id=acquisition.id,
        attempt=job.attempts,
        study_uid=acquisition.study_uid,
        series_uids=acquisition.series_uids,
        files=files,
        min_echoes=settings.rules.min_echoes,
        require_phase=settings.rules.require_phase,
        work_dir=str(attempt_dir(state_dir, job.id, job.attempts)),
        qsm=settings.pipeline.qsm,
        qsm_method=settings.pipeline.qsm_method,
        m1=settings.pipeline.m1,
        atlas=settings.pipeline.atlas,
        m1_normative_table=(None if settings.pipeline.m1_normative_table is None
                            else str(settings.pipeline.m1_normative_table)),
        z_flag=settings.pipeline.z_flag,
        t1w_series_uid=t1w_uid,
        t1w_files=t1w_files,
        t1w_error=t1w_error,
        pass_over=settings.rules.pass_over,
        qsm_series=settings.rules.qsm_series,
        follow_up=_follow_up_json(settings),
        plan=plan,
    )


def _follow_up_json(settings: Settings) -> dict[str, Any] | None:
    from qsmnode.node.followup import FollowUpSource

    if not (settings.pipeline.qsm and settings.pipeline.m1):
        return None
    source = FollowUpSource.from_settings(settings)
    return None if source is None else source.to_json()


def _t1w_files(store: Store, summary: dict[str, Any], state_dir: Path,
               ) -> tuple[str | None, tuple[str, ...], str]:
    """The T1w series UID of an acquisition summary, its spool files, and why they cannot be
    given (then no files: the job runs without the T1w)."""
    t1w = summary.get("t1w")
    if not isinstance(t1w, dict) or not t1w.get("series_uid"):
        return None, (), ""
    uid = str(t1w["series_uid"])
    files = tuple(str(state_dir / record.path) for record in store.instances(uid))
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        number = t1w.get("series_number")
        return uid, (), (f"{len(missing)} of {len(files)} spool files of the T1w series "
                         f"{'?' if number is None else number} (series UID {uid}) are missing")
    return uid, files, ""


def load_job_acquisition(spec: JobSpec) -> Any:
    """Load the spec's plan from its spool files (the tracker's grouping, not done again); a
    T1w that cannot serve leaves the GRE loaded alone, with why in ``t1w_error``. Without a
    plan (recorded before plans were kept): :func:`regroup_job_acquisition`.

    Raises:
        JobError: a file is missing, unreadable, or changed since it was grouped, or the
            plan's files cannot be loaded (the reason is given).
    """
    if spec.plan is None:
        return regroup_job_acquisition(spec)
    from qsmnode.dicom.grouping import plan_from_json
    from qsmnode.dicom.load import LoadError, load_acquisition

    unreadable = _unreadable(spec.files)
    if unreadable:
        raise JobError(f"only {len(spec.files) - unreadable} of {len(spec.files)} spool files "
                       "could be read")
    plan = plan_from_json(spec.plan)
    missing = _outside(_plan_paths(plan.magnitude, plan.phase), spec.files)
    if missing:
        raise JobError(f"the spool files no longer make this acquisition: {missing}")
    t1w_error = spec.t1w_error
    if spec.t1w_series_uid is not None and plan.t1w is None and not t1w_error:
        t1w_error = (f"the T1w series (series UID {spec.t1w_series_uid}) no longer makes a T1w "
                     "reference for this acquisition (not in its plan)")
    with_t1w = spec.t1w_series_uid is not None and plan.t1w is not None and not t1w_error
    t1w_unreadable = _unreadable(spec.t1w_files) if with_t1w else 0
    if t1w_unreadable:
        t1w_error = (f"only {len(spec.t1w_files) - t1w_unreadable} of {len(spec.t1w_files)} "
                     f"spool files of the T1w series (series UID {spec.t1w_series_uid}) could "
                     "be read")
    elif with_t1w and plan.t1w is not None:
        gone = _outside(_plan_paths((plan.t1w.frames,)), spec.t1w_files)
        if gone:
            t1w_error = (f"the T1w series (series UID {spec.t1w_series_uid}) no longer makes "
                         f"a T1w reference for this acquisition ({gone})")
    try:
        loaded = load_acquisition(plan, _checked_reader(plan),
                                  with_t1w=with_t1w and not t1w_error)
    except _Changed as exc:
        raise JobError(f"the spool files no longer make this acquisition: series "
                       f"{_numbers(plan.series_numbers)}: {exc}") from None
    except LoadError as exc:
        raise JobError(f"cannot load the acquisition: {exc}") from None
    if t1w_error:
        loaded = dataclasses.replace(loaded, t1w_error=t1w_error)
    return loaded


def _numbers(numbers: Sequence[int | None]) -> str:
    return ", ".join("?" if n is None else str(n) for n in numbers)


def _unreadable(paths: Sequence[str]) -> int:
    """How many of ``paths`` cannot be opened or do not start as a DICOM file (the receiver
    writes each with its Part 10 preamble)."""
    count = 0
    for path in paths:
        try:
            with open(path, "rb") as file:
                head = file.read(132)
        except OSError:
            head = b""
        count += head[128:132] != b"DICM"
    return count


def _plan_paths(*tables: Any) -> list[str]:
    """The distinct file paths of a plan's frame tables (``[k][e]``), in order."""
    paths: dict[str, None] = {}
    for table in tables:
        for row in table or ():
            for ref in row:
                paths[str(ref.path)] = None
    return list(paths)


def _outside(paths: list[str], files: Sequence[str]) -> str:
    """Which of a plan's ``paths`` are not among the job's spool ``files``, in words ('' when
    all are)."""
    known = set(files)
    missing = [p for p in paths if p not in known]
    if not missing:
        return ""
    return (f"{len(missing)} of its {len(paths)} files {'is' if len(missing) == 1 else 'are'} "
            f"missing from the spool (first: {missing[0]})")


class _Changed(ValueError):
    """A spool file whose header no longer says what it said when it was grouped."""


_CHECKED_FIELDS = {"sop_class_uid": "SOPClassUID", "sop_instance_uid": "SOPInstanceUID",
                   "study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID",
                   "frame_of_reference_uid": "FrameOfReferenceUID", "rows": "Rows",
                   "columns": "Columns"}
"""The instance fields a plan relies on (besides its frames), with their DICOM keywords."""


def _change(recorded: Any, now: Any) -> str:
    """What differs between the summary an instance was grouped with and its summary now, in
    words ('' when nothing the plan relies on does): its identity, matrix or frames."""
    for name, keyword in _CHECKED_FIELDS.items():
        if getattr(recorded, name) != getattr(now, name):
            return f"its {keyword} is not the one it was grouped with"
    if len(recorded.frames) != len(now.frames):
        return f"{len(now.frames)} frames, grouped with {len(recorded.frames)}"
    for number, (was, is_) in enumerate(zip(recorded.frames, now.frames, strict=True), 1):
        if was == is_:
            continue
        where = f"frame {number}: " if len(now.frames) > 1 else ""
        for name in dataclasses.fields(was):
            old, new = getattr(was, name.name), getattr(is_, name.name)
            if old == new:
                continue
            if name.name == "echo_time_s":
                def te(value: float | None) -> str:
                    return "TE unknown" if value is None else f"TE {value * 1000:g} ms"
                return f"{where}{te(new)} (grouped with {te(old)})"
            return f"{where}{name.name.replace('_', ' ')} {new} (grouped with {old})"
    return ""


def _checked_reader(plan: Any) -> Callable[[str], Dataset]:
    """A reader for :func:`~qsmnode.dicom.load.load_acquisition` that checks each file of
    ``plan`` (and of its T1w) against the summary it was grouped with.

    Raises (from the reader):
        _Changed: a file no longer says what it said (a :class:`LoadError` for the T1w).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from qsmnode.dicom.headers import HeaderError, summarize
    from qsmnode.dicom.load import LoadError

    recorded = {ref.path: ref.instance
                for table in (plan.magnitude, plan.phase or (),
                              (plan.t1w.frames,) if plan.t1w is not None else ())
                for row in table for ref in row}

    class Changed(_Changed, LoadError):
        """Also a :class:`LoadError`: a changed T1w file leaves the GRE loaded alone."""

    def read(path: str) -> Dataset:
        try:
            ds = pydicom.dcmread(path)
            now = summarize(ds)
        except (InvalidDicomError, EOFError, HeaderError) as exc:
            raise LoadError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
        info = recorded.get(path)
        change = "" if info is None else _change(info, now)
        if change:
            raise Changed(f"{Path(path).name} changed since it was grouped: {change}")
        return ds

    return read


def regroup_job_acquisition(spec: JobSpec) -> Any:
    """Group the spec's files again and load the acquisition made of exactly its series (for
    an acquisition recorded without its plan, before plans were kept).

    Raises:
        JobError: the files no longer make that acquisition (the reason is given).
    """
    from qsmnode.dicom.load import (
        AcquisitionPlan,
        LoadError,
        group_acquisitions,
        load_acquisition,
        summarize_files,
    )

    infos = summarize_files(spec.files)
    if len(infos) != len(spec.files):
        raise JobError(f"only {len(infos)} of {len(spec.files)} spool files could be read")
    t1w_infos = summarize_files(spec.t1w_files)
    t1w_error = spec.t1w_error
    if len(t1w_infos) != len(spec.t1w_files):
        t1w_error = (f"only {len(t1w_infos)} of {len(spec.t1w_files)} spool files of the T1w "
                     f"series (series UID {spec.t1w_series_uid}) could be read")
        t1w_infos = []
    wanted = set(spec.series_uids)
    results = group_acquisitions(infos + t1w_infos, min_echoes=spec.min_echoes,
                                 require_phase=spec.require_phase, pass_over=spec.pass_over,
                                 qsm_series=spec.qsm_series)
    for item in results:
        if isinstance(item, AcquisitionPlan) and set(item.series_uids) == wanted:
            try:
                loaded = load_acquisition(item)
            except LoadError as exc:
                raise JobError(f"cannot load the acquisition: {exc}") from None
            if spec.t1w_series_uid is not None and loaded.t1w is None and not loaded.t1w_error:
                t1w_error = t1w_error or (
                    f"the T1w series (series UID {spec.t1w_series_uid}) no longer makes a T1w "
                    f"reference for this acquisition ({loaded.t1w_note or 'not found'})")
                loaded = dataclasses.replace(loaded, t1w_error=t1w_error)
            return loaded
    reasons = "; ".join(getattr(item, "reason", "") for item in results if
                        not isinstance(item, AcquisitionPlan))
    raise JobError(
        "the spool files no longer make this acquisition" + (f": {reasons}" if reasons else "")
    )


def write_job_outputs(spec: JobSpec, datasets: Sequence[Dataset]) -> list[Path]:
    """Write a job's derived datasets as files under :attr:`JobSpec.derived_dir`, then a
    manifest naming them in order (written last: without it the parent takes no files)."""
    from qsmnode.dicom.files import write_datasets

    folder = spec.derived_dir
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_datasets(datasets, folder)
    manifest = folder / MANIFEST_FILENAME
    temp = folder / f".{MANIFEST_FILENAME}.{os.getpid()}.tmp"
    temp.write_text(json.dumps([p.relative_to(folder).as_posix() for p in paths]))
    os.replace(temp, manifest)
    return paths


def job_outputs(work_dir: Path) -> list[Path]:
    """The derived files a finished attempt left (none without a manifest), in order.

    Raises:
        JobError: the manifest names a file that is not there.
    """
    folder = Path(work_dir) / DERIVED_DIRNAME
    try:
        names = json.loads((folder / MANIFEST_FILENAME).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot read the list of derived files: {exc}") from None
    paths = [folder / name for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise JobError(f"{len(missing)} of {len(paths)} derived files are missing "
                       f"(first: {missing[0].name})")
    return paths


@functools.cache
def _m1_atlas(name: str) -> Any:
    """The registration target and M1 areas of an atlas, read once per process."""
    from qsmnode.dicom.reference_data import load_m1_atlas

    return load_m1_atlas(atlas=name)


def process_acquisition(loaded: Any, files: Sequence[str],
                        qsm: bool = True, m1: bool = True, atlas: str = "hcpex",
                        progress: Callable[[str], None] | None = None,
                        m1_normative_table: str | Path | None = None,
                        z_flag: float = 2.0,
                        follow_up: Any = None,
                        qsm_method: str = DEFAULT_METHOD,
                        ) -> tuple[dict[str, Any], list[Dataset]]:
    """:func:`qsmnode.pipeline.process_acquisition` with the node's settings: the result as
    JSON and the derived datasets. ``files`` are the acquisition's source files; ``qsm``,
    ``m1``, ``atlas`` (a name: the atlas is read here, once per process),
    ``m1_normative_table`` (a file, for z-scores, read here), ``z_flag`` and ``qsm_method``
    are the ``[pipeline]`` settings; ``follow_up`` (a
    :class:`~qsmnode.node.followup.FollowUpSource`, or None) is where the patient's earlier
    results are looked for before the pipeline runs (``[follow_up]``, stage ``priors``).

    Raises:
        JobError: the pipeline found the acquisition unfit, or the normative table is bad.
    """
    from qsmnode.node.normative import NormativeTableError, load_normative_table
    from qsmnode.pipeline import EarlierResults, PipelineError
    from qsmnode.pipeline import process_acquisition as run

    with_m1 = qsm and m1
    normative = None
    if with_m1 and m1_normative_table is not None:
        try:
            normative = load_normative_table(str(m1_normative_table))
        except NormativeTableError as exc:
            raise JobError(f"pipeline.m1_normative_table: {exc}") from None
    earlier = None
    if with_m1 and follow_up is not None:
        from qsmnode.node.followup import find_priors

        if progress is not None:
            progress("priors")
        priors, prior_note = find_priors(follow_up, loaded)
        earlier = EarlierResults(priors, prior_note, follow_up.limits)
    try:
        result = run(loaded, files, qsm=qsm, qsm_method=qsm_method,
                     m1_atlas=_m1_atlas(atlas) if with_m1 else None, normative=normative,
                     z_flag=z_flag, earlier=earlier, progress=progress)
    except PipelineError as exc:
        raise JobError(str(exc)) from None
    return result.to_json(), list(result.datasets)


def _follow_up_source(spec: JobSpec) -> Any:
    from qsmnode.node.followup import FollowUpSource

    return None if spec.follow_up is None else FollowUpSource.from_json(spec.follow_up)


def read_progress(state_dir: Path, job_id: int, attempt: int) -> dict[str, Any] | None:
    """What an attempt's progress file says (see :func:`execute_job`); None when it has none
    yet or it cannot be read."""
    try:
        data = json.loads((attempt_dir(state_dir, job_id, attempt) / PROGRESS_FILENAME)
                          .read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def execute_job(spec: JobSpec) -> dict[str, Any]:
    """The default job function: load the acquisition from the spool, run the pipeline and
    leave its derived datasets for the outbox."""
    started = time.time()
    timeline: list[tuple[str, float]] = []

    def progress(stage: str | None) -> None:
        """Write ``{"stage", "since", "started", "done": {stage: seconds}}`` to the attempt's
        progress file, replaced atomically (read by ``qsmnode demo``); None: all done."""
        now = time.time()
        timeline.append((stage or "", now))
        done = {name: round(end - start, 3)
                for (name, start), (_, end) in itertools.pairwise(timeline)}
        temp = spec.progress_path.with_suffix(".tmp")
        try:  # progress is for display: failing to show it must not fail the job
            temp.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps({"stage": stage, "since": now, "started": started,
                                        "done": done}))
            os.replace(temp, spec.progress_path)
        except OSError as exc:
            log.warning("job %d: cannot write its progress: %s", spec.job_id, exc)

    progress("load")
    loaded = None
    try:
        loaded = load_job_acquisition(spec)
        result, datasets = process_acquisition(
            loaded, spec.files, qsm=spec.qsm, qsm_method=spec.qsm_method, m1=spec.m1,
            atlas=spec.atlas, progress=progress,
            m1_normative_table=spec.m1_normative_table, z_flag=spec.z_flag,
            follow_up=_follow_up_source(spec))
    except (JobError, MemoryError, OSError):
        raise
    except Exception as exc:  # from the input (e.g. a header the builders cannot use): final
        stage = timeline[-1][0] if timeline else "load"
        raise input_error(spec, loaded, stage, exc) from exc
    progress("write")
    write_job_outputs(spec, datasets)
    progress(None)
    return result
