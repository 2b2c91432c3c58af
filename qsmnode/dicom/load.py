"""Load DICOM files into :class:`~qsmnode.acquisition.MultiEchoGRE` acquisitions.

The three steps (each usable on its own; the tracker runs the first two as files arrive):

1. :func:`~qsmnode.dicom.headers.summarize` each instance (headers only);
2. :func:`~qsmnode.dicom.grouping.group_acquisitions` into plans or problems;
3. :func:`load_acquisition` reads the pixels of one plan (each file once, into preallocated
   arrays) and returns a :class:`LoadedAcquisition`.

:func:`load_folder` does all three for a folder.

A plan's same-session T1w reference (:attr:`AcquisitionPlan.t1w`) is loaded with it by
:func:`load_t1w` into :attr:`LoadedAcquisition.t1w`: a float32 ``[i, j, k]`` volume (the Modality
LUT applied) with its RAS affine, on the slice order the grouping found. A T1w that cannot be
loaded never fails the acquisition: :attr:`LoadedAcquisition.t1w_error` says why.

Phase to radians. ``v`` is the stored value after the Modality LUT (RescaleSlope/Intercept,
defaults 1 and 0). The first rule that applies wins:

1. Explicit units: RescaleType or the Real World Value Mapping unit code ``mrad`` → ``v/1000``;
   ``rad`` → ``v``. (Classic Philips phase says RescaleType ``mrad``; Enhanced Philips frames
   say RescaleType ``US`` and carry ``mrad`` in the mapping.)
2. Siemens with slope 2 and intercept -4096 (``v`` in -4096..4094) → ``v·π/4096``.
3. Siemens without rescale tags (raw 0..4095) → ``(v − 2048)·π/2048``.
4. Otherwise by the range of ``v`` over all such phase frames of the acquisition: within ±π
   (0.1 % slack) → radians; within ±3143 → mrad; within 0..4095 → 12-bit,
   ``(v − 2048)·π/2048``; within ±4096 → ``v·π/4096``; anything else is a :class:`LoadError`.
   This relies on phase filling most of its range, which wrapped phase of a head does.

Then the vendor's sign (:data:`VENDOR_PHASE_SIGN`, or the ``phase_sign`` override) is applied
and the phase wrapped to [-π, π). Philips' ±3142 mrad is slightly beyond ±π; wrapping folds it.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from qsmnode.acquisition import GAMMA_BAR_HZ_PER_T, MultiEchoGRE
from qsmnode.dicom.grouping import (
    AcquisitionPlan,
    FrameRef,
    PassedOver,
    Problem,
    T1wReference,
    group_acquisitions,
)
from qsmnode.dicom.headers import (
    FrameInfo,
    InstanceInfo,
    Part,
    Vendor,
    iter_files,
    summarize,
    summarize_files,
)

__all__ = [
    "VENDOR_PHASE_SIGN",
    "AcquisitionPlan",
    "FrameInfo",
    "InstanceInfo",
    "LoadError",
    "LoadedAcquisition",
    "LoadedT1w",
    "Part",
    "PassedOver",
    "Problem",
    "SourceRef",
    "T1wReference",
    "Vendor",
    "group_acquisitions",
    "load_acquisition",
    "load_folder",
    "load_t1w",
    "phase_scaling",
    "phase_scaling_from_range",
    "summarize",
    "summarize_files",
    "wrap_phase",
]

VENDOR_PHASE_SIGN: Mapping[str, int] = MappingProxyType(
    {Vendor.SIEMENS: 1, Vendor.PHILIPS: 1, Vendor.GE: -1, Vendor.OTHER: 1}
)
"""Factor applied to the phase in radians, per vendor. +1 is the simulator's convention (and
Siemens'); GE reports phase with the opposite sign (DOMAIN.md). Philips stays +1 here: MEDI's
negation of Philips phase is a MEDI convention, to be confirmed against a phantom before this
table changes. Override per acquisition with ``load_acquisition(..., phase_sign=...)``."""

PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "PatientPosition",
    "BodyPartExamined",
)
"""Attributes copied into :attr:`LoadedAcquisition.patient_study` for the derived objects."""

_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


class LoadError(ValueError):
    """A plan whose files cannot be turned into arrays; the message says why."""


class SourceRef(NamedTuple):
    """One source image: its SOP class and instance, and its frame (1-based; None if classic)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None


