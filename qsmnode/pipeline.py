"""The pipeline: the one way to process an acquisition.

:func:`run_pipeline` takes a :class:`~qsmnode.dicom.load.LoadedAcquisition` and runs the stages
in order, each a small function that reads what earlier stages produced from a
:class:`_Context` and adds its own output:

1. ``check``: the loaded arrays are sane (finite magnitude, phase in [-π, π) when present,
   echo times ascending) and summarized (:class:`AcquisitionSummary`).
2. ``qsm``: susceptibility and R2* (:func:`qsmnode.qsm.engine.run_qsm`), only on a 3-D
   volume of contiguous slices. Slices further apart than they are thick (a 2-D protocol
   with a slice gap, as the seed study's targeted M1 acquisition, Cosottini 2016) get no QSM:
   the dipole model needs contiguous voxels. R2*, the T2*-weighted combined magnitude and
   the brain mask are still computed (:func:`qsmnode.qsm.engine.run_relaxometry`, χ NaN),
   and the rest of the pipeline runs on them: the M1 analysis measures R2*, the T2*-weighted
   signal ratio and thickness (χ NaN, left out of the report), its flags carry a failed
   ``qsm_computed`` flag saying why, and the derived objects are the R2* maps, the SEG, the
   SR and key images showing R2* (with that reason) in place of χ; a normative table is not
   applied (it is of the QSM protocol: it holds χ norms), so there is no z-score
   (:attr:`PipelineResult.qsm_not_computed` holds the reason for the record). This holds
   whatever the slice count: with too few slices for the M1 analysis its error is recorded
   and the R2* objects still go out. A χ map or
   field that comes out implausibly flat (:func:`qsmnode.qsm.quality.map_ranges`: a spread
   below the floor, e.g. from a phase that carries no field) stops it too, before anything is
   built or sent.
3. ``m1``: the M1 analysis (:func:`qsmnode.m1.analysis.analyse_m1`) when an atlas is given.
   A failure here is recorded in the result (``m1_error``) and the maps still go out. With a
   same-session T1w (:attr:`PipelineParams.t1w`) the T1w is registered to the template; when
   that raises or its quality is below the acceptable level, or the T1w could not be loaded
   (:attr:`PipelineParams.t1w_error`), the GRE magnitude is registered instead.
   **Thickness on a 2-D slab with thick slices** is what the layer code gives on that grid
   (Laplace depth and Yezzi–Prince thickness with the true, anisotropic voxel size): cortex
   running within a slice is resolved at the in-plane voxel size, but where the ribbon runs
   through the slices (cut obliquely, or along the slice direction) one thick voxel holds
   the whole ribbon and the gaps hold nothing, so the thickness there is coarse and biased
   towards partial-volume widths; the through-slice blur of a real 2-D slice profile is not
   modelled either (the simulated slab samples the slice centres). Measured on the simulated
   0.6 × 0.6 mm slab with 2.4 mm slices (2.0 mm thick, 0.4 mm gaps): area thickness within
   0.2 mm of the simulator's truth (tests/test_pipeline.py). Either way the
   flag ``t1w_reference`` says which, and why, and ``m1["t1w"]`` in the record.
   With :attr:`PipelineParams.priors` (the patient's earlier results, found by the service),
   the result is compared with them (:func:`qsmnode.m1.followup.compare`); the comparison
   goes into the record (``m1["follow_up"]``), the SR and the key images. Priors that could
   not be looked up (:attr:`PipelineParams.prior_note`) give no comparison, and say why.
4. ``derived``: every derived DICOM object (:func:`qsmnode.dicom.derived.build_derived`).

:func:`process_acquisition` is the one entry point: it checks the source header the derived
objects copy from (:func:`check_source_header`), takes the acquisition's T1w and runs the
stages. The node's worker calls it in a child process (through :mod:`qsmnode.node.jobs`), and
the offline ``qsmnode process DIR`` calls it too, so both give the same result. It knows
nothing of the network, the store or the configuration file: the M1 atlas, the normative
table and the patient's earlier results come in already loaded (the callers read them at the
edge: :func:`qsmnode.dicom.reference_data.load_m1_atlas`,
:func:`qsmnode.node.normative.load_normative_table`, :func:`qsmnode.node.followup.find_priors`),
and everything it makes goes out in the :class:`PipelineResult`; it writes no files.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from qsmnode import __version__
from qsmnode.dicom.derived import build_derived
from qsmnode.dicom.derived.common import source_fixes, source_reader
from qsmnode.dicom.derived.key_images import Z_FLAG
from qsmnode.dicom.headers import slice_thickness_mm
from qsmnode.dicom.load import LoadedAcquisition, LoadedT1w
from qsmnode.dicom.reference_data import brain_prior_for
from qsmnode.m1.analysis import M1Atlas, M1Params, SameSessionT1w, analyse_m1
from qsmnode.m1.followup import FollowUp, PriorResult, Protocol, RetestLimits, compare
from qsmnode.m1.measure import NormativeTable
from qsmnode.m1.register import brain_prior_function
from qsmnode.m1.result import M1Result, QualityFlag
from qsmnode.qsm import DEFAULT_METHOD
from qsmnode.qsm.engine import METHODS, QSMParams, QSMResult, run_qsm, run_relaxometry
from qsmnode.qsm.quality import map_ranges

log = logging.getLogger(__name__)

PIPELINE_VERSION = "0.1"
"""Version of the processing: part of the result and of the derived objects' UIDs."""

