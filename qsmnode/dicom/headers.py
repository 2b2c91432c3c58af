"""Cheap per-instance header summaries: what grouping and loading need, read without pixels.

:func:`summarize` turns one DICOM file (or dataset) into an :class:`InstanceInfo`: UIDs, the
vendor, and one :class:`FrameInfo` per frame (one for a classic single-frame image) with the
echo time, the complex part, the plane geometry and the rescale. It never decodes pixel data.

How the complex part is found (first that answers wins). Classic images:

1. Philips private (2005,1011) "M"/"P"/"R"/"I" (creator "Philips MR Imaging DD 001"), read
   when the vendor is Philips or unknown.
2. GE private (0043,102F) 0/1/2/3 = magnitude/phase/real/imaginary (creator "GEMS_PARM_01"),
   read when the vendor is GE or unknown.
3. ComplexImageComponent, unless MIXED.
4. ImageType value 3 or 4: ``M``/``P``/``R``/``I``, the spelled-out forms, and Philips
   ``PHASE MAP``.

Enhanced frames: the standard attributes first (MR Image Frame Type's ComplexImageComponent,
then FrameType value 3 or 4), then the Philips per-frame private item (2005,140F) with (2005,1011).

Computed B0 field maps (``Part.FIELD_MAP``, whatever the vendor's part says): a frame whose
ImageType/FrameType value 3 or 4 is ``FIELD_MAP``, ``FIELDMAP``, ``B0MAP``, ``B0_MAP``,
``B0 MAP`` or ``B0`` (Philips FIELD_MAP frames, B0 maps), or whose RescaleType or Real World
Value Mapping unit is Hz or rad/s (a field in Hz, as GE B0 maps store it beside their
magnitude). Unverified on real GE and Philips B0-map files (none among the project's samples).

Phase-difference field maps (:attr:`InstanceInfo.phase_difference`), conservative on purpose:
an instance with phase frames is flagged only when its SequenceName or PulseSequenceName is a
Siemens field-mapping sequence (``*fm2d2r``, ``fm3d2``: ``fm`` followed by ``2d``/``3d``), or
its ImageType/FrameType carries a token naming a difference or field map (``DIFF``,
``PHASE_DIFF``, ``FM``, ``FIELD_MAP``, ``FIELDMAP``). The SeriesDescription is never used: the
real Philips sample is called "fcMRI Field Mapping" and holds ordinary per-echo phase. The
grouping adds a pattern check (Siemens: two magnitude echoes, phase only at the second TE).

T1-weighting (:attr:`InstanceInfo.t1_evidence`, the header half of the T1w-reference rule; the
grouping adds the volume half: single echo, magnitude only, same Frame of Reference). The
first that answers, giving the reason as text:

0. Not T1: SeriesDescription or ProtocolName names another contrast (``t2…``, ``flair``,
   ``pd…``, ``dir``, ``swi``, ``tof``, ``dwi``, ``bold``, ``qsm``) and no T1 name (rule 3).
1. An inversion-prepared gradient echo: InversionTime > 0 or ScanningSequence ``IR`` (Enhanced:
   MR Modifier InversionRecovery ``YES``), unless ScanningSequence has ``SE`` or ``EP`` (or
   EchoPulseSequence is ``SPIN``/``BOTH``): a spin-echo IR is a FLAIR, not a T1w.
2. SequenceName or PulseSequenceName of an MPRAGE family: Siemens ``tfl`` (``*tfl3d1_16ns``),
   Philips ``T1TFE``/``TFE``, or a name with ``mprage``/``mp2rage``.
3. SeriesDescription or ProtocolName with ``mprage``, ``mp2rage``, ``mp_rage``, or a word
   ``t1``, ``t1w``, ``t1tfe``, ``tfl``, ``tfe`` or ``bravo`` (words split at anything but
   letters and digits: ``t1_mprage_sag``, ``T1W_3D_TFE``, ``Sag 3D BRAVO``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
ENHANCED_MR_COLOR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.3"
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"

ENHANCED_SOP_CLASSES = frozenset(
    {
        ENHANCED_MR_IMAGE_STORAGE,
        ENHANCED_MR_COLOR_IMAGE_STORAGE,
        LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
    }
)
"""Multi-frame MR SOP classes with functional groups. Enhanced is detected by SOPClassUID
only, never by NumberOfFrames (DOMAIN.md)."""

MR_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE, *ENHANCED_SOP_CLASSES})
"""Every MR image SOP class: the receiver always stores these (others only with
``store_other_sop_classes``), and the tracker groups only these."""

PHILIPS_MR_CREATOR = "Philips MR Imaging DD 001"
PHILIPS_MR_FRAME_CREATOR = "Philips MR Imaging DD 005"
GE_PARM_CREATOR = "GEMS_PARM_01"


class Vendor(StrEnum):
    SIEMENS = "siemens"
    PHILIPS = "philips"
    GE = "ge"
    OTHER = "other"


class Part(StrEnum):
    MAGNITUDE = "magnitude"
    PHASE = "phase"
    REAL = "real"
    IMAGINARY = "imaginary"
    FIELD_MAP = "field map"
    """A computed B0 field map (Hz or rad/s), e.g. a GE B0 map or Philips FIELD_MAP frames."""
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class FrameInfo:
    """One frame of an instance (the only frame of a classic image).

    Attributes:
        frame_number: 1-based frame number in an Enhanced file; None for a classic image.
        echo_time_s: EchoTime (classic) or EffectiveEchoTime (Enhanced) in seconds.
        echo_number: EchoNumbers (first value) where present.
        part: the complex component.
        position: ImagePositionPatient (LPS mm).
        orientation: ImageOrientationPatient (six direction cosines).
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)``.
        slice_spacing: SpacingBetweenSlices, else SliceThickness (needed for a single slice).
        rescale_slope, rescale_intercept, rescale_type: Modality LUT (None where absent).
        units: the Real World Value Mapping's unit code (e.g. ``mrad``), lower case.
    """

    frame_number: int | None
    echo_time_s: float | None
    echo_number: int | None
    part: Part
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_spacing: float | None
    rescale_slope: float | None
    rescale_intercept: float | None
    rescale_type: str | None
    units: str | None


@dataclass(frozen=True)
class InstanceInfo:
    """What the grouping and the loader need to know about one instance, without its pixels.

    Rows and Columns are per instance: the standard fixes them for all frames of a file.
    """

    path: str | None
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    series_number: int | None
    series_description: str
    manufacturer: str
    vendor: Vendor
    enhanced: bool
    derived: bool
    """ImageType value 1 is DERIVED: never combined with ORIGINAL images."""
    image_type: tuple[str, ...]
    sequence_name: str
    rows: int | None
    columns: int | None
    images_in_acquisition: int | None
    field_strength_t: float | None
    phase_difference: bool
    frames: tuple[FrameInfo, ...]
    inversion_time_s: float | None = None
    """InversionTime (classic) or the MR Modifier's first InversionTimes (Enhanced), seconds."""
    t1_evidence: str = ""
    """Why the instance looks T1-weighted (see the module docstring); empty: it does not."""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    """What a radiographer recognises the study by (empty where absent); never patient data."""