@dataclass(frozen=True, eq=False)
class LoadedT1w:
    """A loaded same-session T1w: float32 ``[i, j, k]`` and its voxel-to-RAS affine."""

    image: NDArray[np.float32] = field(repr=False)
    affine: NDArray[np.float64] = field(repr=False)
    reference: T1wReference = field(repr=False)

    @property
    def series_uid(self) -> str:
        return self.reference.series_uid

    def describe(self) -> str:
        """Series, grid and why it is T1-weighted, in one line."""
        return self.reference.describe()

    def to_json(self) -> dict[str, Any]:
        """What a result record says about it."""
        return self.reference.to_json()


@dataclass(frozen=True, eq=False)
class LoadedAcquisition:
    """A loaded acquisition, with what the derived objects need to reference their sources.

    Attributes:
        gre: the arrays. Without phase (a plan made with ``require_phase=False``) the phase is
            NaN, so that no QSM can silently come out of it; check :attr:`has_phase`.
        magnitude_sources, phase_sources: ``[k][e]`` source of each slice and echo.
        patient_study: :data:`PATIENT_STUDY_KEYWORDS` present in the first magnitude file.
        header: that file's dataset without its pixel data.
        phase_scaling: how the phase was converted to radians (for logs and reports).
        phase_sign: the sign that was applied.
        t1w: the plan's same-session T1w reference, loaded (None: none, or not loadable).
        t1w_note: the grouping's note on the study's T1w series (:attr:`AcquisitionPlan.t1w_note`).
        t1w_error: why the chosen T1w could not be loaded (empty when it was, or there is none).
    """

    gre: MultiEchoGRE
    vendor: Vendor
    magnitude_sources: tuple[tuple[SourceRef, ...], ...]
    phase_sources: tuple[tuple[SourceRef, ...], ...] | None
    study_uid: str
    series_uids: tuple[str, ...]
    series_numbers: tuple[int | None, ...]
    frame_of_reference_uid: str
    patient_study: Mapping[str, Any]
    header: Dataset = field(repr=False)
    phase_scaling: str
    phase_sign: int
    t1w: LoadedT1w | None = None
    t1w_note: str = ""
    t1w_error: str = ""

    @property
    def has_phase(self) -> bool:
        return self.phase_sources is not None


# ---------------------------------------------------------------------------------------------
# phase scaling


def phase_scaling(frame: FrameInfo, vendor: Vendor | str) -> tuple[float, float, str] | None:
    """``(a, b, description)`` with radians ``= a·v + b`` for the rescaled value ``v`` of one
    phase frame, from its header alone; None when only the value range can tell (rule 4)."""
    for unit in (frame.rescale_type, frame.units):
        u = (unit or "").strip().lower()
        if u == "mrad":
            return 1e-3, 0.0, "mrad (from the header)"
        if u in ("rad", "radian", "radians"):
            return 1.0, 0.0, "radians (from the header)"
    if vendor == Vendor.SIEMENS:
        slope, intercept = frame.rescale_slope, frame.rescale_intercept
        if slope is None and intercept is None:
            return math.pi / 2048, -math.pi, "Siemens raw 0..4095, no rescale"
        if (
            slope is not None
            and intercept is not None
            and math.isclose(slope, 2.0)
            and math.isclose(intercept, -4096.0)
        ):
            return math.pi / 4096, 0.0, "Siemens slope 2, intercept -4096"
    return None


def phase_scaling_from_range(lo: float, hi: float) -> tuple[float, float, str]:
    """``(a, b, description)`` chosen from the range of the rescaled phase values (rule 4).

    Raises:
        LoadError: the range fits none of the known encodings, or has no width (every phase
            value the same: no phase information, e.g. a RescaleSlope of 0).
    """
    if not hi > lo:  # a range of no width: every value the same (or NaN)
        raise LoadError(
            f"the phase images hold one value only ({lo:.6g}): no phase information (a "
            "RescaleSlope of 0?); nothing can be computed from them"
        )
    if lo >= -math.pi * 1.001 and hi <= math.pi * 1.001:
        return 1.0, 0.0, f"radians (values {lo:.4g}..{hi:.4g})"
    if lo >= -3143 and hi <= 3143:
        return 1e-3, 0.0, f"mrad (values {lo:.6g}..{hi:.6g})"
    if lo >= 0 and hi <= 4095:
        return math.pi / 2048, -math.pi, f"12-bit 0..4095 (values {lo:.6g}..{hi:.6g})"
    if lo >= -4096 and hi <= 4096:
        return math.pi / 4096, 0.0, f"±4096 (values {lo:.6g}..{hi:.6g})"
    raise LoadError(
        f"cannot tell the phase units: values span {lo:.6g}..{hi:.6g}, which is none of "
        "radians, mrad, 12-bit 0..4095 or ±4096"
    )


