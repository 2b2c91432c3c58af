"""What grouping returns: acquisition plans (with their frames and T1w reference), problems, and
passed-over series."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from qsmnode.dicom.headers import FrameInfo, InstanceInfo, Vendor


@dataclass(frozen=True)
class FrameRef:
    """One frame of one instance, as used by an acquisition."""

    instance: InstanceInfo
    frame: FrameInfo

    @property
    def path(self) -> str | None:
        return self.instance.path

    @property
    def sop_instance_uid(self) -> str:
        return self.instance.sop_instance_uid

    @property
    def frame_number(self) -> int | None:
        return self.frame.frame_number


@dataclass(frozen=True, eq=False)
class T1wReference:
    """A same-session T1-weighted volume: which frame is slice ``k`` (in the affine's order).

    Attributes:
        evidence: why it is taken for T1-weighted (:func:`~qsmnode.dicom.headers.t1_evidence`).
        frames: one frame per slice, in slice order.
    """

    study_uid: str
    frame_of_reference_uid: str
    series_uid: str
    series_number: int | None
    series_description: str
    evidence: str
    rows: int
    columns: int
    affine: NDArray[np.float64] = field(repr=False)
    frames: tuple[FrameRef, ...] = field(repr=False)

    @property
    def n_slices(self) -> int:
        return len(self.frames)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.columns, self.rows, self.n_slices)

    @property
    def voxel_size_mm(self) -> tuple[float, float, float]:
        """Voxel edges (mm), rounded to 1 µm."""
        sizes = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return (round(float(sizes[0]), 6), round(float(sizes[1]), 6), round(float(sizes[2]), 6))

    def _named(self) -> str:
        number = "?" if self.series_number is None else str(self.series_number)
        desc = f" '{self.series_description}'" if self.series_description else ""
        return f"series {number}{desc}"

    def label(self) -> str:
        return f"{self._named()} (series UID {self.series_uid})"

    def to_json(self) -> dict[str, Any]:
        """The series and its grid, for records and summaries."""
        return {
            "series_uid": self.series_uid,
            "series_number": self.series_number,
            "series_description": self.series_description,
            "shape": list(self.shape),
            "voxel_size_mm": list(self.voxel_size_mm),
            "evidence": self.evidence,
        }

    def brief(self) -> str:
        """Series number, description and voxel size (for reports: no UID)."""
        vs = "×".join(f"{v:.3g}" for v in self.voxel_size_mm)
        return f"{self._named()} ({vs} mm)"

    def describe(self) -> str:
        """The series, its grid and why it is T1-weighted, in one line."""
        vs = "×".join(f"{v:.3g}" for v in self.voxel_size_mm)
        shape = "×".join(str(n) for n in self.shape)
        return f"{self.label()}, {shape} voxels of {vs} mm, {self.evidence}"


@dataclass(frozen=True, eq=False)
class AcquisitionPlan:
    """A complete multi-echo GRE acquisition: which frame is slice ``k``, echo ``e`` and part.

    Attributes:
        magnitude: ``[k][e]`` frames (k in the affine's slice order, e by ascending TE).
        phase: ``[k][e]`` frames, or None when phase was not required and is absent.
        affine: voxel-to-RAS affine from :func:`~qsmnode.dicom.geometry.affine_from_slices`.
        vendor: from the first magnitude instance.
        t1w: the same-session T1w reference chosen for it (not one of its series), or None.
        t1w_note: which T1w was chosen, and why other T1-weighted series of the study are not
            used; empty when the study has none.
    """

    study_uid: str
    frame_of_reference_uid: str
    series_uids: tuple[str, ...]
    series_numbers: tuple[int | None, ...]
    series_description: str
    vendor: Vendor
    echo_times_s: tuple[float, ...]
    rows: int
    columns: int
    affine: NDArray[np.float64] = field(repr=False)
    magnitude: tuple[tuple[FrameRef, ...], ...] = field(repr=False)
    phase: tuple[tuple[FrameRef, ...], ...] | None = field(repr=False)
    field_strength_t: float | None
    t1w: T1wReference | None = field(default=None, repr=False)
    t1w_note: str = ""
    left_out: str = ""
    """Images of the acquisition's series that it does not use, and what they are (e.g. a B0
    field map exported beside magnitude and phase); empty when it uses them all."""

    @property
    def n_slices(self) -> int:
        return len(self.magnitude)

    @property
    def n_echoes(self) -> int:
        return len(self.echo_times_s)

    @property
    def sop_instance_uids(self) -> frozenset[str]:
        """Every instance the acquisition uses."""
        refs = [r for row in self.magnitude for r in row]
        if self.phase is not None:
            refs += [r for row in self.phase for r in row]
        return frozenset(r.sop_instance_uid for r in refs)


@dataclass(frozen=True)
class Problem:
    """Images that do not make a processable acquisition, and why (plain language)."""

    reason: str
    study_uid: str = ""
    series_uids: tuple[str, ...] = ()
    series_numbers: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class PassedOver(Problem):
    """Series that are plainly not a QSM candidate (rule 7): not processed, and not a problem.

    ``why`` is the reason without the series label (one line, for a per-series status column);
    ``reason`` is the label and ``why`` together, like a problem's.
    """

    why: str = ""