# ---------------------------------------------------------------------------------------------
# value helpers


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
        if value is None:
            return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip().strip("\x00").strip()


def _tokens(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str | bytes):
        value = _text(value).split("\\")
    return tuple(_text(v).upper() for v in value)


def _private(ds: Dataset, group: int, creator: str, offset: int) -> Any:
    """Value of a private element by its creator, or None."""
    try:
        return ds.private_block(group, creator)[offset].value
    except (KeyError, ValueError):
        return None


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    if not seq:
        return None
    return seq[0]


def vendor_of(manufacturer: str) -> Vendor:
    """The vendor from Manufacturer (case-insensitive)."""
    m = manufacturer.lower()
    if "siemens" in m:
        return Vendor.SIEMENS
    if "philips" in m:
        return Vendor.PHILIPS
    if re.search(r"\bge\b", m) or "general electric" in m or m.startswith("gems"):
        return Vendor.GE
    return Vendor.OTHER


_PART_TOKENS = {
    "M": Part.MAGNITUDE,
    "MAG": Part.MAGNITUDE,
    "MAGNITUDE": Part.MAGNITUDE,
    "P": Part.PHASE,
    "PHASE": Part.PHASE,
    "PHASE MAP": Part.PHASE,
    "R": Part.REAL,
    "REAL": Part.REAL,
    "I": Part.IMAGINARY,
    "IMAGINARY": Part.IMAGINARY,
}
_GE_PARTS = {0: Part.MAGNITUDE, 1: Part.PHASE, 2: Part.REAL, 3: Part.IMAGINARY}
_FIELD_MAP_TOKENS = frozenset({"DIFF", "PHASE_DIFF", "PHASEDIFF", "FM", "FIELD_MAP", "FIELDMAP"})
_B0_MAP_TOKENS = frozenset({"FIELD_MAP", "FIELDMAP", "B0MAP", "B0_MAP", "B0 MAP", "B0"})
"""ImageType/FrameType values 3-4 of a computed B0 field map (not a magnitude or a phase)."""
_FIELD_UNITS = frozenset({"hz", "rad/s"})