PHASE_MIN_SPREAD_RAD = 1e-3
"""Smallest spread (max - min, radians) of one echo's phase that carries field information: a
real phase image spans about 2π; less than this is a constant image."""


def check_plausible(magnitude: NDArray[np.float32], phase: NDArray[np.float32] | None,
                    echo_times_s: Sequence[float]) -> None:
    """Refuse images that cannot be a multi-echo GRE of a head: a magnitude that is zero
    everywhere (in any echo), or a phase that is constant in any echo.

    Raises:
        LoadError: naming the echo and what is wrong.
    """
    for e in range(magnitude.shape[-1]):
        te = f"echo {e + 1} (TE {echo_times_s[e] * 1e3:.4g} ms)"
        if not np.any(magnitude[..., e]):
            raise LoadError(f"the magnitude of {te} is zero everywhere: there is no image")
        if phase is None:
            continue
        values = phase[..., e]
        lo, hi = np.nanmin(values), np.nanmax(values)
        if not hi - lo >= PHASE_MIN_SPREAD_RAD:
            raise LoadError(
                f"the phase of {te} is constant ({lo:.6g} rad everywhere): no phase "
                "information (a RescaleSlope of 0?); nothing can be computed from it"
            )


def wrap_phase(phase: NDArray[np.float32]) -> NDArray[np.float32]:
    """Wrap radians to [-π, π) in place (float32: +π itself becomes -π) and return the array.

    Values within ±3π (every vendor encoding gives about ±π) take a fast path, one shift by 2π
    where needed, instead of a modulo over the whole array. NaN stays NaN.
    """
    if phase.size == 0:
        return phase
    pi = np.float32(np.pi)
    two_pi = np.float32(2 * np.pi)
    lo, hi = np.min(phase), np.max(phase)  # NaN if any NaN: then the modulo path
    if -3 * pi <= lo and hi < 3 * pi:
        phase[phase >= pi] -= two_pi
        phase[phase < -pi] += two_pi
    else:
        np.add(phase, pi, out=phase)
        np.mod(phase, two_pi, out=phase)
        np.subtract(phase, pi, out=phase)
    phase[phase >= pi] = -pi
    return phase


# ---------------------------------------------------------------------------------------------
# pixels


def _pixel_frames(ds: Dataset) -> NDArray:
    """Stored pixel values of every frame as ``[frames, Rows, Columns]``.

    Uncompressed little-endian data is viewed straight from the bytes (much faster than the
    general decoder); everything else goes through ``pixel_array``.
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    allocated = int(ds.get("BitsAllocated") or 0)
    if (
        syntax in _NATIVE_LITTLE_ENDIAN
        and "PixelData" in ds
        and int(ds.get("SamplesPerPixel") or 1) == 1
        and allocated in (8, 16, 32)
    ):
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
        count = rows * columns * n_frames
        data = ds.PixelData
        if len(data) < count * dtype.itemsize:
            raise LoadError(
                f"{ds.get('SOPInstanceUID', '?')}: pixel data holds {len(data)} bytes, "
                f"{count * dtype.itemsize} expected"
            )
        arr = np.frombuffer(data, dtype=dtype, count=count)
        stored = int(ds.get("BitsStored") or allocated)
        if stored < allocated:
            if signed:
                shift = allocated - stored
                arr = (arr << shift) >> shift
            else:
                arr = arr & dtype.type((1 << stored) - 1)
        return arr.reshape(n_frames, rows, columns)
    return np.asarray(ds.pixel_array).reshape(n_frames, rows, columns)


@dataclass
class _Job:
    part: Part
    k: int
    e: int
    ref: FrameRef


def _jobs_by_path(plan: AcquisitionPlan) -> dict[str, list[_Job]]:
    jobs: dict[str, list[_Job]] = defaultdict(list)
    tables = [(Part.MAGNITUDE, plan.magnitude)]
    if plan.phase is not None:
        tables.append((Part.PHASE, plan.phase))
    for part, table in tables:
        for k, row in enumerate(table):
            for e, ref in enumerate(row):
                if ref.path is None:
                    raise LoadError(
                        f"instance {ref.sop_instance_uid} has no file path: summarize files, "
                        "not datasets in memory, to load them"
                    )
                jobs[ref.path].append(_Job(part, k, e, ref))
    return jobs


def _sources(table: tuple[tuple[FrameRef, ...], ...]) -> tuple[tuple[SourceRef, ...], ...]:
    return tuple(
        tuple(SourceRef(r.instance.sop_class_uid, r.sop_instance_uid, r.frame_number) for r in row)
        for row in table
    )


def _header_copy(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` without its pixel data (the caller's dataset is untouched)."""
    copy = Dataset({tag: elem for tag, elem in ds.items() if tag != 0x7FE00010})
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        copy.file_meta = meta
    return copy


