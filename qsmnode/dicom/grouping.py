"""Group instance summaries into multi-echo GRE acquisitions, or say in plain words why not.

:func:`group_acquisitions` takes :class:`~qsmnode.dicom.headers.InstanceInfo` summaries (from
any number of series and studies) and returns one :class:`AcquisitionPlan` per complete
acquisition and one :class:`Problem` per set of images that cannot be processed.

The rules:

1. Instances are de-duplicated by SOP Instance UID (re-sent files); frames by frame number.
2. Frames are clustered by geometry: study, frame of reference, Rows × Columns,
   ImageOrientationPatient (within 1e-4), PixelSpacing (within 1e-4 mm) and ORIGINAL vs
   DERIVED. Slice positions are compared later, so a part that is a slice short stays in the
   acquisition and is reported rather than split off.
3. Within a cluster, each series (Enhanced and classic files of one series apart) is a unit
   holding a set of (part, echo) keys. Units are taken in series-number order and join the
   first candidate acquisition whose slice positions overlap theirs, which holds none of
   their keys yet, and whose echo train is theirs: they share an echo time with it, or the
   unit and every unit of the candidate have one echo time each (one series per echo);
   otherwise they start a new candidate. Series of one echo time each join only when their
   headers do not show two scans: not both echo number 1 (GE writes each single-echo scan
   as echo 1), the same series description, the same ImagesInAcquisition where given.
   This joins Siemens magnitude and phase series
   (n, n+1), Siemens XA series per echo and Philips mixed series, and keeps an exact repeat of
   the protocol (series 7, 8 after 5, 6) apart, as well as a scan of the same geometry with
   other echo times. A magnitude-only and a phase-only candidate of the same geometry are
   evaluated together (so their echo times are reported as mismatched).
   Slice positions are compared rounded to 0.01 mm; a position within 0.005 mm of one
   already seen is the same slice even across a rounding boundary.
4. Echo identity is the echo time rounded to 1 µs, never InstanceNumber or EchoNumbers.
5. A candidate becomes a plan only when it has magnitude and (if required) phase with the same
   echo times, all above 0, at least ``min_echoes`` echoes, every slice for every echo and
   part, exactly one image per slice, echo and part, and evenly spaced slices. Otherwise it is
   a Problem.

6. T1w reference. A candidate whose every instance looks T1-weighted
   (:attr:`~qsmnode.dicom.headers.InstanceInfo.t1_evidence`: inversion-prepared gradient echo,
   an MPRAGE-family sequence name, or a T1 series description; the rule is in
   :mod:`qsmnode.dicom.headers`) and that holds only magnitude (or unstated-part) images is
   never a Problem: T1-weighted series join no GRE candidate, and a T1-weighted candidate is
   an anatomical reference when it is one series, one echo, at least ``T1W_MIN_SLICES``
   evenly spaced slices with one image each, and voxels no coarser than ``T1W_MAX_VOXEL_MM``.
   Each plan takes the reference of its study with the plan's Frame of Reference UID (the
   DICOM geometry then relates the two); with several, the finest voxels (smallest voxel
   volume) win, then the latest series number, then the series UID. The plan says which in
   :attr:`AcquisitionPlan.t1w_note`, and why any other T1-weighted series of the study is
   not used (another Frame of Reference, unusable, not chosen).

7. Session triage. A scanner sends the whole session, and most of it is not for QSM. With
   ``pass_over`` (the default), series that are plainly not QSM candidates come back as
   :class:`PassedOver` with a one-line reason, not as a :class:`Problem`: a localiser, BOLD,
   ASL or diffusion series (ImageType/FrameType tokens such as ``FMRI``, ``ASL``,
   ``DIFFUSION``, else words of the series description), derived images (ImageType DERIVED,
   e.g. ADC, FA, relCBF), series without image plane geometry, and, among those that make no
   acquisition, a phase-difference field map and a single echo of magnitude only. A T1-weighted
   series that no acquisition uses is passed over too, with why. What still looked like a QSM
   candidate (phase images, or several echoes) and cannot be used stays a problem. A series
   whose description matches one of ``qsm_series`` (the site's QSM protocol names) is never
   passed over; ``pass_over=False`` makes every series that makes no acquisition a problem.
   A plan is never turned into a passed-over series, except a localiser, BOLD, ASL, diffusion
   or derived series (which ``min_echoes=1`` with ``require_phase=False`` would otherwise
   plan).

Limitation: with one series per echo (Siemens XA, no EchoNumbers), a scan of the same
geometry and series description whose echo times are all different, also in one series per
echo, still joins the acquisition as more echoes (nothing in the summaries tells the two
apart).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
from numpy.typing import NDArray

from qsmnode.dicom.geometry import affine_from_slices
from qsmnode.dicom.headers import FrameInfo, InstanceInfo, Part, Vendor

ORIENTATION_TOL = 1e-4
SPACING_TOL_MM = 1e-4
POSITION_DECIMALS = 2
"""Slice positions are compared after rounding to 0.01 mm."""
T1W_MAX_VOXEL_MM = 2.0
"""Coarsest voxel edge of a T1w reference (a thick-slice 2-D T1 does not register well)."""
T1W_MIN_SLICES = 16


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


# ---------------------------------------------------------------------------------------------
# internal structures

_PosKey = tuple[int, int, int]
_EchoKey = int  # echo time in µs


def echo_key(echo_time_s: float) -> _EchoKey:
    """Echo identity: the echo time rounded to 1 µs."""
    return round(echo_time_s * 1e6)


def _te_key(frame: FrameInfo) -> _EchoKey | None:
    """The frame's echo key; None without a usable echo time (absent, NaN or infinite)."""
    te = frame.echo_time_s
    return None if te is None or not math.isfinite(te) else echo_key(te)