MIN_SLICES_FOR_QSM = 8
SLICE_GAP_TOLERANCE = 0.05
"""Slices further apart than their thickness by more than this fraction of it have gaps: the
field-to-source model of QSM needs contiguous voxels, so QSM is not computed on them."""
"""Fewer slices than this cannot hold a 3-D field for background removal and inversion."""


class PipelineError(RuntimeError):
    """The acquisition cannot be processed; the message says why in plain words."""


@dataclass(frozen=True)
class PipelineParams:
    """What the stages may need besides the acquisition.

    Attributes:
        source_files: the acquisition's source files (the derived objects reference them);
            empty: no derived objects.
        qsm: run QSM (and so the M1 analysis and the derived objects).
        qsm_method: the QSM pipeline by name (``qsmnode.qsm.engine.METHODS``; ``[pipeline]
            qsm_method``); its parameters are :attr:`qsm_params`.
        m1_atlas: template and M1 areas for the M1 analysis; None: no M1 analysis.
        t1w: the same-session T1w to register to the template (None: the GRE magnitude).
        t1w_note: the grouping's note on the study's T1w series (for the record).
        t1w_error: why the chosen T1w could not be loaded (the GRE is registered instead).
        z_flag: a deep-layer χ z-score at or beyond it (either sign) is flagged on the key
            images and is the Key Object Selection's finding (``[pipeline] z_flag``).
        priors: the patient's earlier results to compare with (None: no follow-up; empty:
            none was found).
        prior_note: why the earlier results could not be looked up (then no comparison; the
            report says so).
        retest_limits: the test–retest limits of the comparison.
    """

    source_files: tuple[Path, ...] = ()
    qsm: bool = True
    qsm_method: str = DEFAULT_METHOD
    m1_atlas: M1Atlas | None = None
    m1_params: M1Params = field(default_factory=M1Params)
    normative: NormativeTable | None = None
    t1w: LoadedT1w | None = None
    t1w_note: str = ""
    t1w_error: str = ""
    z_flag: float = Z_FLAG
    priors: tuple[PriorResult, ...] | None = None
    prior_note: str = ""
    retest_limits: RetestLimits = field(default_factory=RetestLimits)

    def __post_init__(self) -> None:
        if self.qsm_method not in METHODS:
            raise ValueError(f"unknown QSM method {self.qsm_method!r}: expected one of "
                             f"{', '.join(METHODS)}")

    @property
    def qsm_params(self) -> QSMParams:
        """The QSM engine's parameters of :attr:`qsm_method`."""
        return METHODS[self.qsm_method]


def algorithm_version(qsm_method: str = DEFAULT_METHOD) -> str:
    """The version that goes into the derived objects and that a follow-up compares: the
    package's, the pipeline's and the QSM method's (``[pipeline] qsm_method``), so that a
    result is never compared with one that another method made."""
    return f"{__version__}/{PIPELINE_VERSION}/{qsm_method}"


