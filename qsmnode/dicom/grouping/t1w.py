"""Rule 6: T1-weighted magnitude-only candidates as anatomical references (one series, one
echo, enough evenly spaced slices, fine enough voxels), the choice of one per plan, and why
another T1-weighted series is not used."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from qsmnode.dicom.grouping.keys import PositionKeys, PosKey, plural, te_key
from qsmnode.dicom.grouping.plan import stack_affine
from qsmnode.dicom.grouping.records import Candidate
from qsmnode.dicom.grouping.results import AcquisitionPlan, FrameRef, T1wReference
from qsmnode.dicom.headers import Part

T1W_MAX_VOXEL_MM = 2.0
"""Coarsest voxel edge of a T1w reference (a thick-slice 2-D T1 does not register well)."""
T1W_MIN_SLICES = 16


def _is_t1w_candidate(cand: Candidate) -> bool:
    """T1-weighted, magnitude (or unstated part) only, and no parametric map."""
    refs = cand.refs
    return (
        cand.t1
        and all(r.frame.part in (Part.MAGNITUDE, Part.UNKNOWN) for r in refs)
        and not any("MAP" in token for r in refs for token in r.instance.image_type)
    )


def _evaluate_t1w(cand: Candidate, pos_key: PositionKeys) -> T1wReference | str:
    """The candidate as a T1w reference, or why it cannot be one."""
    uids, numbers = cand.series()
    if len(uids) > 1:
        return "its images come from several series"
    refs = cand.refs
    tes = {te_key(r.frame) for r in refs}
    if len(tes) > 1:
        return f"it has {len(tes)} echoes (a single-echo or echo-combined series is needed)"
    by_position: dict[PosKey, list[FrameRef]] = defaultdict(list)
    for r in refs:
        assert r.frame.position is not None
        by_position[pos_key(r.frame.position)].append(r)
    repeated = sum(len(rs) > 1 for rs in by_position.values())
    if repeated:
        return f"more than one image at {plural(repeated, 'slice position')}"
    if len(by_position) < T1W_MIN_SLICES:
        return (
            f"{plural(len(by_position), 'slice')}; a reference volume needs at least "
            f"{T1W_MIN_SLICES}"
        )
    first = refs[0]
    positions = {k: rs[0].frame.position for k, rs in by_position.items()}
    try:
        affine, ordered = stack_affine(positions, first.frame)  # type: ignore[arg-type]
    except ValueError as exc:
        return f"cannot build the slice geometry: {exc}"
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if sizes.max() > T1W_MAX_VOXEL_MM + 1e-6:
        return (
            f"its voxels ({'×'.join(f'{v:.3g}' for v in sizes)} mm) are coarser than "
            f"{T1W_MAX_VOXEL_MM:g} mm"
        )
    info = first.instance
    return T1wReference(
        study_uid=info.study_uid,
        frame_of_reference_uid=info.frame_of_reference_uid,
        series_uid=uids[0],
        series_number=numbers[0],
        series_description=info.series_description,
        evidence=info.t1_evidence,
        rows=int(info.rows or 0),
        columns=int(info.columns or 0),
        affine=affine,
        frames=tuple(by_position[k][0] for k in ordered),
    )


def _voxel_volume(ref: T1wReference) -> float:
    """Voxel volume (mm³), rounded to 0.001 so that rounding noise does not decide."""
    return round(float(np.prod(ref.voxel_size_mm)), 3)


def _t1w_rank(ref: T1wReference) -> tuple:
    """Sort key: finest voxels first, then the latest series, then the series UID."""
    number = -1 if ref.series_number is None else ref.series_number
    return (_voxel_volume(ref), -number, ref.series_uid)


def with_t1w(
    plan: AcquisitionPlan,
    references: list[T1wReference],
    unusable: list[tuple[str, str, str]],
) -> AcquisitionPlan:
    """The plan with its T1w reference chosen, and a note on every T1w of its study."""
    in_study = [r for r in references if r.study_uid == plan.study_uid]
    for_uid = plan.frame_of_reference_uid
    eligible = sorted(
        (r for r in in_study if for_uid and r.frame_of_reference_uid == for_uid), key=_t1w_rank
    )
    notes: list[str] = []
    chosen = eligible[0] if eligible else None
    if chosen is not None:
        notes.append(f"T1w reference: {chosen.describe()}")
        for other in eligible[1:]:
            if _voxel_volume(other) > _voxel_volume(chosen):
                why = "coarser voxels"
            elif other.series_number != chosen.series_number:
                why = "an earlier series"
            else:
                why = "the same resolution and series number; the series UID decides"
            notes.append(f"{other.label()}: also T1-weighted, not chosen ({why})")
    for r in in_study:
        if r in eligible:
            continue
        if not for_uid or not r.frame_of_reference_uid:
            why = "a Frame of Reference UID is missing, so the geometry cannot relate the two"
        else:
            why = (
                "it has another Frame of Reference than this acquisition, so the DICOM "
                "geometry does not relate the two"
            )
        notes.append(f"{r.label()}: T1-weighted but not used ({why})")
    for label, study_uid, reason in unusable:
        if study_uid == plan.study_uid:
            notes.append(f"{label}: T1-weighted but not usable as a reference: {reason}")
    return replace(plan, t1w=chosen, t1w_note="; ".join(notes))


@dataclass
class T1wFound:
    """Rule 6: the T1-weighted magnitude-only candidates, as references or why not."""

    references: list[T1wReference] = field(default_factory=list)
    unusable: list[tuple[str, str, str]] = field(default_factory=list)
    """(label, study UID, why) of each T1-weighted candidate that is not a usable reference."""
    candidates: list[tuple[Candidate, T1wReference | str]] = field(default_factory=list)
    indices: set[int] = field(default_factory=set)
    """Their indices among all candidates (they become neither plans nor problems)."""


def t1w_references(candidates: list[Candidate], pos_key: PositionKeys) -> T1wFound:
    """Rule 6: T1-weighted magnitude-only candidates are references for the plans, never
    problems."""
    found = T1wFound()
    for i, cand in enumerate(candidates):
        if not _is_t1w_candidate(cand):
            continue
        found.indices.add(i)
        evaluated = _evaluate_t1w(cand, pos_key)
        found.candidates.append((cand, evaluated))
        if isinstance(evaluated, T1wReference):
            found.references.append(evaluated)
        else:
            first = cand.units[0].refs[0].instance
            found.unusable.append((cand.label(), first.study_uid, evaluated))
    return found


def unused_t1w(cand: Candidate, evaluated: T1wReference | str, used: set[str]) -> str | None:
    """Why a T1-weighted series is passed over: no acquisition uses it, or it is not usable
    as a reference (None: an acquisition uses it)."""
    if isinstance(evaluated, T1wReference):
        if evaluated.series_uid in used:
            return None
        return (
            f"T1-weighted ({evaluated.evidence}): an anatomical reference, not a QSM "
            "acquisition; no acquisition of its study uses it"
        )
    evidence = cand.units[0].refs[0].instance.t1_evidence
    return (
        f"T1-weighted ({evidence}), not a QSM acquisition, and not usable as a "
        f"reference: {evaluated}"
    )