def _plane_ok(info: InstanceInfo, frame: FrameInfo) -> bool:
    """The frame has an image plane: position, orientation (two non-zero direction cosine
    vectors), positive pixel spacing and a matrix, all finite."""
    if frame.position is None or frame.orientation is None or frame.pixel_spacing is None:
        return False
    values = (*frame.position, *frame.orientation, *frame.pixel_spacing)
    return (
        bool(info.rows)
        and bool(info.columns)
        and all(math.isfinite(v) for v in values)
        and min(frame.pixel_spacing) > 0
        and any(frame.orientation[:3])
        and any(frame.orientation[3:])
    )


def _pos_key(position: tuple[float, float, float]) -> _PosKey:
    return tuple(round(p * 10**POSITION_DECIMALS) for p in position)  # type: ignore[return-value]


_NEIGHBOURS = tuple((a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1))


class _PositionKeys:
    """Slice position keys of one grouping: the position rounded to 0.01 mm, except that a
    position within half that of one already seen takes its key (so positions written with a
    tiny difference, e.g. 12.125 and 12.1250001, are one slice even across a rounding
    boundary)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[float, float, float], _PosKey] = {}
        self._seen: dict[_PosKey, tuple[float, float, float]] = {}

    def __call__(self, position: tuple[float, float, float]) -> _PosKey:
        key = self._keys.get(position)
        if key is not None:
            return key
        key = _pos_key(position)
        if key not in self._seen:
            half = 0.5 * 10.0**-POSITION_DECIMALS
            for offset in _NEIGHBOURS:
                near = tuple(k + o for k, o in zip(key, offset, strict=True))
                seen = self._seen.get(near)  # type: ignore[arg-type]
                if (
                    seen is not None
                    and max(abs(a - b) for a, b in zip(seen, position, strict=True)) <= half
                ):
                    key = near  # type: ignore[assignment]
                    break
            else:
                self._seen[key] = position
        self._keys[position] = key
        return key


def _ms(key: _EchoKey) -> str:
    return f"{key / 1000:g} ms"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


@dataclass
class _Cluster:
    study_uid: str
    for_uid: str
    rows: int
    columns: int
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    derived: bool

    def accepts(self, info: InstanceInfo, frame: FrameInfo) -> bool:
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
class _Unit:
    """The frames of one series (classic or Enhanced) in one geometry cluster."""

    cluster: int
    series_uid: str
    series_number: int | None
    refs: list[FrameRef] = field(default_factory=list)
    keys: set[tuple[Part, _EchoKey | None]] = field(default_factory=set)
    positions: set[_PosKey] = field(default_factory=set)
    t1: bool = True
    """Every instance looks T1-weighted (such units join only each other)."""


@dataclass
class _Candidate:
    cluster: int
    t1: bool = False
    units: list[_Unit] = field(default_factory=list)
    keys: set[tuple[Part, _EchoKey | None]] = field(default_factory=set)
    positions: set[_PosKey] = field(default_factory=set)

    def add(self, unit: _Unit) -> None:
        self.units.append(unit)
        self.keys |= unit.keys
        self.positions |= unit.positions

    @property
    def refs(self) -> list[FrameRef]:
        return [r for u in self.units for r in u.refs]

    def parts(self) -> set[Part]:
        return {p for p, _ in self.keys}

    def series(self) -> tuple[tuple[str, ...], tuple[int | None, ...]]:
        seen: dict[str, int | None] = {}
        for u in self.units:
            seen.setdefault(u.series_uid, u.series_number)
        return tuple(seen), tuple(seen.values())

    def label(self) -> str:
        uids, numbers = self.series()
        first = self.units[0].refs[0].instance
        nums = ", ".join("?" if n is None else str(n) for n in numbers)
        desc = f" '{first.series_description}'" if first.series_description else ""
        return f"series {nums}{desc} (series UID{'s' if len(uids) > 1 else ''} {', '.join(uids)})"

    def problem(self, reason: str) -> Problem:
        uids, numbers = self.series()
        first = self.units[0].refs[0].instance
        return Problem(
            reason=f"{self.label()}: {reason}",
            study_uid=first.study_uid,
            series_uids=uids,
            series_numbers=numbers,
        )

    def passed_over(self, why: str) -> PassedOver:
        uids, numbers = self.series()
        first = self.units[0].refs[0].instance
        return PassedOver(
            reason=f"{self.label()}: passed over: {why}",
            study_uid=first.study_uid,
            series_uids=uids,
            series_numbers=numbers,
            why=why,
        )


# ---------------------------------------------------------------------------------------------
# grouping


def _series_of(refs: list[FrameRef], part: Part, key: _EchoKey | None = None) -> str:
    numbers = sorted(
        {
            r.instance.series_number
            for r in refs
            if r.frame.part is part and (key is None or _te_key(r.frame) == key)
        },
        key=lambda n: (n is None, n or 0),
    )
    return ", ".join("?" if n is None else str(n) for n in numbers)


def _echo_times(keys: set[tuple[Part, _EchoKey | None]]) -> set[_EchoKey]:
    return {te for _, te in keys if te is not None}


def _same_echo_train(cand: _Candidate, unit: _Unit) -> bool:
    """Whether ``unit`` may belong to the echo train of ``cand``: it shares an echo time with it
    (e.g. the phase series of a magnitude series), or both are series of one echo time each
    (one series per echo) and nothing in their headers says they are two scans
    (:func:`_other_scan`). A series whose echo times are all new to the candidate is another
    scan (e.g. the same geometry with other echo times), not more echoes of this one."""
    unit_tes, cand_tes = _echo_times(unit.keys), _echo_times(cand.keys)
    if not unit_tes or not cand_tes or unit_tes & cand_tes:
        return True
    return (
        len(unit_tes) == 1
        and all(len(_echo_times(u.keys)) <= 1 for u in cand.units)
        and not any(_other_scan(u, unit) for u in cand.units)
    )


def _other_scan(a: _Unit, b: _Unit) -> str:
    """Why two series of one echo time each are two scans, not two echoes of one acquisition
    ("" when their headers do not tell): each is echo number 1 (or both the same number),
    their series descriptions differ, or their ImagesInAcquisition differ."""
    ia, ib = a.refs[0].instance, b.refs[0].instance
    na = {r.frame.echo_number for r in a.refs} - {None}
    nb = {r.frame.echo_number for r in b.refs} - {None}
    if na and na == nb:
        return f"both are echo number {', '.join(map(str, sorted(na)))}"
    if ia.series_description and ib.series_description and (
        ia.series_description != ib.series_description
    ):
        return "their series descriptions differ"
    if ia.images_in_acquisition and ib.images_in_acquisition and (
        ia.images_in_acquisition != ib.images_in_acquisition
    ):
        return "their ImagesInAcquisition differ"
    return ""


# ---------------------------------------------------------------------------------------------
# session triage: series that are plainly not QSM candidates (rule 7)

_WORD = re.compile(r"[a-z0-9]+")
_KINDS: tuple[tuple[str, frozenset[str], frozenset[str]], ...] = (
    # (what it is, ImageType/FrameType tokens, words of the series description)
    ("a localiser", frozenset({"LOCALIZER", "LOCALISER", "SCOUT"}),
     frozenset({"localizer", "localiser", "scout", "survey", "aascout", "aahead", "3plane"})),
    ("BOLD / fMRI", frozenset({"FMRI", "BOLD"}),
     frozenset({"bold", "fmri", "func", "rsfmri", "resting"})),
    ("arterial spin labelling / perfusion", frozenset({"ASL", "PERFUSION", "CBF", "RCBF"}),
     frozenset({"asl", "pcasl", "pasl", "casl", "perfusion", "cbf", "rcbf", "relcbf", "pwi"})),
    ("diffusion-weighted", frozenset({"DIFFUSION", "ADC", "TRACEW", "TENSOR", "TENSOR_B0"}),
     frozenset({"dwi", "dti", "diffusion", "adc", "tracew", "dki", "hardi"})),
)


def _not_a_gre(cand: _Candidate) -> str | None:
    """Why the candidate is plainly not a gradient-echo acquisition for QSM (a localiser, BOLD,
    ASL or diffusion series, or derived images), from ImageType and the series description;
    None when nothing says so."""
    refs = cand.refs
    first = refs[0].instance
    tokens = {t for r in refs for t in r.instance.image_type}
    words = set(_WORD.findall(first.series_description.lower()))
    image_type = f"ImageType {chr(92).join(first.image_type)}"
    derived = all(r.instance.derived for r in refs)
    why = ""
    for what, kind_tokens, kind_words in _KINDS:
        if tokens & kind_tokens:
            why = f"{what}{', derived' if derived else ''} ({image_type})"
            break
        if words & kind_words:
            why = f"{what} (series description '{first.series_description}')"
            why += f", derived ({image_type})" if derived else ""
            break
    else:
        if derived:
            why = f"derived images ({image_type})"
    return f"{why}: not a multi-echo gradient echo for QSM" if why else None


def _plainly_not_candidate(cand: _Candidate, require_phase: bool) -> str | None:
    """Why a candidate that makes no acquisition is plainly not a QSM candidate: a
    phase-difference field map, or one echo of magnitude only (None: it looked like a QSM
    candidate, so what is wrong with it is a problem)."""
    refs = cand.refs
    fieldmap = [r for r in refs if r.frame.part is Part.PHASE and r.instance.phase_difference]
    mag_tes = sorted({k for r in refs if r.frame.part is Part.MAGNITUDE
                      for k in [_te_key(r.frame)] if k is not None})
    pha_tes = sorted({k for r in refs if r.frame.part is Part.PHASE
                      for k in [_te_key(r.frame)] if k is not None})
    siemens_pattern = (refs[0].instance.vendor is Vendor.SIEMENS and len(mag_tes) == 2
                       and pha_tes == [mag_tes[1]])
    b0_map = [r for r in refs if r.frame.part is Part.FIELD_MAP]
    if b0_map and not (set(pha_tes) >= set(mag_tes) and pha_tes):
        return (f"a B0 field map ({_plural(len(b0_map), 'field-map image')} "
                f"{_field_map_evidence(b0_map)}), not the phase of every echo: not a QSM "
                "acquisition")
    if fieldmap or siemens_pattern:
        names = sorted({r.instance.sequence_name for r in refs if r.instance.sequence_name})
        how = f", sequence {', '.join(names)}" if names else ""
        return (f"a phase-difference field map (B0 mapping{how}), not the phase of every echo: "
                "not a QSM acquisition")
    parts = {r.frame.part for r in refs}
    if Part.PHASE not in parts and len(mag_tes) <= 1 and require_phase:
        echo = "one echo" if mag_tes else "no echo time"
        return f"{echo}, magnitude only: not a multi-echo gradient echo with phase"
    return None


def _field_map_evidence(refs: list[FrameRef]) -> str:
    """What marks the frames as a B0 field map: their ImageType/FrameType, else their unit."""
    first = refs[0]
    marks = ("FIELD_MAP", "FIELDMAP", "B0MAP", "B0_MAP", "B0 MAP", "B0")
    tokens = [t for t in first.instance.image_type[2:4] if t in marks]
    if tokens:
        return f"marked {tokens[0]}"
    unit = first.frame.units or first.frame.rescale_type
    return f"in {unit}" if unit else "marked as a field map in their frame type"


def _asked_for(cand: _Candidate, qsm_series: tuple[str, ...]) -> bool:
    """Whether a series of the candidate matches the site's QSM protocol names."""
    return any(_matches_protocol(u.refs[0].instance.series_description, qsm_series)
               for u in cand.units)