@dataclass(frozen=True)
class AcquisitionSummary:
    """What was loaded: enough to check an acquisition against its source without arrays."""

    study_uid: str
    series_uids: tuple[str, ...]
    series_numbers: tuple[int | None, ...]
    vendor: str
    field_strength_t: float
    shape: tuple[int, int, int]
    """``(i, j, k)`` voxels."""
    n_echoes: int
    echo_times_s: tuple[float, ...]
    voxel_size_mm: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]
    """4×4 voxel-to-RAS+ affine, rows."""
    b0_direction: tuple[float, float, float]
    has_phase: bool
    phase_scaling: str
    phase_sign: int
    magnitude_range: tuple[float, float]
    phase_range: tuple[float, float] | None


@dataclass(frozen=True)
class StageRecord:
    """One stage that ran, and how long it took."""

    name: str
    seconds: float


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of :func:`run_pipeline`.

    ``qsm_quality`` and ``m1`` hold numbers and text for the job record; ``datasets`` (the
    derived DICOM objects) stay out of :meth:`to_json`.
    """

    acquisition: AcquisitionSummary
    stages: tuple[StageRecord, ...]
    version: str = PIPELINE_VERSION
    qsm_method: str = DEFAULT_METHOD
    """The QSM pipeline by name (``[pipeline] qsm_method``)."""
    qsm_not_computed: str = ""
    """Why QSM was not computed although R2* and the M1 analysis were ("" when it was)."""
    qsm_quality: dict[str, Any] = field(default_factory=dict)
    m1: dict[str, Any] = field(default_factory=dict)
    datasets: tuple[Dataset, ...] = field(default=(), compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dictionary (tuples become lists), without the datasets."""
        plain = {
            "acquisition": asdict(self.acquisition),
            "stages": [asdict(stage) for stage in self.stages],
            "version": self.version,
            "qsm_method": self.qsm_method,
            "qsm_not_computed": self.qsm_not_computed,
            "qsm_quality": self.qsm_quality,
            "m1": self.m1,
            "derived_objects": len(self.datasets),
        }
        return json.loads(json.dumps(plain, default=_json_default))  # type: ignore[no-any-return]


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@dataclass
class _Context:
    """What the stages share: the input, the parameters, and each stage's output."""

    loaded: LoadedAcquisition
    params: PipelineParams
    summary: AcquisitionSummary | None = None
    stages: list[StageRecord] = field(default_factory=list)
    qsm: QSMResult | None = None
    qsm_not_computed: str = ""
    """Why ``qsm`` holds R2* and the mask but no χ (see the module docstring)."""
    m1: M1Result | None = None
    m1_record: dict[str, Any] = field(default_factory=dict)
    follow_up: FollowUp | None = None
    datasets: tuple[Dataset, ...] = ()


Stage = Callable[[_Context], None]


def _check(ctx: _Context) -> None:
    """The loaded arrays are sane; summarize them."""
    ctx.summary = check_acquisition(ctx.loaded)


def check_acquisition(loaded: LoadedAcquisition) -> AcquisitionSummary:
    """The summary of a loaded acquisition whose arrays are sane (stage ``check``).

    Raises:
        PipelineError: a value is not finite, the echo times are not positive and ascending,
            or the phase is outside [-π, π).
    """
    gre = loaded.gre
    magnitude = gre.magnitude
    if not np.isfinite(magnitude).all():
        bad = int(np.count_nonzero(~np.isfinite(magnitude)))
        raise PipelineError(f"the magnitude holds {bad} values that are not finite numbers")
    tes = gre.echo_times_s
    if any(b <= a for a, b in itertools.pairwise(tes)) or tes[0] <= 0:
        raise PipelineError(f"echo times are not positive and ascending: {tes}")
    phase_range = None
    if loaded.has_phase:
        phase = gre.phase
        if not np.isfinite(phase).all():
            bad = int(np.count_nonzero(~np.isfinite(phase)))
            raise PipelineError(f"the phase holds {bad} values that are not finite numbers")
        lo, hi = float(phase.min()), float(phase.max())
        pi = float(np.float32(np.pi))  # float32 π is a little above π: wrapped phase meets it
        if lo < -pi or hi >= pi:
            raise PipelineError(f"the phase spans {lo:.4f}..{hi:.4f} rad, outside [-π, π)")
        phase_range = (lo, hi)
    return AcquisitionSummary(
        study_uid=loaded.study_uid,
        series_uids=tuple(loaded.series_uids),
        series_numbers=tuple(loaded.series_numbers),
        vendor=str(loaded.vendor),
        field_strength_t=float(gre.field_strength_t),
        shape=tuple(int(n) for n in gre.shape),  # type: ignore[arg-type]
        n_echoes=gre.n_echoes,
        echo_times_s=tuple(float(t) for t in tes),
        voxel_size_mm=tuple(float(v) for v in gre.voxel_size_mm),  # type: ignore[arg-type]
        affine=tuple(tuple(float(v) for v in row) for row in np.asarray(gre.affine)),
        b0_direction=tuple(float(v) for v in gre.b0_direction),  # type: ignore[arg-type]
        has_phase=loaded.has_phase,
        phase_scaling=loaded.phase_scaling,
        phase_sign=loaded.phase_sign,
        magnitude_range=(float(magnitude.min()), float(magnitude.max())),
        phase_range=phase_range,
    )


