"""Follow-up: the change of the M1 measures since the patient's earlier results.

ALS is progressive; what a neurologist follows is the change of deep-layer χ, thickness and
T2*-weighted signal since the last scan. :func:`compare` takes the current
:class:`~qsmnode.m1.result.M1Result` and the earlier results read back from their reports
(:class:`PriorResult`, plain numbers: how they were found and read is the service's and the
DICOM edge's business) and returns a :class:`FollowUp`: per area and layer the prior value, the
current value, the change, the change per year, and whether the change is beyond the
test–retest limit of that measure.

Only a comparable prior is compared: one made by the same algorithm version, at the same
field strength, with voxels, slice thickness (where both reports record it) and echo times
within :data:`VOXEL_TOLERANCE` and :data:`ECHO_TIME_TOLERANCE`. A prior that is not comparable
is kept (it appears in the history) with the reason, and never compared.

A measure is compared where both results have it. A 2-D protocol with slice gaps has no χ (QSM
is not computed on it, :mod:`qsmnode.pipeline`): two such visits compare the T2* signal ratio
and thickness only, and the note says that χ was not compared and why. The slice thickness
keeps a 2-D acquisition (thin slices with gaps) from being compared with a 3-D one on the same
grid: their T2*-weighted signal and partial volume differ.

The default test–retest limits (:class:`RetestLimits`) are *approx.* starting points, to be
replaced by a site's own repeatability measurements:

- χ 0.010 ppm: the order of between-session differences of cortical and deep-grey χ reported
  by Deh et al., JMRI 2015 ("Reproducibility of quantitative susceptibility mapping in the
  brain at two field strengths from two vendors") and Lancione et al., NeuroImage 2019
  ("Echo-time dependency of QSM reproducibility at different magnetic field strengths");
- thickness 0.25 mm: about twice the between-session SD of cortical thickness (≈ 0.12 mm) in
  Han et al., NeuroImage 2006 ("Reliability of MRI-derived measurements of human cerebral
  cortical thickness");
- T2*-weighted signal ratio 0.05: no published repeatability for this ratio; 5 % of the
  reference signal, a site should measure its own.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from qsmnode.m1.result import AREAS, LAYERS, M1Result

MEASURES = ("chi_mean_ppm", "thickness_mean_mm", "t2star_signal_ratio")
"""The measures followed up, by their :class:`~qsmnode.m1.result.Measurement` field names."""

MEASURE_TEXT = {"chi_mean_ppm": "χ (ppm)", "thickness_mean_mm": "thickness (mm)",
                "t2star_signal_ratio": "T2* signal ratio"}

DAYS_PER_YEAR = 365.25
VOXEL_TOLERANCE = 0.10
"""Voxel sizes comparable: each axis within this fraction of the current one."""
ECHO_TIME_TOLERANCE = 0.10
"""Echo times comparable: the same number, each within this fraction of the current one."""
FIELD_TOLERANCE_T = 0.1


@dataclass(frozen=True)
class Protocol:
    """What the acquisition was: enough to tell whether two results can be compared."""

    field_strength_t: float
    voxel_size_mm: tuple[float, float, float]
    echo_times_s: tuple[float, ...]
    slice_thickness_mm: float | None = None
    """The slices' thickness (less than the third voxel size with slice gaps); None: not
    recorded (reports made before it was), and then not compared."""


@dataclass(frozen=True)
class PriorResult:
    """An earlier result of the same patient, as its report recorded it.

    Attributes:
        study_uid, study_date: the earlier study.
        report_uid: the SOP Instance UID of its report (with ``report_series_uid`` and
            ``report_class_uid``, what a new report references it by).
        algorithm_version: the version that made it.
        protocol: the acquisition it came from (None: the report does not say).
        values: ``(area, layer, measure) → value`` (measure one of :data:`MEASURES`), only
            the covered ones.
    """

    study_uid: str
    study_date: dt.date
    report_uid: str
    report_series_uid: str
    report_class_uid: str
    algorithm_version: str
    protocol: Protocol | None
    values: Mapping[tuple[str, str, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class RetestLimits:
    """The change of each measure beyond which it is more than test–retest variation (see the
    module docstring for the defaults' sources)."""

    chi_mean_ppm: float = 0.010
    thickness_mean_mm: float = 0.25
    t2star_signal_ratio: float = 0.05

    def of(self, measure: str) -> float:
        return float(getattr(self, measure))


@dataclass(frozen=True)
class Change:
    """One area, layer and measure: prior, current, change and change per year."""

    area: str
    layer: str
    measure: str
    prior: float
    current: float
    change: float
    per_year: float | None
    """None when the prior has the same date (no time between them)."""
    limit: float
    exceeds: bool
    """``|change| > limit``: beyond test–retest variation."""


@dataclass(frozen=True)
class FollowUp:
    """The comparison of one result with the patient's earlier ones.

    Attributes:
        prior: the result compared with (the newest comparable one), or None.
        changes: per area, layer and measure present in both (empty without ``prior``).
        history: every earlier result found, oldest first (for a trend).
        not_comparable: ``(prior, why)`` of the earlier results not compared.
        note: one sentence: what was compared, or why nothing was.
    """

    prior: PriorResult | None
    changes: tuple[Change, ...]
    history: tuple[PriorResult, ...]
    not_comparable: tuple[tuple[PriorResult, str], ...]
    note: str

    def exceeding(self) -> list[Change]:
        """The changes beyond their test–retest limit."""
        return [c for c in self.changes if c.exceeds]

    def change(self, area: str, layer: str, measure: str) -> Change | None:
        for c in self.changes:
            if (c.area, c.layer, c.measure) == (area, layer, measure):
                return c
        return None

    years: float | None = None
    """Years between the prior compared with and this study; None without a prior."""
    study_date: dt.date | None = None
    """This study's date (None: not known, nothing compared)."""


def why_not_comparable(current: Protocol, version: str, prior: PriorResult) -> str:
    """Why ``prior`` cannot be compared with a result of ``version`` from ``current`` ("" when
    it can)."""
    if prior.algorithm_version != version:
        return (f"made by algorithm version {prior.algorithm_version or 'unknown'}, not "
                f"{version}")
    p = prior.protocol
    if p is None:
        return "its report does not record the acquisition protocol"
    if abs(p.field_strength_t - current.field_strength_t) > FIELD_TOLERANCE_T:
        return f"acquired at {p.field_strength_t:g} T, not {current.field_strength_t:g} T"
    if any(abs(a - b) > VOXEL_TOLERANCE * b
           for a, b in zip(p.voxel_size_mm, current.voxel_size_mm, strict=True)):
        return ("voxels of " + "×".join(f"{v:.3g}" for v in p.voxel_size_mm) + " mm, not "
                + "×".join(f"{v:.3g}" for v in current.voxel_size_mm) + " mm")
    if (p.slice_thickness_mm is not None and current.slice_thickness_mm is not None
            and abs(p.slice_thickness_mm - current.slice_thickness_mm)
            > VOXEL_TOLERANCE * current.slice_thickness_mm):
        return (f"slices {p.slice_thickness_mm:.3g} mm thick, not "
                f"{current.slice_thickness_mm:.3g} mm")
    if (len(p.echo_times_s) != len(current.echo_times_s)
            or any(abs(a - b) > ECHO_TIME_TOLERANCE * b
                   for a, b in zip(p.echo_times_s, current.echo_times_s, strict=True))):
        def ms(tes: Iterable[float]) -> str:
            return ", ".join(f"{t * 1e3:.3g}" for t in tes)
        return f"echo times {ms(p.echo_times_s)} ms, not {ms(current.echo_times_s)} ms"
    return ""


def current_values(result: M1Result) -> dict[tuple[str, str, str], float]:
    """``(area, layer, measure) → value`` of a result's covered, finite measurements."""
    out: dict[tuple[str, str, str], float] = {}
    for m in result.measurements:
        if not m.covered:
            continue
        for measure in MEASURES:
            value = float(getattr(m, measure))
            if math.isfinite(value):
                out[(m.area, m.layer, measure)] = value
    return out


def compare(current: M1Result, study_date: dt.date, protocol: Protocol, version: str,
            priors: Sequence[PriorResult], limits: RetestLimits | None = None) -> FollowUp:
    """Compare a result with the patient's earlier results.

    Args:
        current: the M1 analysis of this study.
        study_date: this study's date.
        protocol: this acquisition's field strength, voxel size and echo times.
        version: the algorithm version that made ``current``.
        priors: earlier results (any order; those dated on or after ``study_date`` are
            ignored). Several from one study: the first given is kept.
        limits: test–retest limits (default :class:`RetestLimits`).

    Returns:
        The comparison with the newest comparable prior; ``note`` says which, or why none.
    """
    limits = limits or RetestLimits()
    seen: set[str] = set()
    earlier = []
    for p in priors:
        if p.study_date < study_date and p.study_uid not in seen:
            seen.add(p.study_uid)
            earlier.append(p)
    history = tuple(sorted(earlier, key=lambda p: p.study_date))
    reasons = [why_not_comparable(protocol, version, p) for p in history]
    refused = tuple((p, why) for p, why in zip(history, reasons, strict=True) if why)
    usable = [p for p, why in zip(history, reasons, strict=True) if not why]
    if not history:
        return FollowUp(None, (), (), (), "no earlier result of this patient was found",
                        study_date=study_date)
    if not usable:
        newest, why = refused[-1]
        return FollowUp(None, (), history, refused,
                        f"no comparable earlier result: the newest, of {newest.study_date}, "
                        f"was {why}", study_date=study_date)
    prior = usable[-1]
    days = (study_date - prior.study_date).days
    years = days / DAYS_PER_YEAR
    now = current_values(current)
    changes = []
    for area in AREAS:
        for layer in (*LAYERS, "all"):
            for measure in MEASURES:
                key = (area, layer, measure)
                if key not in now or key not in prior.values:
                    continue
                before, after = float(prior.values[key]), now[key]
                delta = after - before
                limit = limits.of(measure)
                changes.append(Change(area, layer, measure, before, after, delta,
                                      delta / years if days > 0 else None, limit,
                                      abs(delta) > limit))
    beyond = sum(c.exceeds for c in changes)
    note = (f"compared with the result of {prior.study_date} ({years:.2f} years earlier): "
            f"{beyond} of {len(changes)} changes beyond the test–retest limit"
            + _not_compared(now, prior))
    return FollowUp(prior, tuple(changes), history, refused, note, years, study_date)


def _not_compared(now: Mapping[tuple[str, str, str], float], prior: PriorResult) -> str:
    """A clause of the note for each measure that one result has and the other has none of
    (χ of a 2-D protocol, where QSM is not computed); "" when both have every measure, or
    one has no measure at all (nothing was compared, and the count says so)."""
    if not now or not prior.values:
        return ""
    parts = []
    for measure in MEASURES:
        here = any(key[2] == measure for key in now)
        there = any(key[2] == measure for key in prior.values)
        if here and there:
            continue
        whose = ("either result" if not here and not there
                 else "this result" if not here else "the earlier result")
        why = " (QSM was not computed)" if measure == "chi_mean_ppm" else ""
        parts.append(f"{MEASURE_TEXT[measure].split(' (')[0]} not compared: {whose} has "
                     f"none{why}")
    return "".join(f"; {part}" for part in parts)