def _matrix_checked(path: str, pixels: NDArray[Any], ni: int, nj: int, what: str
                    ) -> NDArray[Any]:
    """The file's frames, after checking they have the ``nj`` rows × ``ni`` columns of ``what``."""
    if pixels.shape[1:] != (nj, ni):
        raise LoadError(
            f"{path}: {pixels.shape[1]}×{pixels.shape[2]} pixels, {what} has {nj}×{ni}"
        )
    return pixels


def _stored_frame(path: str, pixels: NDArray[Any], frame: FrameInfo
                  ) -> tuple[NDArray[Any], float, float]:
    """One frame's stored values as ``[i, j]``, with its Modality LUT slope and intercept."""
    index = (frame.frame_number or 1) - 1
    if index >= len(pixels):
        raise LoadError(f"{path}: frame {index + 1} requested, {len(pixels)} present")
    slope = 1.0 if frame.rescale_slope is None else frame.rescale_slope
    intercept = 0.0 if frame.rescale_intercept is None else frame.rescale_intercept
    return pixels[index].T, slope, intercept


def load_t1w(reference: T1wReference,
             read: Callable[[str], Dataset] = pydicom.dcmread) -> LoadedT1w:
    """Read the pixels of a T1w reference (each file once) into a :class:`LoadedT1w`.

    Raises:
        LoadError: a file is missing, unreadable or does not match its summary.
    """
    ni, nj = reference.columns, reference.rows
    image = np.empty((ni, nj, reference.n_slices), dtype=np.float32)
    by_path: dict[str, list[tuple[int, FrameRef]]] = defaultdict(list)
    for k, ref in enumerate(reference.frames):
        if ref.path is None:
            raise LoadError(f"instance {ref.sop_instance_uid} of the T1w has no file path")
        by_path[ref.path].append((k, ref))
    for path, slices in by_path.items():
        try:
            pixels = _pixel_frames(read(path))
        except LoadError:
            raise
        except Exception as exc:  # pydicom and OSError report unreadable files in many ways
            raise LoadError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
        _matrix_checked(path, pixels, ni, nj, "the T1w")
        for k, ref in slices:
            stored, slope, intercept = _stored_frame(path, pixels, ref.frame)
            image[:, :, k] = stored * np.float32(slope) + np.float32(intercept)
    return LoadedT1w(image=image, affine=np.asarray(reference.affine, dtype=np.float64),
                     reference=reference)


def _sign_for(vendor: Vendor, phase_sign: int | Mapping[str, int] | None) -> int:
    if isinstance(phase_sign, int):
        sign = phase_sign
    elif phase_sign is not None and vendor in phase_sign:
        sign = phase_sign[vendor]
    else:
        sign = VENDOR_PHASE_SIGN.get(vendor, 1)
    if sign not in (1, -1):
        raise ValueError(f"phase sign must be +1 or -1, not {sign!r}")
    return sign