def _field_map_part(part: Part, image_type: tuple[str, ...], *units: str | None) -> Part:
    """``Part.FIELD_MAP`` for a frame that is a computed B0 field map: ImageType/FrameType
    value 3 or 4 names one (:data:`_B0_MAP_TOKENS`), or its rescale type or Real World Value
    Mapping unit is Hz or rad/s (a field, not an image intensity or a phase); else ``part``."""
    if _B0_MAP_TOKENS.intersection(image_type[2:4]):
        return Part.FIELD_MAP
    if any(u and u.strip().lower() in _FIELD_UNITS for u in units):
        return Part.FIELD_MAP
    return part
_SIEMENS_FIELD_MAP_SEQUENCE = re.compile(r"^\*?fm[23]d", re.IGNORECASE)


def _part_from(philips: Any, ge: Any, component: Any, image_type: tuple[str, ...]) -> Part:
    token = _text(philips).upper()
    if token in _PART_TOKENS:
        return _PART_TOKENS[token]
    flag = _int(ge)
    if flag in _GE_PARTS:
        return _GE_PARTS[flag]
    token = _text(component).upper()
    if token in _PART_TOKENS:
        return _PART_TOKENS[token]
    for token in image_type[2:4]:
        if token in _PART_TOKENS:
            return _PART_TOKENS[token]
    return Part.UNKNOWN


def _units(rwvm_item: Dataset | None) -> str | None:
    code = _first_item(rwvm_item, "MeasurementUnitsCodeSequence")
    if code is None:
        return None
    value = _text(code.get("CodeValue")).lower()
    return value or None


def _slice_spacing(item: Dataset | None) -> float | None:
    if item is None:
        return None
    spacing = _float(item.get("SpacingBetweenSlices"))
    if spacing is None or spacing <= 0:
        spacing = _float(item.get("SliceThickness"))
    return spacing if spacing is not None and spacing > 0 else None


def _ms_to_s(value: Any) -> float | None:
    ms = _float(value)
    return None if ms is None else ms / 1000.0