def _judge(
    cand: _Candidate,
    min_echoes: int,
    require_phase: bool,
    pos_key: _PositionKeys,
    pass_over: bool,
    qsm_series: tuple[str, ...],
) -> AcquisitionPlan | Problem:
    """The candidate as a plan, a problem, or passed over (rule 7)."""
    triage = pass_over and not _asked_for(cand, qsm_series)
    if triage:
        why = _not_a_gre(cand)
        if why is not None:
            return cand.passed_over(why)
    result = _evaluate(cand, min_echoes, require_phase, pos_key)
    if triage and not isinstance(result, AcquisitionPlan):
        why = _plainly_not_candidate(cand, require_phase)
        if why is not None:
            return cand.passed_over(why)
    return result


@dataclass
class _EchoTable:
    """A candidate's frames by part, echo time and slice position, and what does not fit."""

    mag: dict[_EchoKey, dict[_PosKey, list[FrameRef]]]
    pha: dict[_EchoKey, dict[_PosKey, list[FrameRef]]]
    others: dict[Part, int]
    """Frames of any other part (e.g. a B0 field map), counted per part."""
    no_te: int
    """Magnitude and phase frames without a usable echo time."""
    positions: dict[_PosKey, tuple[float, float, float]]
    """A slice position as written, per position key."""

    @property
    def parts(self) -> dict[Part, dict[_EchoKey, dict[_PosKey, list[FrameRef]]]]:
        return {Part.MAGNITUDE: self.mag, Part.PHASE: self.pha}

    @property
    def mag_tes(self) -> list[_EchoKey]:
        return sorted(self.mag)

    @property
    def pha_tes(self) -> list[_EchoKey]:
        return sorted(self.pha)

    def slice_keys(self) -> set[_PosKey]:
        """Every slice position of any echo of magnitude or phase."""
        return {pk for echoes in self.parts.values() for per_pos in echoes.values()
                for pk in per_pos}


