"""The plan of a complete candidate: its slices as a regular stack (the affine and the slice
order), its frames per slice and echo, and the images it leaves out."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from qsmnode.dicom.geometry import affine_from_slices
from qsmnode.dicom.grouping.echo_table import EchoTable
from qsmnode.dicom.grouping.keys import EchoKey, PosKey, plural
from qsmnode.dicom.grouping.records import Candidate
from qsmnode.dicom.grouping.results import AcquisitionPlan, FrameRef, Problem
from qsmnode.dicom.headers import FrameInfo, Part


def stack_affine(
    positions: dict[PosKey, tuple[float, float, float]], frame: FrameInfo
) -> tuple[NDArray[np.float64], list[PosKey]]:
    """The affine of a stack with one slice per position key (plane geometry from ``frame``),
    and the keys in slice order.

    Raises:
        ValueError: the slices are not a regular stack (the message says why).
    """
    keys = list(positions)
    assert frame.orientation is not None and frame.pixel_spacing is not None
    try:
        affine, order = affine_from_slices(
            [frame.orientation] * len(keys),
            [positions[k] for k in keys],
            frame.pixel_spacing,
            slice_spacing=frame.slice_spacing,
        )
    except ValueError as exc:
        if "single slice" in str(exc):
            raise ValueError(
                "one slice only, and neither SpacingBetweenSlices nor SliceThickness"
            ) from None
        raise
    return affine, [keys[i] for i in order]


def _left_out(others: dict[Part, int]) -> str:
    """The images of other parts the acquisition leaves out, in words."""
    return "; ".join(
        f"{plural(n, f'{p.value} image')} left out"
        + (" (a B0 field map, not the phase of every echo)" if p is Part.FIELD_MAP else "")
        for p, n in sorted(others.items())
    )


def build_plan(cand: Candidate, table: EchoTable) -> AcquisitionPlan | Problem:
    """The plan of a candidate whose echoes and slices are complete, or the problem with its
    slice geometry (not a regular stack)."""
    mag_tes = table.mag_tes
    some = next(iter(table.mag[mag_tes[0]].values()))[0]
    try:
        affine, ordered = stack_affine(
            {k: table.positions[k] for k in table.slice_keys()}, some.frame)
    except ValueError as exc:
        reason = str(exc)
        if "not evenly spaced" in reason:
            reason += " (a slice may be missing from every echo and part)"
        return cand.problem(f"cannot build the slice geometry: {reason}")

    def grid(part_table: dict[EchoKey, dict[PosKey, list[FrameRef]]]) -> tuple:
        return tuple(tuple(part_table[te][pk][0] for te in mag_tes) for pk in ordered)

    uids, numbers = cand.series()
    info = some.instance
    strengths = [r.instance.field_strength_t for r in cand.refs if r.instance.field_strength_t]
    return AcquisitionPlan(
        study_uid=info.study_uid,
        frame_of_reference_uid=info.frame_of_reference_uid,
        series_uids=uids,
        series_numbers=numbers,
        series_description=info.series_description,
        vendor=info.vendor,
        echo_times_s=tuple(k / 1e6 for k in mag_tes),
        rows=int(info.rows or 0),
        columns=int(info.columns or 0),
        affine=affine,
        magnitude=grid(table.mag),
        phase=grid(table.pha) if table.pha else None,
        field_strength_t=strengths[0] if strengths else None,
        left_out=_left_out(table.others),
    )