def _classic_frame(ds: Dataset, image_type: tuple[str, ...], vendor: Vendor) -> FrameInfo:
    philips = ge = None
    if vendor in (Vendor.PHILIPS, Vendor.OTHER):
        philips = _private(ds, 0x2005, PHILIPS_MR_CREATOR, 0x11)
    if vendor in (Vendor.GE, Vendor.OTHER):
        ge = _private(ds, 0x0043, GE_PARM_CREATOR, 0x2F)
    part = _part_from(philips, ge, ds.get("ComplexImageComponent"), image_type)
    rwvm = _first_item(ds, "RealWorldValueMappingSequence")
    part = _field_map_part(part, image_type, _text(ds.get("RescaleType")), _units(rwvm))
    return FrameInfo(
        frame_number=None,
        echo_time_s=_ms_to_s(ds.get("EchoTime")),
        echo_number=_int(ds.get("EchoNumbers")),
        part=part,
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        slice_spacing=_slice_spacing(ds),
        rescale_slope=_float(ds.get("RescaleSlope")),
        rescale_intercept=_float(ds.get("RescaleIntercept")),
        rescale_type=_text(ds.get("RescaleType")) or None,
        units=(
            _units(_first_item(ds, "RealWorldValueMappingSequence")) if part is Part.PHASE else None
        ),
    )


def _philips_frame_part(item: Dataset) -> Any:
    """(2005,1011) inside the Philips per-frame private item (2005,140F), or None."""
    try:
        seq = item.private_block(0x2005, PHILIPS_MR_FRAME_CREATOR)[0x0F].value
    except (KeyError, ValueError):
        return None
    return _private(seq[0], 0x2005, PHILIPS_MR_CREATOR, 0x11) if seq else None


