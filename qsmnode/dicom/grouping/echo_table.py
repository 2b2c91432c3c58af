"""A candidate's frames by part (magnitude, phase), echo time and slice position, with the
frames that do not fit counted (other parts, no echo time)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from qsmnode.dicom.grouping.keys import EchoKey, PositionKeys, PosKey, te_key
from qsmnode.dicom.grouping.results import FrameRef
from qsmnode.dicom.headers import Part


@dataclass
class EchoTable:
    """A candidate's frames by part, echo time and slice position, and what does not fit."""

    mag: dict[EchoKey, dict[PosKey, list[FrameRef]]]
    pha: dict[EchoKey, dict[PosKey, list[FrameRef]]]
    others: dict[Part, int]
    """Frames of any other part (e.g. a B0 field map), counted per part."""
    no_te: int
    """Magnitude and phase frames without a usable echo time."""
    positions: dict[PosKey, tuple[float, float, float]]
    """A slice position as written, per position key."""

    @property
    def parts(self) -> dict[Part, dict[EchoKey, dict[PosKey, list[FrameRef]]]]:
        """Magnitude and phase tables by part."""
        return {Part.MAGNITUDE: self.mag, Part.PHASE: self.pha}

    @property
    def mag_tes(self) -> list[EchoKey]:
        """Magnitude echo times, ascending."""
        return sorted(self.mag)

    @property
    def pha_tes(self) -> list[EchoKey]:
        """Phase echo times, ascending."""
        return sorted(self.pha)

    def slice_keys(self) -> set[PosKey]:
        """Every slice position of any echo of magnitude or phase."""
        return {pk for echoes in self.parts.values() for per_pos in echoes.values()
                for pk in per_pos}


def tabulate(refs: list[FrameRef], pos_key: PositionKeys) -> EchoTable:
    """Sort the frames into magnitude and phase by echo time and slice position."""
    table = EchoTable(defaultdict(lambda: defaultdict(list)),
                       defaultdict(lambda: defaultdict(list)), defaultdict(int), 0, {})
    parts = table.parts
    for r in refs:
        f = r.frame
        assert f.position is not None
        table.positions.setdefault(pos_key(f.position), f.position)
        if f.part not in parts:
            table.others[f.part] += 1
            continue
        te = te_key(f)
        if te is None:
            table.no_te += 1
            continue
        parts[f.part][te][pos_key(f.position)].append(r)
    return table