def _qsm(ctx: _Context) -> None:
    """Susceptibility (ppm) and R2* (s⁻¹) from the multi-echo magnitude and phase."""
    if not ctx.params.qsm:
        return
    loaded, gre = ctx.loaded, ctx.loaded.gre
    if not loaded.has_phase:
        raise PipelineError("QSM needs the phase images, and this acquisition has none")
    gap = slice_gap_reason(loaded)  # a 2-D protocol: R2* needs no 3-D volume, so first
    if gap:
        log.warning("study %s: %s; R2* and the T2*-weighted M1 analysis go on without χ",
                    loaded.study_uid, gap)
        ctx.qsm = run_relaxometry(gre.magnitude, gre.echo_times_s, gre.voxel_size_mm,
                                  ctx.params.qsm_params)
        ctx.qsm.quality["qsm_not_computed"] = gap
        ctx.qsm_not_computed = gap
        return
    if min(gre.shape) < MIN_SLICES_FOR_QSM:
        raise PipelineError(
            f"QSM needs a 3-D volume: this acquisition is {gre.shape[0]}×{gre.shape[1]}×"
            f"{gre.shape[2]} voxels (at least {MIN_SLICES_FOR_QSM} along every axis)"
        )
    atlas = ctx.params.m1_atlas  # a template gives a whole head's mask the brain's outline
    affine = np.asarray(gre.affine, dtype=np.float64)
    prior = (brain_prior_for(affine) if atlas is None
             else brain_prior_function(affine, atlas.template, atlas.template_affine))
    result = run_qsm(gre.magnitude, gre.phase, gre.echo_times_s, gre.voxel_size_mm,
                     gre.b0_direction, gre.field_strength_t, ctx.params.qsm_params,
                     brain_prior=prior)
    _check_plausible(loaded, result)
    ctx.qsm = result


def slice_gap_reason(loaded: LoadedAcquisition) -> str:
    """Why QSM cannot be computed on slices with gaps ("" when the slices are contiguous, or
    their thickness is not recorded)."""
    spacing = float(loaded.gre.voxel_size_mm[2])
    thickness = slice_thickness_mm(loaded.header)
    if thickness is None or spacing - thickness <= max(SLICE_GAP_TOLERANCE * thickness, 0.01):
        return ""
    return (f"QSM was not computed: the slices have gaps ({spacing:.3g} mm apart but "
            f"{thickness:.3g} mm thick, a gap of {spacing - thickness:.3g} mm, as in a 2-D "
            "protocol with a slice gap) and QSM needs contiguous slices")


QSM_FLAG = "qsm_computed"
"""Name of the quality flag that says QSM was not computed, and why (present only then)."""