def _tabulate(refs: list[FrameRef], pos_key: _PositionKeys) -> _EchoTable:
    """Sort the frames into magnitude and phase by echo time and slice position."""
    table = _EchoTable(defaultdict(lambda: defaultdict(list)),
                       defaultdict(lambda: defaultdict(list)), defaultdict(int), 0, {})
    parts = table.parts
    for r in refs:
        f = r.frame
        assert f.position is not None
        table.positions.setdefault(pos_key(f.position), f.position)
        if f.part not in parts:
            table.others[f.part] += 1
            continue
        te = _te_key(f)
        if te is None:
            table.no_te += 1
            continue
        parts[f.part][te][pos_key(f.position)].append(r)
    return table


def _without_echo_time(table: _EchoTable) -> str | None:
    """Images that have no usable echo time."""
    return f"{_plural(table.no_te, 'image')} without an echo time" if table.no_te else None


def _no_magnitude(table: _EchoTable) -> str | None:
    """Why there is nothing to build on: no magnitude image with an echo time."""
    if table.mag:
        return None
    extra = ""
    if table.others:
        listed = ", ".join(f"{n} {p.value}" for p, n in sorted(table.others.items()))
        extra = f" (found {listed} images; these are not combined)"
    what = "only phase images, no magnitude" if table.pha else "no magnitude or phase images"
    if table.no_te:
        what = f"{_plural(table.no_te, 'image')} without an echo time, and {what} with one"
    return f"{what}{extra}"