def load_acquisition(
    plan: AcquisitionPlan,
    read: Callable[[str], Dataset] = pydicom.dcmread,
    phase_sign: int | Mapping[str, int] | None = None,
    with_t1w: bool = True,
) -> LoadedAcquisition:
    """Read the pixels of a plan into a :class:`LoadedAcquisition`.

    Args:
        plan: from :func:`group_acquisitions`.
        read: reads one file path into a dataset with its pixel data; each file is read once.
        phase_sign: +1 or -1 for this acquisition, or a per-vendor mapping that overrides
            :data:`VENDOR_PHASE_SIGN` entries; None uses the table.
        with_t1w: load the plan's T1w reference too (its failure is recorded, not raised).

    Raises:
        LoadError: a file does not match its summary, or the phase units cannot be told.
    """
    nk, ne = plan.n_slices, plan.n_echoes
    ni, nj = plan.columns, plan.rows
    magnitude = np.empty((ni, nj, nk, ne), dtype=np.float32)
    phase = np.full((ni, nj, nk, ne), np.nan, dtype=np.float32)
    range_frames: list[tuple[int, int]] = []
    scalings: set[str] = set()
    header: Dataset | None = None
    first_path = plan.magnitude[0][0].path

    for path, jobs in _jobs_by_path(plan).items():
        ds = read(path)
        pixels = _matrix_checked(path, _pixel_frames(ds), ni, nj, "the acquisition")
        if path == first_path:
            header = _header_copy(ds)
        for job in jobs:
            f = job.ref.frame
            stored, slope, intercept = _stored_frame(path, pixels, f)
            if job.part is Part.MAGNITUDE:
                if slope == 1.0 and intercept == 0.0:
                    magnitude[:, :, job.k, job.e] = stored
                else:
                    magnitude[:, :, job.k, job.e] = stored * np.float32(slope) + np.float32(
                        intercept
                    )
                continue
            rule = phase_scaling(f, plan.vendor)
            if rule is None:
                phase[:, :, job.k, job.e] = stored * np.float32(slope) + np.float32(intercept)
                range_frames.append((job.k, job.e))
                continue
            a, b, description = rule
            scalings.add(description)
            phase[:, :, job.k, job.e] = stored * np.float32(slope * a) + np.float32(
                intercept * a + b
            )

    if range_frames:
        ks, es = np.array(range_frames).T
        values = phase[:, :, ks, es]
        a, b, description = phase_scaling_from_range(float(values.min()), float(values.max()))
        scalings.add(description)
        for k, e in range_frames:
            view = phase[:, :, k, e]
            view *= np.float32(a)
            view += np.float32(b)

    sign = _sign_for(plan.vendor, phase_sign)
    if plan.phase is not None:
        if sign == -1:
            np.negative(phase, out=phase)
        wrap_phase(phase)
    assert header is not None
    check_plausible(magnitude, phase if plan.phase is not None else None, plan.echo_times_s)

    field_strength = plan.field_strength_t
    if field_strength is None:
        mhz = header.get("ImagingFrequency")
        if not mhz:
            raise LoadError(
                "neither MagneticFieldStrength nor ImagingFrequency is present: B0 unknown"
            )
        field_strength = float(mhz) * 1e6 / GAMMA_BAR_HZ_PER_T

    gre = MultiEchoGRE(
        magnitude=magnitude,
        phase=phase,
        echo_times_s=plan.echo_times_s,
        affine=np.asarray(plan.affine, dtype=np.float64),
        field_strength_t=float(field_strength),
    )
    patient_study = MappingProxyType(
        {kw: header[kw].value for kw in PATIENT_STUDY_KEYWORDS if kw in header}
    )
    t1w, t1w_error = None, ""
    if with_t1w and plan.t1w is not None:
        try:
            t1w = load_t1w(plan.t1w, read)
        except LoadError as exc:
            t1w_error = f"the T1w {plan.t1w.label()} could not be loaded: {exc}"
    return LoadedAcquisition(
        gre=gre,
        vendor=plan.vendor,
        magnitude_sources=_sources(plan.magnitude),
        phase_sources=None if plan.phase is None else _sources(plan.phase),
        study_uid=plan.study_uid,
        series_uids=plan.series_uids,
        series_numbers=plan.series_numbers,
        frame_of_reference_uid=plan.frame_of_reference_uid,
        patient_study=patient_study,
        header=header,
        phase_scaling="; ".join(sorted(scalings)) if scalings else "none (no phase)",
        phase_sign=sign,
        t1w=t1w,
        t1w_note=plan.t1w_note,
        t1w_error=t1w_error,
    )


def load_folder(
    root: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    min_echoes: int = 2,
    require_phase: bool = True,
    phase_sign: int | Mapping[str, int] | None = None,
) -> list[LoadedAcquisition | Problem]:
    """Summarize, group and load every acquisition under a folder (or in a list of folders or
    files). Plans that fail to load come back as problems."""
    roots = [root] if isinstance(root, str | os.PathLike) else list(root)
    infos: list[InstanceInfo] = summarize_files(p for r in roots for p in iter_files(r))
    out: list[LoadedAcquisition | Problem] = []
    for item in group_acquisitions(infos, min_echoes=min_echoes, require_phase=require_phase):
        if isinstance(item, Problem):
            out.append(item)
            continue
        try:
            out.append(load_acquisition(item, phase_sign=phase_sign))
        except LoadError as exc:
            out.append(
                Problem(
                    reason=f"series {', '.join(map(str, item.series_numbers))}: {exc}",
                    study_uid=item.study_uid,
                    series_uids=item.series_uids,
                    series_numbers=item.series_numbers,
                )
            )
    return out