def _enhanced_frames(ds: Dataset) -> tuple[list[FrameInfo], bool]:
    """Per-frame summaries of an Enhanced file, and whether any frame type names a field map."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    frames: list[FrameInfo] = []
    field_map_token = False
    shared_items: dict[str, Dataset | None] = {}

    def group(item: Dataset, keyword: str) -> Dataset | None:
        """The functional group item: per-frame where present, else shared."""
        found = _first_item(item, keyword)
        if found is None:
            if keyword not in shared_items:
                shared_items[keyword] = _first_item(shared, keyword)
            found = shared_items[keyword]
        return found

    for number, item in enumerate(per_frame, start=1):
        frame_type_item = group(item, "MRImageFrameTypeSequence")
        frame_type = _tokens(frame_type_item.get("FrameType")) if frame_type_item else ()
        field_map_token |= bool(_FIELD_MAP_TOKENS.intersection(frame_type))
        component = frame_type_item.get("ComplexImageComponent") if frame_type_item else None
        if _text(component).upper() == "MIXED":
            component = None
        # For Enhanced files the standard attributes are authoritative; the private one is a
        # fallback (the order differs from classic files on purpose).
        part = _part_from(None, None, component, frame_type)
        if part is Part.UNKNOWN:
            part = _part_from(_philips_frame_part(item), None, None, ())
        echo = group(item, "MREchoSequence")
        position = group(item, "PlanePositionSequence")
        orientation = group(item, "PlaneOrientationSequence")
        measures = group(item, "PixelMeasuresSequence")
        pvt = group(item, "PixelValueTransformationSequence")
        rwvm = group(item, "RealWorldValueMappingSequence")
        part = _field_map_part(part, frame_type, _text(pvt.get("RescaleType")) if pvt else None,
                               _units(rwvm))
        frames.append(
            FrameInfo(
                frame_number=number,
                echo_time_s=_ms_to_s(echo.get("EffectiveEchoTime")) if echo else None,
                echo_number=None,
                part=part,
                position=(_floats(position.get("ImagePositionPatient"), 3) if position else None),  # type: ignore[arg-type]
                orientation=(
                    _floats(orientation.get("ImageOrientationPatient"), 6) if orientation else None
                ),  # type: ignore[arg-type]
                pixel_spacing=(_floats(measures.get("PixelSpacing"), 2) if measures else None),  # type: ignore[arg-type]
                slice_spacing=_slice_spacing(measures),
                rescale_slope=_float(pvt.get("RescaleSlope")) if pvt else None,
                rescale_intercept=_float(pvt.get("RescaleIntercept")) if pvt else None,
                rescale_type=(_text(pvt.get("RescaleType")) or None) if pvt else None,
                units=_units(rwvm) if part is Part.PHASE else None,
            )
        )
    return frames, field_map_token


def _field_strength(value: Any) -> float | None:
    b0 = _float(value)
    if b0 is None or b0 <= 0:
        return None
    return b0 / 10000.0 if b0 > 100 else b0  # some old exports write gauss


_T1_NAME = re.compile(
    r"mp[-_ ]?2?[-_ ]?rage|(?<![a-z0-9])(t1w?|t1tfe|tfl|tfe|bravo)(?![a-z0-9])"
)
_OTHER_CONTRAST_NAME = re.compile(
    r"(?<![a-z0-9])(t2\w*|flair|pdw?|pd_\w*|dir|swi|tof|dwi|bold|qsm)(?![a-z0-9])"
)
_T1_SEQUENCE = re.compile(r"^\*?tfl|t1tfe|^tfe|mp-?2?-?rage", re.IGNORECASE)


def _modifier(ds: Dataset) -> Dataset | None:
    """The MR Modifier item of an Enhanced file (shared, else the first frame's)."""
    item = _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"), "MRModifierSequence")
    if item is None:
        frames = ds.get("PerFrameFunctionalGroupsSequence") or []
        item = _first_item(frames[0], "MRModifierSequence") if frames else None
    return item


def _inversion_time_s(ds: Dataset, enhanced: bool) -> float | None:
    ms = _float(ds.get("InversionTime"))
    if ms is None and enhanced:
        item = _modifier(ds)
        times = item.get("InversionTimes") if item is not None else None
        if times is not None and not isinstance(times, str | bytes | float | int):
            times = times[0] if len(times) else None
        ms = _float(times)
    return None if ms is None or ms <= 0 else ms / 1000.0


def t1_evidence(ds: Dataset, enhanced: bool, inversion_time_s: float | None) -> str:
    """Why ``ds`` looks like a T1-weighted image, or "" (the rule is in the module docstring)."""
    names = " ".join(_text(ds.get(k)) for k in ("SeriesDescription", "ProtocolName")).lower()
    named_t1 = _T1_NAME.search(names)
    if _OTHER_CONTRAST_NAME.search(names) and not named_t1:
        return ""
    scanning = set(_tokens(ds.get("ScanningSequence")))
    echo_pulse = _text(ds.get("EchoPulseSequence")).upper()
    recovery = False
    if enhanced:
        item = _modifier(ds)
        recovery = item is not None and _text(item.get("InversionRecovery")).upper() == "YES"
    spin_echo = bool(scanning & {"SE", "EP"}) or echo_pulse in ("SPIN", "BOTH")
    if (inversion_time_s is not None or "IR" in scanning or recovery) and not spin_echo:
        ti = "" if inversion_time_s is None else f", TI {inversion_time_s * 1000:g} ms"
        return f"inversion-prepared gradient echo{ti}"
    for keyword in ("SequenceName", "PulseSequenceName"):
        name = _text(ds.get(keyword))
        if name and _T1_SEQUENCE.search(name):
            return f"{keyword} {name}"
    if named_t1:
        for keyword in ("SeriesDescription", "ProtocolName"):
            value = _text(ds.get(keyword))
            if _T1_NAME.search(value.lower()):
                return f"{keyword} '{value}'"
    return ""


def slice_thickness_mm(ds: Dataset) -> float | None:
    """SliceThickness (mm) of an image: the classic attribute, else an Enhanced file's Pixel
    Measures (shared, else the first frame's); None where absent or not a positive number."""
    value = _float(ds.get("SliceThickness"))
    if value is None:
        measures = _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"),
                               "PixelMeasuresSequence")
        if measures is None:
            frames = ds.get("PerFrameFunctionalGroupsSequence") or []
            measures = _first_item(frames[0], "PixelMeasuresSequence") if frames else None
        value = _float(measures.get("SliceThickness")) if measures is not None else None
    return value if value is not None and value > 0 else None