def _phase_difference_phase(refs: list[FrameRef]) -> str | None:
    """Why the phase is a phase-difference field map (its headers say so), not per-echo phase."""
    fieldmap = [r for r in refs if r.frame.part is Part.PHASE and r.instance.phase_difference]
    if not fieldmap:
        return None
    names = sorted({r.instance.sequence_name for r in fieldmap if r.instance.sequence_name})
    how = f" (sequence {', '.join(names)})" if names else ""
    return (
        f"the phase in series {_series_of(fieldmap, Part.PHASE)} is a phase-difference "
        f"field map{how}, not a per-echo phase; QSM needs the phase of every echo"
    )


def _siemens_field_map(refs: list[FrameRef], table: _EchoTable) -> str | None:
    """Why two magnitude echoes with one phase at the second echo time is a Siemens
    phase-difference field map (its headers do not say so), not per-echo phase."""
    mag_tes = table.mag_tes
    if not (refs[0].instance.vendor is Vendor.SIEMENS and len(mag_tes) == 2
            and table.pha_tes == [mag_tes[1]]):
        return None
    return (
        f"magnitude has 2 echoes ({_ms(mag_tes[0])}, {_ms(mag_tes[1])}) but phase "
        f"only one, at the second echo time: this looks like a Siemens "
        f"phase-difference field map, not a per-echo phase"
    )


def _non_positive_echo_times(table: _EchoTable) -> str | None:
    """Echo times of 0 or less (not the echo of a gradient echo)."""
    not_positive = sorted({k for k in (*table.mag_tes, *table.pha_tes) if k <= 0})
    if not not_positive:
        return None
    return (
        f"echo time of 0 or less ({', '.join(_ms(k) for k in not_positive)}): not the "
        "echo of a gradient echo"
    )


def _phase_pairing(table: _EchoTable, refs: list[FrameRef], require_phase: bool) -> str | None:
    """Magnitude/phase pairing: phase missing (when required), or echo times that do not
    match between magnitude and phase."""
    mag_tes, pha_tes = table.mag_tes, table.pha_tes
    if not table.pha:
        if not require_phase:
            return None
        if table.others.get(Part.FIELD_MAP):
            return (
                f"no per-echo phase: magnitude ({_plural(len(mag_tes), 'echo', 'echoes')}) and "
                f"a B0 field map ({_plural(table.others[Part.FIELD_MAP], 'image')}) were "
                "found; QSM needs the phase of every echo"
            )
        return (
            f"no phase: only magnitude images ({_plural(len(mag_tes), 'echo', 'echoes')}) "
            "were found; QSM needs the phase of every echo"
        )
    if mag_tes == pha_tes:
        return None
    only_m = [k for k in mag_tes if k not in table.pha]
    only_p = [k for k in pha_tes if k not in table.mag]
    detail = []
    if only_m:
        detail.append(
            f"magnitude (series {_series_of(refs, Part.MAGNITUDE)}) has TE "
            f"{', '.join(_ms(k) for k in only_m)} with no matching phase"
        )
    if only_p:
        detail.append(
            f"phase (series {_series_of(refs, Part.PHASE)}) has TE "
            f"{', '.join(_ms(k) for k in only_p)} with no matching magnitude"
        )
    return "mismatched echo times between magnitude and phase: " + "; ".join(detail)


def _too_few_echoes(table: _EchoTable, min_echoes: int) -> str | None:
    """Fewer echoes than the rule needs."""
    n_echoes = len(table.mag_tes)
    if n_echoes >= min_echoes:
        return None
    return f"{_plural(n_echoes, 'echo', 'echoes')}, the rule needs at least {min_echoes}"


def _repeated_slices(table: _EchoTable) -> list[str]:
    """One image per slice, echo and part: each echo of a part with more than one image at a
    slice position."""
    reasons = []
    for part, echoes in table.parts.items():
        for key in sorted(echoes):
            dups = {p: rs for p, rs in echoes[key].items() if len(rs) > 1}
            if not dups:
                continue
            numbers = {r.frame.echo_number for rs in dups.values() for r in rs}
            numbers.discard(None)
            note = ""
            if len(numbers) > 1:
                note = (
                    f" with different echo numbers ({', '.join(map(str, sorted(numbers)))}): "
                    "the echo times do not tell the echoes apart (GE exports may repeat the "
                    "first TE)"
                )
            reasons.append(
                f"{part.value} TE {_ms(key)} has more than one image at "
                f"{_plural(len(dups), 'slice position')}{note}"
            )
    return reasons


