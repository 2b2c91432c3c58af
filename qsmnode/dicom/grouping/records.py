"""The working records of one grouping: a geometry cluster, the frames of one series in it (a
unit), and a candidate acquisition made of units, which can name itself in a problem."""

from __future__ import annotations

from dataclasses import dataclass, field

from qsmnode.dicom.grouping.keys import ORIENTATION_TOL, SPACING_TOL_MM, EchoKey, PosKey
from qsmnode.dicom.grouping.results import FrameRef, PassedOver, Problem
from qsmnode.dicom.headers import FrameInfo, InstanceInfo, Part


@dataclass
class Cluster:
    """Rule 2: one geometry (study, Frame of Reference, matrix, orientation, pixel spacing,
    ORIGINAL or DERIVED), as of its first frame."""

    study_uid: str
    for_uid: str
    rows: int
    columns: int
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    derived: bool

    def accepts(self, info: InstanceInfo, frame: FrameInfo) -> bool:
        """Whether the frame has this geometry, within the tolerances."""
        assert frame.orientation is not None and frame.pixel_spacing is not None
        return (
            info.study_uid == self.study_uid
            and info.frame_of_reference_uid == self.for_uid
            and info.rows == self.rows
            and info.columns == self.columns
            and info.derived == self.derived
            and max(abs(a - b) for a, b in zip(frame.orientation, self.orientation, strict=True))
            <= ORIENTATION_TOL
            and max(
                abs(a - b) for a, b in zip(frame.pixel_spacing, self.pixel_spacing, strict=True)
            )
            <= SPACING_TOL_MM
        )


@dataclass
class Unit:
    """The frames of one series (classic or Enhanced) in one geometry cluster."""

    cluster: int
    series_uid: str
    series_number: int | None
    refs: list[FrameRef] = field(default_factory=list)
    keys: set[tuple[Part, EchoKey | None]] = field(default_factory=set)
    positions: set[PosKey] = field(default_factory=set)
    t1: bool = True
    """Every instance looks T1-weighted (such units join only each other)."""


@dataclass
class Candidate:
    """Series units that may make one acquisition (rule 3), with their (part, echo) keys and
    slice positions."""

    cluster: int
    t1: bool = False
    units: list[Unit] = field(default_factory=list)
    keys: set[tuple[Part, EchoKey | None]] = field(default_factory=set)
    positions: set[PosKey] = field(default_factory=set)

    def add(self, unit: Unit) -> None:
        """Take in the unit: its frames, keys and slice positions."""
        self.units.append(unit)
        self.keys |= unit.keys
        self.positions |= unit.positions

    @property
    def refs(self) -> list[FrameRef]:
        """Every frame of every unit, unit by unit."""
        return [r for u in self.units for r in u.refs]

    def parts(self) -> set[Part]:
        """The parts (magnitude, phase, ...) it holds."""
        return {p for p, _ in self.keys}

    def series(self) -> tuple[tuple[str, ...], tuple[int | None, ...]]:
        """Its series UIDs and their series numbers, in unit order."""
        seen: dict[str, int | None] = {}
        for u in self.units:
            seen.setdefault(u.series_uid, u.series_number)
        return tuple(seen), tuple(seen.values())

    def label(self) -> str:
        """Series numbers, description and UIDs, to lead a reason."""
        uids, numbers = self.series()
        first = self.units[0].refs[0].instance
        nums = ", ".join("?" if n is None else str(n) for n in numbers)
        desc = f" '{first.series_description}'" if first.series_description else ""
        return f"series {nums}{desc} (series UID{'s' if len(uids) > 1 else ''} {', '.join(uids)})"

    def problem(self, reason: str) -> Problem:
        """The candidate as a problem, for ``reason``."""
        uids, numbers = self.series()
        first = self.units[0].refs[0].instance
        return Problem(
            reason=f"{self.label()}: {reason}",
            study_uid=first.study_uid,
            series_uids=uids,
            series_numbers=numbers,
        )

    def passed_over(self, why: str) -> PassedOver:
        """The candidate as passed over (rule 7), for ``why``: its problem, so labelled."""
        return PassedOver(**vars(self.problem(f"passed over: {why}")), why=why)


def sort_key(cand: Candidate) -> tuple:
    """Where the candidate's result goes: by study, then first series number."""
    first = cand.units[0]
    return (
        first.refs[0].instance.study_uid,
        first.series_number is None,
        first.series_number or 0,
    )