class HeaderError(ValueError):
    """A DICOM header that cannot be decoded; the message names the element and the fault."""


def summarize(ds_or_path: Dataset | str | os.PathLike[str]) -> InstanceInfo:
    """Summarize one instance. A path is read with ``stop_before_pixels``; a dataset is used as
    it is (its ``filename`` becomes :attr:`InstanceInfo.path` when it has one).

    Raises:
        pydicom.errors.InvalidDicomError: the file is not DICOM.
        HeaderError: its header cannot be decoded (a corrupt element, an unknown VR, …).
    """
    try:
        return _summarize(ds_or_path)
    except (InvalidDicomError, OSError, EOFError):
        raise
    except Exception as exc:  # pydicom reports corrupt elements with many exception types
        raise HeaderError(f"unreadable header: {type(exc).__name__}: {exc}") from exc


def _summarize(ds_or_path: Dataset | str | os.PathLike[str]) -> InstanceInfo:
    if isinstance(ds_or_path, Dataset):
        ds = ds_or_path
        filename = getattr(ds, "filename", None)
        path = str(filename) if isinstance(filename, str | os.PathLike) else None
    else:
        path = str(ds_or_path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    sop_class = _text(ds.get("SOPClassUID"))
    enhanced = sop_class in ENHANCED_SOP_CLASSES
    image_type = _tokens(ds.get("ImageType"))
    manufacturer = _text(ds.get("Manufacturer"))
    vendor = vendor_of(manufacturer)
    sequence_name = _text(ds.get("SequenceName")) or _text(ds.get("PulseSequenceName"))
    if enhanced:
        frames, field_map_token = _enhanced_frames(ds)
    else:
        frames, field_map_token = [_classic_frame(ds, image_type, vendor)], False
    field_map_token |= bool(_FIELD_MAP_TOKENS.intersection(image_type))
    has_phase = any(f.part is Part.PHASE for f in frames)
    names = (_text(ds.get("SequenceName")), _text(ds.get("PulseSequenceName")))
    fm_sequence = any(_SIEMENS_FIELD_MAP_SEQUENCE.match(n) for n in names if n)
    inversion_time_s = _inversion_time_s(ds, enhanced)
    return InstanceInfo(
        path=path,
        sop_class_uid=sop_class,
        sop_instance_uid=_text(ds.get("SOPInstanceUID")),
        study_uid=_text(ds.get("StudyInstanceUID")),
        series_uid=_text(ds.get("SeriesInstanceUID")),
        frame_of_reference_uid=_text(ds.get("FrameOfReferenceUID")),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=_text(ds.get("SeriesDescription")),
        manufacturer=manufacturer,
        vendor=vendor,
        enhanced=enhanced,
        derived=bool(image_type) and image_type[0] == "DERIVED",
        image_type=image_type,
        sequence_name=sequence_name,
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        images_in_acquisition=_int(ds.get("ImagesInAcquisition")),
        field_strength_t=_field_strength(ds.get("MagneticFieldStrength")),
        phase_difference=has_phase and (fm_sequence or field_map_token),
        frames=tuple(frames),
        inversion_time_s=inversion_time_s,
        t1_evidence=t1_evidence(ds, enhanced, inversion_time_s),
        accession_number=_text(ds.get("AccessionNumber")),
        study_date=_text(ds.get("StudyDate")),
        study_time=_text(ds.get("StudyTime")),
        study_description=_text(ds.get("StudyDescription")),
    )


def iter_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Every regular file under ``root`` (or ``root`` itself), in sorted order."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def summarize_files(paths: Iterable[str | os.PathLike[str]]) -> list[InstanceInfo]:
    """Summaries of the DICOM files among ``paths``; non-DICOM files and DICOMDIRs are skipped."""
    infos = []
    for path in paths:
        if Path(path).name.upper() == "DICOMDIR":
            continue
        try:
            infos.append(summarize(path))
        except (InvalidDicomError, EOFError, OSError):
            continue
    return infos
