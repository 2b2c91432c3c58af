"""A magnitude-only and a phase-only candidate that belong together: of one geometry they are
evaluated as one candidate (so mismatched echo times are reported); of mixed geometry they are
one problem that says how the geometries differ."""

from __future__ import annotations

from collections.abc import Callable

from qsmnode.dicom.grouping.keys import ORIENTATION_TOL, SPACING_TOL_MM
from qsmnode.dicom.grouping.records import Candidate, Cluster, sort_key
from qsmnode.dicom.grouping.results import AcquisitionPlan, Problem
from qsmnode.dicom.headers import Part

Judge = Callable[[Candidate], AcquisitionPlan | Problem]
"""A candidate to its result under the rules of one grouping
(:func:`~qsmnode.dicom.grouping.triage.judge_candidate`)."""


def _geometry_difference(a: Candidate, b: Candidate, clusters: list[Cluster]) -> str:
    """How the geometries of two candidates differ, in words."""
    ca, cb = clusters[a.cluster], clusters[b.cluster]
    diffs = []
    if (ca.rows, ca.columns) != (cb.rows, cb.columns):
        diffs.append(f"matrix {ca.rows}×{ca.columns} vs {cb.rows}×{cb.columns}")
    d = max(abs(x - y) for x, y in zip(ca.orientation, cb.orientation, strict=True))
    if d > ORIENTATION_TOL:
        diffs.append(f"orientation differs by up to {d:.3g} in the direction cosines")
    if max(abs(x - y) for x, y in zip(ca.pixel_spacing, cb.pixel_spacing, strict=True)) > (
        SPACING_TOL_MM
    ):
        diffs.append(
            "pixel spacing "
            f"{ca.pixel_spacing[0]:g}×{ca.pixel_spacing[1]:g} vs "
            f"{cb.pixel_spacing[0]:g}×{cb.pixel_spacing[1]:g} mm"
        )
    if ca.derived != cb.derived:
        diffs.append("one is ORIGINAL, the other DERIVED")
    if a.cluster == b.cluster and not (a.positions & b.positions):
        diffs.append("their slice positions do not overlap")
    return "; ".join(diffs) or "geometry differs"


def _only(cand: Candidate, part: Part) -> bool:
    """Of magnitude and phase, the candidate holds ``part`` only."""
    return cand.parts() & {Part.MAGNITUDE, Part.PHASE} == {part}


def _phase_partner(
    i: int, candidates: list[Candidate], paired: set[int]
) -> tuple[int, bool] | None:
    """The first unpaired phase-only candidate that goes with the magnitude-only candidate
    ``i``: of the same geometry (kept apart by their echo times), or of the same study, Frame
    of Reference and series description (mixed geometry); its index and whether the geometry
    is the same."""
    a = candidates[i]
    ia = a.units[0].refs[0].instance
    for j, b in enumerate(candidates):
        if j == i or j in paired or not _only(b, Part.PHASE):
            continue
        ib = b.units[0].refs[0].instance
        same_grid = a.cluster == b.cluster and a.t1 == b.t1 and bool(a.positions & b.positions)
        if same_grid or (ia.study_uid, ia.frame_of_reference_uid, ia.series_description) == (
            ib.study_uid, ib.frame_of_reference_uid, ib.series_description
        ):
            return j, same_grid
    return None


def _together(a: Candidate, b: Candidate) -> Candidate:
    """One candidate of the units of both (same geometry), in series order."""
    both = Candidate(a.cluster, a.t1)
    for unit in sorted(
        a.units + b.units,
        key=lambda u: (u.series_number is None, u.series_number or 0, u.series_uid),
    ):
        both.add(unit)
    return both


def _mixed_geometry(a: Candidate, b: Candidate, clusters: list[Cluster]) -> Problem:
    """The problem of a magnitude and a phase of one series description whose geometries
    differ, saying how."""
    ua, na = a.series()
    ub, nb = b.series()
    return Problem(
        reason=(
            f"magnitude {a.label()} and phase {b.label()} cannot be combined: "
            f"mixed geometry ({_geometry_difference(a, b, clusters)})"
        ),
        study_uid=a.units[0].refs[0].instance.study_uid,
        series_uids=ua + ub,
        series_numbers=na + nb,
    )


def magnitude_with_phase(
    candidates: list[Candidate], paired: set[int], clusters: list[Cluster], judge: Judge
) -> list[tuple[tuple, AcquisitionPlan | Problem]]:
    """Magnitude-only and phase-only candidates that go together (:func:`_phase_partner`):
    of one geometry, evaluated together; of mixed geometry, a problem. Adds both to
    ``paired``."""
    results: list[tuple[tuple, AcquisitionPlan | Problem]] = []
    for i, a in enumerate(candidates):
        if not _only(a, Part.MAGNITUDE) or i in paired:
            continue
        partner = _phase_partner(i, candidates, paired)
        if partner is None:
            continue
        j, same_grid = partner
        b = candidates[j]
        paired.update((i, j))
        if same_grid:
            both = _together(a, b)
            results.append((sort_key(both), judge(both)))
        else:
            results.append((sort_key(a), _mixed_geometry(a, b, clusters)))
    return results