def _missing_slices(table: _EchoTable, refs: list[FrameRef]) -> str | None:
    """Every slice for every echo and part: which echoes of which part lack slices (led by
    "phase is one slice short of magnitude" when that is what happened)."""
    n_expected = len(table.slice_keys())
    short: list[tuple[Part, _EchoKey, int]] = []
    for part, echoes in table.parts.items():
        for key in sorted(echoes):
            have = len(echoes[key])
            if have < n_expected:
                short.append((part, key, have))
    if not short:
        return None
    echo_index = {k: i + 1 for i, k in enumerate(table.mag_tes or table.pha_tes)}
    lines = []
    for part, key, have in short:
        missing = n_expected - have
        number = echo_index.get(key)
        which = f"echo {number} " if number else ""
        lines.append(
            f"{part.value} {which}(TE {_ms(key)}, series "
            f"{_series_of(refs, part, key)}) has {have} of {n_expected} slices, "
            f"{_plural(missing, 'slice')} missing"
        )
    mag_complete = all(len(table.mag[k]) == n_expected for k in table.mag)
    phase_short = [s for s in short if s[0] is Part.PHASE]
    if (table.pha and mag_complete and phase_short
            and all(s[2] == n_expected - 1 for s in short)):
        lead = (
            "phase is one slice short of magnitude"
            if len(phase_short) == len(table.pha)
            else "a phase slice is missing"
        )
    else:
        lead = "missing slices"
    return f"{lead}: " + "; ".join(lines)


def _left_out(others: dict[Part, int]) -> str:
    """The images of other parts the acquisition leaves out, in words."""
    return "; ".join(
        f"{_plural(n, f'{p.value} image')} left out"
        + (" (a B0 field map, not the phase of every echo)" if p is Part.FIELD_MAP else "")
        for p, n in sorted(others.items())
    )


def _plan(cand: _Candidate, table: _EchoTable) -> AcquisitionPlan | Problem:
    """The plan of a candidate whose echoes and slices are complete, or the problem with its
    slice geometry (not a regular stack)."""
    mag_tes = table.mag_tes
    some = next(iter(table.mag[mag_tes[0]].values()))[0]
    try:
        affine, ordered = _stack_affine(
            {k: table.positions[k] for k in table.slice_keys()}, some.frame)
    except ValueError as exc:
        reason = str(exc)
        if "not evenly spaced" in reason:
            reason += " (a slice may be missing from every echo and part)"
        return cand.problem(f"cannot build the slice geometry: {reason}")

    def grid(part_table: dict[_EchoKey, dict[_PosKey, list[FrameRef]]]) -> tuple:
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


def _evaluate(
    cand: _Candidate, min_echoes: int, require_phase: bool, pos_key: _PositionKeys
) -> AcquisitionPlan | Problem:
    """The candidate as a plan (rule 5), or a problem: the first reason that leaves nothing to
    check (no magnitude; a phase-difference field map), else every reason found, in order."""
    refs = cand.refs
    table = _tabulate(refs, pos_key)
    stop = (_no_magnitude(table) or _phase_difference_phase(refs)
            or _siemens_field_map(refs, table))
    if stop:
        return cand.problem(stop)
    reasons = [reason for reason in (
        _without_echo_time(table),
        _non_positive_echo_times(table),
        _phase_pairing(table, refs, require_phase),
        _too_few_echoes(table, min_echoes),
        *_repeated_slices(table),
        _missing_slices(table, refs),
    ) if reason]
    if reasons:
        return cand.problem("; ".join(reasons))
    return _plan(cand, table)


def _stack_affine(
    positions: dict[_PosKey, tuple[float, float, float]], frame: FrameInfo
) -> tuple[NDArray[np.float64], list[_PosKey]]:
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


# ---------------------------------------------------------------------------------------------
# T1w references


def _is_t1w_candidate(cand: _Candidate) -> bool:
    """T1-weighted, magnitude (or unstated part) only, and no parametric map."""
    refs = cand.refs
    return (
        cand.t1
        and all(r.frame.part in (Part.MAGNITUDE, Part.UNKNOWN) for r in refs)
        and not any("MAP" in token for r in refs for token in r.instance.image_type)
    )


def _evaluate_t1w(cand: _Candidate, pos_key: _PositionKeys) -> T1wReference | str:
    """The candidate as a T1w reference, or why it cannot be one."""
    uids, numbers = cand.series()
    if len(uids) > 1:
        return "its images come from several series"
    refs = cand.refs
    tes = {_te_key(r.frame) for r in refs}
    if len(tes) > 1:
        return f"it has {len(tes)} echoes (a single-echo or echo-combined series is needed)"
    by_position: dict[_PosKey, list[FrameRef]] = defaultdict(list)
    for r in refs:
        assert r.frame.position is not None
        by_position[pos_key(r.frame.position)].append(r)
    repeated = sum(len(rs) > 1 for rs in by_position.values())
    if repeated:
        return f"more than one image at {_plural(repeated, 'slice position')}"
    if len(by_position) < T1W_MIN_SLICES:
        return (
            f"{_plural(len(by_position), 'slice')}; a reference volume needs at least "
            f"{T1W_MIN_SLICES}"
        )
    first = refs[0]
    positions = {k: rs[0].frame.position for k, rs in by_position.items()}
    try:
        affine, ordered = _stack_affine(positions, first.frame)  # type: ignore[arg-type]
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
    return round(float(np.prod(ref.voxel_size_mm)), 3)