def _check_plausible(loaded: LoadedAcquisition, result: QSMResult) -> None:
    """The plausibility gate after QSM: a χ map or field too flat to come from a head (see
    :func:`qsmnode.qsm.quality.map_ranges` for the floors) is not a result. The spreads go
    into the quality record; a flat one stops the pipeline before anything is built."""
    ranges = map_ranges(result.chi_ppm, result.qsm_mask, result.local_field_ppm,
                        result.total_field_ppm, result.mask)
    result.quality["map_ranges_ppm"] = {
        key: {"p1": r.p1_ppm, "p99": r.p99_ppm, "voxels": r.voxels, "floor": r.floor_ppm}
        for key, r in zip(("chi", "local_field", "total_field"), ranges, strict=True)}
    flat = [r for r in ranges if r.flat]
    if flat:
        series = ", ".join("?" if n is None else str(n) for n in loaded.series_numbers)
        if ranges[2].flat:  # the total field itself: nothing came from the phase
            why = "The phase images carry no usable field (constant or scaled to nothing?)"
        else:
            voxel = " x ".join(f"{v:.3g}" for v in loaded.gre.voxel_size_mm)
            why = (f"The phase carries a field but QSM found no contrast in it (voxels of "
                   f"{voxel} mm: too coarse for QSM?)")
        raise PipelineError(
            f"series {series}: implausibly flat result: "
            + "; ".join(r.text() for r in flat)
            + f". {why}; the maps are not delivered as a valid result")


T1W_FLAG = "t1w_reference"
"""Name of the quality flag that says whether the registration went through a T1w."""


def _m1(ctx: _Context) -> None:
    """The M1 analysis. Its failure (for example a registration that cannot start on a slab
    without cortex) is recorded, and the maps are still delivered. A T1w that cannot serve
    falls back to the GRE (see the module docstring)."""
    if ctx.qsm is None or ctx.params.m1_atlas is None:
        return
    q, params, t1w = ctx.qsm, ctx.params, ctx.params.t1w
    # the normative table needs χ norms: it was made on the QSM protocol, not on this one
    normative = None if ctx.qsm_not_computed else params.normative
    t1w_record: dict[str, Any] = {"note": params.t1w_note} if params.t1w_note else {}
    if t1w is not None:
        t1w_record.update(t1w.to_json())
    try:
        result, seconds = analyse_m1(
            q.chi_ppm, q.r2star_per_s, q.magnitude,
            q.mask if ctx.qsm_not_computed else q.qsm_mask, ctx.loaded.gre.affine,
            params.m1_atlas, params.m1_params, normative,
            t1w=None if t1w is None else SameSessionT1w(t1w.image, t1w.affine))
    except (ValueError, RuntimeError) as exc:
        ctx.m1_record = {"error": f"the M1 analysis could not run: {exc}"}
        if t1w_record:
            ctx.m1_record["t1w"] = t1w_record
        log.warning("study %s: %s; the maps go out without it", ctx.loaded.study_uid,
                    ctx.m1_record["error"])
        return
    why_not = params.t1w_error or result.t1w_not_used
    flag: QualityFlag | None = None
    if why_not:
        what = (f"the same-session T1w {t1w.reference.brief()}" if t1w is not None
                else "the same-session T1w")
        text = f"{what} was not used: {why_not}; the GRE magnitude was registered instead"
        flag = QualityFlag(T1W_FLAG, False, None, text)
        log.warning("study %s: %s", ctx.loaded.study_uid, text)
    elif t1w is not None:
        flag = QualityFlag(T1W_FLAG, True, None,
                           f"registered through the same-session T1w {t1w.reference.brief()}")
    if flag is not None:
        result = replace(result, flags=(*result.flags, flag))
    if ctx.qsm_not_computed:
        result = replace(result, flags=(*result.flags, QualityFlag(
            QSM_FLAG, False, None, ctx.qsm_not_computed)))
        if params.normative is not None:
            ctx.m1_record["normative"] = (
                "not applied: the normative table is of the QSM protocol (it holds χ norms), "
                "and this acquisition is not; no z-scores")
    if t1w_record or flag is not None:
        t1w_record["used"] = flag is not None and flag.passed
        if why_not:
            t1w_record["why_not"] = why_not
    for failed in (f for f in result.flags
                   if not f.passed and f.name not in (T1W_FLAG, QSM_FLAG)):
        log.warning("study %s: M1 quality check %s failed: %s", ctx.loaded.study_uid,
                    failed.name, failed.text)
    ctx.m1 = result
    ctx.m1_record = {
        **ctx.m1_record,
        "seconds": seconds,
        "measurements": [asdict(m) for m in result.measurements],
        "flags": [asdict(f) for f in result.flags],
    }
    if t1w_record:
        ctx.m1_record["t1w"] = t1w_record
    _follow_up(ctx, result)