def _t1w_rank(ref: T1wReference) -> tuple:
    """Sort key: finest voxels first, then the latest series, then the series UID."""
    number = -1 if ref.series_number is None else ref.series_number
    return (_voxel_volume(ref), -number, ref.series_uid)


def _with_t1w(
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


def _geometry_difference(a: _Candidate, b: _Candidate, clusters: list[_Cluster]) -> str:
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


_Judge = Callable[[_Candidate], AcquisitionPlan | Problem]
_UnitKey = tuple[str, bool, int]  # series UID, Enhanced, cluster


def _cluster_of(
    info: InstanceInfo, frame: FrameInfo, clusters: list[_Cluster], cache: dict[tuple, int]
) -> int:
    """Rule 2: the geometry cluster of a frame (by its exact geometry as seen before, else the
    first cluster that accepts it within the tolerances, else a new one)."""
    ckey = (
        info.study_uid,
        info.frame_of_reference_uid,
        info.rows,
        info.columns,
        info.derived,
        frame.orientation,
        frame.pixel_spacing,
    )
    cid = cache.get(ckey)
    if cid is None:
        cid = next((i for i, c in enumerate(clusters) if c.accepts(info, frame)), None)
        if cid is None:
            cid = len(clusters)
            clusters.append(
                _Cluster(
                    info.study_uid,
                    info.frame_of_reference_uid,
                    int(info.rows),
                    int(info.columns),
                    frame.orientation,
                    frame.pixel_spacing,
                    info.derived,
                )
            )
        cache[ckey] = cid
    return cid


def _collect_units(
    infos: list[InstanceInfo], pos_key: _PositionKeys
) -> tuple[list[_Cluster], dict[_UnitKey, _Unit], dict[str, list[InstanceInfo]]]:
    """Rules 1 to 3: each frame of each instance (once per SOP Instance UID) into the unit of
    its series and geometry cluster; the clusters, the units, and per series the instances
    with a frame without image plane geometry."""
    seen_uids: set[str] = set()
    clusters: list[_Cluster] = []
    cluster_cache: dict[tuple, int] = {}
    units: dict[_UnitKey, _Unit] = {}
    no_geometry: dict[str, list[InstanceInfo]] = defaultdict(list)
    for info in infos:
        if info.sop_instance_uid in seen_uids:
            continue
        seen_uids.add(info.sop_instance_uid)
        for frame in info.frames:
            if not _plane_ok(info, frame):
                bad = no_geometry[info.series_uid]
                if not bad or bad[-1] is not info:
                    bad.append(info)
                continue
            cid = _cluster_of(info, frame, clusters, cluster_cache)
            ukey = (info.series_uid, info.enhanced, cid)
            unit = units.get(ukey)
            if unit is None:
                unit = units[ukey] = _Unit(cid, info.series_uid, info.series_number)
            unit.refs.append(FrameRef(info, frame))
            unit.t1 = unit.t1 and bool(info.t1_evidence)
            te = _te_key(frame)
            unit.keys.add((frame.part, te))
            unit.positions.add(pos_key(frame.position))
    return clusters, units, no_geometry


def _takes(cand: _Candidate, unit: _Unit) -> bool:
    """Rule 3: whether the unit joins the candidate (same cluster and T1 weighting, slice
    positions that overlap, none of its (part, echo) keys yet, and the same echo train)."""
    return (
        cand.cluster == unit.cluster
        and cand.t1 == unit.t1
        and bool(cand.positions & unit.positions)
        and not cand.keys & unit.keys
        and _same_echo_train(cand, unit)
    )


def _assemble_candidates(units: Iterable[_Unit]) -> list[_Candidate]:
    """Rule 3: the units, in series-number order per cluster, each joining the first candidate
    that takes it, else starting one."""
    candidates: list[_Candidate] = []
    ordered_units = sorted(
        units,
        key=lambda u: (u.cluster, u.series_number is None, u.series_number or 0, u.series_uid),
    )
    for unit in ordered_units:
        target = next((c for c in candidates if _takes(c, unit)), None)
        if target is None:
            target = _Candidate(unit.cluster, unit.t1)
            candidates.append(target)
        target.add(unit)
    return candidates


@dataclass
class _T1wFound:
    """Rule 6: the T1-weighted magnitude-only candidates, as references or why not."""

    references: list[T1wReference] = field(default_factory=list)
    unusable: list[tuple[str, str, str]] = field(default_factory=list)
    """(label, study UID, why) of each T1-weighted candidate that is not a usable reference."""
    candidates: list[tuple[_Candidate, T1wReference | str]] = field(default_factory=list)
    indices: set[int] = field(default_factory=set)
    """Their indices among all candidates (they become neither plans nor problems)."""


def _t1w_references(candidates: list[_Candidate], pos_key: _PositionKeys) -> _T1wFound:
    """Rule 6: T1-weighted magnitude-only candidates are references for the plans, never
    problems."""
    found = _T1wFound()
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


def _only(cand: _Candidate, part: Part) -> bool:
    """Of magnitude and phase, the candidate holds ``part`` only."""
    return cand.parts() & {Part.MAGNITUDE, Part.PHASE} == {part}


def _phase_partner(
    i: int, candidates: list[_Candidate], paired: set[int]
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


def _together(a: _Candidate, b: _Candidate) -> _Candidate:
    """One candidate of the units of both (same geometry), in series order."""
    both = _Candidate(a.cluster, a.t1)
    for unit in sorted(
        a.units + b.units,
        key=lambda u: (u.series_number is None, u.series_number or 0, u.series_uid),
    ):
        both.add(unit)
    return both


def _mixed_geometry(a: _Candidate, b: _Candidate, clusters: list[_Cluster]) -> Problem:
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


def _magnitude_with_phase(
    candidates: list[_Candidate], paired: set[int], clusters: list[_Cluster], judge: _Judge
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
            results.append((_sort_key(both), judge(both)))
        else:
            results.append((_sort_key(a), _mixed_geometry(a, b, clusters)))
    return results


def _matches_protocol(series_description: str, qsm_series: tuple[str, ...]) -> bool:
    """Whether a series description matches one of the site's QSM protocol names."""
    return any(
        fnmatch.fnmatchcase(series_description.casefold(), p.casefold()) for p in qsm_series
    )


def _without_geometry(
    series_uid: str, bad: list[InstanceInfo], pass_over: bool, qsm_series: tuple[str, ...]
) -> tuple[tuple, Problem]:
    """A series with instances without image plane geometry: passed over (rule 7), or a
    problem when triage is off or the series is one of the site's QSM protocol."""
    first = bad[0]
    label = (
        f"series {first.series_number} '{first.series_description}' "
        f"(series UID {series_uid})"
    )
    why = (
        f"{_plural(len(bad), 'instance')} without image plane geometry (position, "
        "orientation, pixel spacing or matrix missing or invalid); not an image series "
        "that can be processed"
    )
    kind = PassedOver if pass_over and not _matches_protocol(
        first.series_description, qsm_series
    ) else Problem
    item = Problem(
        reason=f"{label}: {why}",
        study_uid=first.study_uid,
        series_uids=(series_uid,),
        series_numbers=(first.series_number,),
    )
    if kind is PassedOver:
        item = PassedOver(**{**vars(item), "reason": f"{label}: passed over: {why}"}, why=why)
    return (first.study_uid, first.series_number is None, first.series_number or 0), item


def _unused_t1w(cand: _Candidate, evaluated: T1wReference | str, used: set[str]) -> str | None:
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


def _in_order(
    results: list[tuple[tuple, AcquisitionPlan | Problem]], t1w: _T1wFound
) -> list[AcquisitionPlan | Problem]:
    """The results by study and first series number, each plan with its T1w reference, and
    the T1-weighted series no acquisition uses, passed over."""
    results.sort(key=lambda item: item[0])
    out = [
        _with_t1w(r, t1w.references, t1w.unusable) if isinstance(r, AcquisitionPlan) else r
        for _, r in results
    ]
    used = {p.t1w.series_uid for p in out if isinstance(p, AcquisitionPlan) and p.t1w}
    for cand, evaluated in t1w.candidates:
        why = _unused_t1w(cand, evaluated, used)
        if why is not None:
            out.append(cand.passed_over(why))
    order = {id(r): key for key, r in results}
    out.sort(key=lambda r: order.get(id(r)) or (r.study_uid, r.series_numbers[0] is None,
                                                  r.series_numbers[0] or 0))
    return out


def group_acquisitions(
    infos: list[InstanceInfo],
    min_echoes: int = 2,
    require_phase: bool = True,
    pass_over: bool = True,
    qsm_series: tuple[str, ...] = (),
) -> list[AcquisitionPlan | Problem]:
    """Group instance summaries into acquisitions (see the module docstring for the rules).

    Args:
        infos: summaries of any instances, in any order; duplicates are ignored.
        min_echoes: fewest echoes an acquisition must have.
        require_phase: report magnitude-only acquisitions as problems (else plan them with
            ``phase=None``).
        pass_over: series that are plainly not QSM candidates come back as
            :class:`PassedOver` (rule 7); False: every series that makes no acquisition is a
            problem.
        qsm_series: series descriptions (shell patterns, case-insensitive) of the site's QSM
            protocol: a series matching one is never passed over.

    Returns:
        Plans, problems and passed-over series, ordered by study and first series number.
    """
    pos_key = _PositionKeys()
    clusters, units, no_geometry = _collect_units(infos, pos_key)
    candidates = _assemble_candidates(units.values())
    t1w = _t1w_references(candidates, pos_key)
    judge: _Judge = partial(_judge, min_echoes=min_echoes, require_phase=require_phase,
                            pos_key=pos_key, pass_over=pass_over, qsm_series=qsm_series)
    paired = set(t1w.indices)
    results = _magnitude_with_phase(candidates, paired, clusters, judge)
    results += [(_sort_key(cand), judge(cand))
                for i, cand in enumerate(candidates) if i not in paired]
    results += [_without_geometry(series_uid, bad, pass_over, qsm_series)
                for series_uid, bad in no_geometry.items()]
    return _in_order(results, t1w)


def _sort_key(cand: _Candidate) -> tuple:
    first = cand.units[0]
    return (
        first.refs[0].instance.study_uid,
        first.series_number is None,
        first.series_number or 0,
    )