def _study_date(loaded: LoadedAcquisition) -> dt.date | None:
    text = str(loaded.header.get("StudyDate", "") or "").strip()
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def acquisition_protocol(loaded: LoadedAcquisition) -> Protocol:
    """What a follow-up compares of this acquisition with an earlier one's (field strength,
    voxel size, echo times and slice thickness): the same values its SR's protocol group
    records (:mod:`qsmnode.dicom.derived.followup`)."""
    gre = loaded.gre
    return Protocol(float(gre.field_strength_t),
                    tuple(float(v) for v in gre.voxel_size_mm),  # type: ignore[arg-type]
                    tuple(float(t) for t in gre.echo_times_s),
                    slice_thickness_mm(loaded.header))


def _follow_up(ctx: _Context, result: M1Result) -> None:
    """Compare the M1 result with the patient's earlier ones (when asked); the record gets
    ``follow_up``: the note, the prior compared with, every change, the history."""
    params = ctx.params
    if params.priors is None and not params.prior_note:
        return
    date = _study_date(ctx.loaded)
    if params.prior_note:
        follow = FollowUp(None, (), (), (), f"no comparison: {params.prior_note}",
                          study_date=date)
    elif date is None:
        follow = FollowUp(None, (), (), (), "no comparison: the study has no valid StudyDate")
    else:
        follow = compare(result, date, acquisition_protocol(ctx.loaded),
                         algorithm_version(params.qsm_method),
                         params.priors or (), params.retest_limits)
    log.info("study %s: follow-up: %s", ctx.loaded.study_uid, _log_text(follow))
    ctx.follow_up = follow
    ctx.m1_record["follow_up"] = follow_up_record(follow)


def _log_text(follow: FollowUp) -> str:
    """The follow-up for the log: report UIDs and counts, no dates (study module values)."""
    if follow.prior is not None:
        return (f"compared with report {follow.prior.report_uid}: "
                f"{len(follow.exceeding())} of {len(follow.changes)} changes beyond the "
                "test-retest limit")
    if follow.history:
        return (f"no comparison: none of {len(follow.history)} earlier results is comparable "
                f"({'; '.join(sorted({why for _, why in follow.not_comparable}))})")
    return "no comparison" if follow.note.startswith("no comparison") else follow.note


def follow_up_record(follow: FollowUp) -> dict[str, Any]:
    """The follow-up as JSON for the job record (the status page and the ORU read it)."""
    prior = follow.prior
    return {
        "note": follow.note,
        "years": follow.years,
        "prior": None if prior is None else {
            "study_uid": prior.study_uid, "study_date": prior.study_date.isoformat(),
            "report_uid": prior.report_uid, "algorithm_version": prior.algorithm_version},
        "changes": [asdict(c) for c in follow.changes],
        "history": [{"study_uid": p.study_uid, "study_date": p.study_date.isoformat(),
                     "report_uid": p.report_uid, "algorithm_version": p.algorithm_version}
                    for p in follow.history],
        "not_comparable": [{"study_date": p.study_date.isoformat(), "why": why}
                           for p, why in follow.not_comparable],
    }


def _derived(ctx: _Context) -> None:
    """The derived DICOM objects: maps, segmentation, report and key images."""
    if ctx.qsm is None or not ctx.params.source_files:
        return
    note = ctx.m1_record.get("error")
    if ctx.m1 is None and ctx.params.m1_atlas is None:
        note = "the M1 analysis is turned off in this node's configuration (pipeline.m1)"
    ctx.datasets = tuple(build_derived(
        ctx.loaded, ctx.qsm.chi_ppm, ctx.qsm.r2star_per_s, ctx.m1,
        source_reader(ctx.params.source_files), algorithm_version(ctx.params.qsm_method),
        m1_note=note, z_flag=ctx.params.z_flag, follow_up=ctx.follow_up,
        qsm_note=ctx.qsm_not_computed or None,
    ))


STAGES: tuple[tuple[str, Stage], ...] = (
    ("check", _check),
    ("qsm", _qsm),
    ("m1", _m1),
    ("derived", _derived),
)
"""The stages, in order."""


def run_pipeline(loaded: LoadedAcquisition, params: PipelineParams | None = None,
                 progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Process one loaded acquisition through every stage; ``progress`` is told the name of
    each stage as it starts.

    Raises:
        PipelineError: a stage found the acquisition unfit; the message says why.
    """
    ctx = _Context(loaded, params or PipelineParams())
    for name, stage in STAGES:
        if progress is not None:
            progress(name)
        started = time.perf_counter()
        stage(ctx)
        ctx.stages.append(StageRecord(name, round(time.perf_counter() - started, 6)))
    assert ctx.summary is not None
    quality = dict(ctx.qsm.quality) if ctx.qsm is not None else {}
    quality.pop("params", None)
    return PipelineResult(acquisition=ctx.summary, stages=tuple(ctx.stages),
                          qsm_method=ctx.params.qsm_method,
                          qsm_not_computed=ctx.qsm_not_computed, qsm_quality=quality,
                          m1=ctx.m1_record, datasets=ctx.datasets)


@dataclass(frozen=True)
class EarlierResults:
    """The patient's earlier results for a follow-up comparison, as the caller found them
    (the node asks the PACS: :func:`qsmnode.node.followup.find_priors`).

    Attributes:
        priors: the earlier results (empty: none was found); None: they could not be looked
            up, and ``note`` says why.
        note: why they could not be looked up ("" when they were).
        limits: the test–retest limits of the comparison.
    """

    priors: tuple[PriorResult, ...] | None
    note: str = ""
    limits: RetestLimits = field(default_factory=RetestLimits)


def check_source_header(loaded: Any) -> list[str]:
    """What the derived objects will not copy as it is from the acquisition's source header
    (:func:`~qsmnode.dicom.derived.common.source_fixes`: an absent or invalid Type 2 patient or
    study value is left empty, an empty sequence left out), logged before the pipeline runs, so
    that a value the build cannot take is known before QSM spends its time. The phrases name
    attributes only, never their values (patient data)."""
    header = getattr(loaded, "header", None)
    if not isinstance(header, Dataset):
        return []
    fixes = source_fixes(header)
    if fixes:
        invalid = any("not a valid value" in fix for fix in fixes)
        log.log(logging.WARNING if invalid else logging.INFO,
                "series %s: the derived objects will not copy the source header as it is: %s",
                ", ".join("?" if n is None else str(n)
                          for n in getattr(loaded, "series_numbers", ()) or ()),
                "; ".join(fixes))
    return fixes


def process_acquisition(loaded: LoadedAcquisition, source_files: Sequence[str | Path], *,
                        qsm: bool = True, qsm_method: str = DEFAULT_METHOD,
                        m1_atlas: M1Atlas | None = None,
                        normative: NormativeTable | None = None, z_flag: float = Z_FLAG,
                        earlier: EarlierResults | None = None,
                        progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Process one loaded acquisition: the one way to do it (see the module docstring).

    ``source_files`` are the acquisition's source files (the derived objects reference them);
    ``qsm``, ``qsm_method`` and ``z_flag`` (the |z| the key images and the KOS flag) are the
    ``[pipeline]`` settings; ``m1_atlas`` (None: no M1 analysis) and ``normative`` (None: no
    z-scores) are loaded by the caller; ``earlier`` (None: no follow-up) holds the patient's earlier
    results. The acquisition's T1w (``loaded.t1w``, its note and error) goes to the M1
    analysis. ``progress`` is told each stage's name as it starts.

    Raises:
        PipelineError: a stage found the acquisition unfit; the message says why.
    """
    check_source_header(loaded)
    params = PipelineParams(
        source_files=tuple(Path(f) for f in source_files),
        qsm=qsm,
        qsm_method=qsm_method,
        m1_atlas=m1_atlas,
        normative=normative,
        t1w=getattr(loaded, "t1w", None),
        t1w_note=getattr(loaded, "t1w_note", ""),
        t1w_error=getattr(loaded, "t1w_error", ""),
        z_flag=z_flag,
        **({} if earlier is None else {"priors": earlier.priors, "prior_note": earlier.note,
                                       "retest_limits": earlier.limits}),
    )
    return run_pipeline(loaded, params, progress)
