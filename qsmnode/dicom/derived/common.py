"""What every derived-object builder shares: the build context, the source images, the geometry
and the identity (series numbers, UIDs, equipment) of the objects.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from qsmnode.dicom.derived.uids import DerivedUids
from qsmnode.dicom.geometry import PlaneGeometry, plane_geometry
from qsmnode.dicom.load import LoadedAcquisition, SourceRef

ALGORITHM_NAME = "qsmnode"
"""Algorithm name in every derived object (and the manufacturer of the derived objects)."""

MANUFACTURER = "qsmnode"
MODEL_NAME = "qsmnode QSM/M1"
DEVICE_SERIAL_NUMBER = "qsmnode"
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence
"""CID 7162 has no better family for a classic (non-learned) image-processing pipeline; the
registration step of the M1 analysis is what it is closest to."""

ReadSource = Callable[[str], Dataset]
"""Returns the dataset of a source image from its SOP Instance UID. The header is enough
(``stop_before_pixels``); for a multi-frame image the whole header with its functional groups."""

SERIES_OFFSETS = {
    "qsm-pm": 1,
    "qsm-mr": 2,
    "r2s-pm": 3,
    "r2s-mr": 4,
    "seg": 5,
    "sr": 6,
    "sc": 7,
}
"""Series number of each derived series: 100 × the source series number + this offset (source
series 5 → 501..507; 9900 + offset when the source has no series number)."""


TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Type 2 attributes of the Patient and General Study modules that every derived object
carries, empty when the source has no value (anonymised exports often drop them)."""

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_ENUMERATED = {"PatientSex": frozenset({"M", "F", "O"})}
_FORMATS = {"PatientBirthDate": _DATE, "StudyDate": _DATE, "StudyTime": _TIME}
_PARSERS: dict[str, Callable[[str], object]] = {
    "PatientBirthDate": pydicom.valuerep.DA, "StudyDate": pydicom.valuerep.DA,
    "StudyTime": pydicom.valuerep.TM,
}
"""How highdicom reads these values into a derived object: a value in the right format that is
not a real date or time (month 13, hour 25) raises there, after QSM, unless tidied."""


def _invalid(keyword: str, text: str) -> bool:
    """Whether a Type 2 value (stripped, not empty) cannot go into a derived object as it is:
    not one of the enumerated values, not in the DA/TM format, or not a real date or time."""
    allowed = _ENUMERATED.get(keyword)
    pattern = _FORMATS.get(keyword)
    if (allowed and text not in allowed) or (pattern and not pattern.match(text)):
        return True
    parse = _PARSERS.get(keyword)
    if parse is None:
        return False
    try:
        with warnings.catch_warnings():  # pydicom's warnings quote the value
            warnings.simplefilter("ignore")
            parse(text)
    except (ValueError, OverflowError):
        return True
    return False


COPIED_STUDY_KEYWORDS = (
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
    "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
)
"""Study-level attributes the builders copy beside the Patient module (group 0010), whose
values are checked against their VR (:func:`_malformed`)."""
_UNCHECKED_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "UR"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROLS = {"LT": "\t\n\f\r", "ST": "\t\n\f\r", "UT": "\t\n\f\r"}
"""Control characters a value of these VRs may hold; no other VR may hold any but ESC, and
ESC only with an ISO 2022 character set (PS3.5 6.1.2)."""


def _bad_controls(ds: Dataset, vr: str, text: str) -> bool:
    """Whether ``text`` holds a control character its VR does not allow (a bell, tab or
    newline in a person name, a terminal escape in a description): pydicom's VR rules let
    them through, dciodvfy does not, and a log line would carry them."""
    allowed = _TEXT_CONTROLS.get(vr, "")
    if "2022" in str(ds.get("SpecificCharacterSet", "")):
        allowed += "\x1b"
    return any(c not in allowed for c in _CONTROL.findall(text))


def _checked_tags(ds: Dataset) -> list[int]:
    """The tags of the source's patient and study values that the derived objects copy."""
    study = {pydicom.datadict.tag_for_keyword(k) for k in COPIED_STUDY_KEYWORDS}
    return [int(tag) for tag in ds.keys() if tag.group == 0x0010 or int(tag) in study]


def _malformed(ds: Dataset, tag: int) -> bool:
    """Whether a value of the source is not valid for its VR (length, characters, format; a
    person name of more than 3 groups or 5 components; a control character its VR does not
    allow), read as it is stored: a raw value pydicom would refuse to convert counts as
    malformed."""
    raw = ds.get_item(tag)
    vr = raw.VR or pydicom.datadict.dictionary_VR(tag)
    if vr in _UNCHECKED_VRS or raw.value is None:
        return False
    value = raw.value
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("latin-1", "replace").rstrip("\x00 ")
    elif isinstance(value, list | tuple | pydicom.multival.MultiValue):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    if not text.strip():
        return False
    if _bad_controls(ds, vr, text):
        return True
    for item in text.split("\\"):
        try:
            with warnings.catch_warnings():  # pydicom's warnings quote the value
                warnings.simplefilter("ignore")
                pydicom.valuerep.validate_value(vr, item, pydicom.config.RAISE)
        except (ValueError, TypeError):
            return True
        if vr == "PN" and (item.count("=") > 2
                           or any(group.count("^") > 4 for group in item.split("="))):
            return True
    return False


def _code_item_ok(item: Dataset) -> bool:
    has_value = any(item.get(k) for k in ("CodeValue", "LongCodeValue", "URNCodeValue"))
    needs_scheme = bool(item.get("CodeValue")) or bool(item.get("LongCodeValue"))
    return (has_value and bool(item.get("CodeMeaning"))
            and (bool(item.get("CodingSchemeDesignator")) or not needs_scheme))


_SHAREABLE_GROUPS = ("PixelMeasuresSequence", "PlaneOrientationSequence")
"""Functional groups highdicom reads from an Enhanced source's shared groups only (Philips
writes them per frame)."""


def _per_frame_only(ds: Dataset) -> list[str]:
    """The :data:`_SHAREABLE_GROUPS` an Enhanced header has in every frame, with one value,
    but not in its shared functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames or shared is None or len(shared) != 1:
        return []
    out = []
    for keyword in _SHAREABLE_GROUPS:
        if keyword in shared[0] or any(keyword not in f or len(f[keyword].value) != 1
                                       for f in frames):
            continue
        first = frames[0][keyword].value[0]
        if all(f[keyword].value[0] == first for f in frames):
            out.append(keyword)
    return out


def source_fixes(ds: Dataset) -> list[str]:
    """What :func:`tidy_source` changes in a source header, one phrase each (empty: nothing).
    Names attributes only, never their values (they may be patient data)."""
    fixes = []
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            fixes.append(f"{keyword} absent (left empty)")
            continue
        text = str(ds[keyword].value or "").strip()
        if text and _invalid(keyword, text):
            fixes.append(f"{keyword} not a valid value (left empty)")
    for tag in _checked_tags(ds):
        keyword = pydicom.datadict.keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if keyword in TYPE2_PATIENT_STUDY:
            if _malformed(ds, tag) and f"{keyword} not a valid value (left empty)" not in fixes:
                fixes.append(f"{keyword} not a valid value (left empty)")
        elif _malformed(ds, tag):
            fixes.append(f"{keyword} not a valid value for its VR (left out)")
    for elem in ds:
        if elem.VR != "SQ":
            continue
        if len(elem.value) == 0:
            fixes.append(f"{elem.keyword or elem.tag} has no item (left out)")
        elif elem.keyword.endswith("CodeSequence") and not all(
            _code_item_ok(item) for item in elem.value
        ):
            fixes.append(f"{elem.keyword} has an incomplete code item (left out)")
    fixes += [f"{k} given per frame with one value (shared)" for k in _per_frame_only(ds)]
    return fixes


def tidy_source(ds: Dataset) -> Dataset:
    """The source header as the derived objects copy from it: a Type 2 patient or study
    attribute that is absent or not a valid value (for a date or time: not in the DICOM format,
    or not a real date or time; for any: not valid for its VR) becomes empty, another patient
    or study value not valid for its VR (a PatientAge of "45", a PatientSize of "1,75", a
    person name of six components) is left out, and a sequence with no item,
    or a code sequence with an incomplete item, is left out (an empty Type 3 sequence copied
    into a derived object makes it invalid). A Pixel Measures or Plane Orientation functional
    group that an Enhanced source gives in every frame with one value (Philips) is made shared,
    where highdicom looks for it. The source is returned as it is when nothing needs a change,
    else a copy."""
    if not source_fixes(ds):
        return ds
    out = copy.deepcopy(ds)
    for tag in _checked_tags(out):  # before anything converts a raw value that cannot be
        if _malformed(out, tag):
            if pydicom.datadict.keyword_for_tag(tag) in TYPE2_PATIENT_STUDY:
                out[tag] = pydicom.DataElement(tag, pydicom.datadict.dictionary_VR(tag), "")
            else:
                del out[tag]
    for keyword in TYPE2_PATIENT_STUDY:
        text = str(out[keyword].value or "").strip() if keyword in out else ""
        if keyword not in out or (text and _invalid(keyword, text)):
            setattr(out, keyword, "")
    for elem in list(out):
        if elem.VR == "SQ" and (
            len(elem.value) == 0
            or (elem.keyword.endswith("CodeSequence")
                and not all(_code_item_ok(item) for item in elem.value))
        ):
            del out[elem.tag]
    for keyword in _per_frame_only(out):
        frames = out.PerFrameFunctionalGroupsSequence
        setattr(out.SharedFunctionalGroupsSequence[0], keyword, frames[0][keyword].value)
        for frame in frames:
            delattr(frame, keyword)
    return out


class SourceImages:
    """The source images of an acquisition, read once each through a :data:`ReadSource`.

    Echo 1 of the magnitude is *the* source of every derived object; the other echoes (and the
    phase, for QSM) are further sources. Every header is given as :func:`tidy_source` makes it,
    so that missing or malformed optional data in the source never makes a derived object fail
    to build or fail validation.
    """

    def __init__(self, loaded: LoadedAcquisition, read_source: ReadSource) -> None:
        self.loaded = loaded
        self._read = read_source
        self._cache: dict[str, Dataset] = {}

    def dataset(self, sop_instance_uid: str) -> Dataset:
        ds = self._cache.get(sop_instance_uid)
        if ds is None:
            ds = self._read(sop_instance_uid)
            if ds.SOPInstanceUID != sop_instance_uid:
                raise ValueError(
                    f"read_source({sop_instance_uid}) returned instance {ds.SOPInstanceUID}"
                )
            ds = tidy_source(ds)
            self._cache[sop_instance_uid] = ds
        return ds

    def slice_source(self, k: int) -> SourceRef:
        """The echo-1 magnitude source of slice ``k``."""
        return self.loaded.magnitude_sources[k][0]

    def echo1_uids(self) -> list[str]:
        """SOP Instance UIDs of the echo-1 magnitude images, once each, in slice order."""
        return _unique(row[0].sop_instance_uid for row in self.loaded.magnitude_sources)

    def echo1(self) -> list[Dataset]:
        """The echo-1 magnitude datasets in slice order (one multi-frame dataset for Enhanced)."""
        return [self.dataset(uid) for uid in self.echo1_uids()]

    def further_uids(self, include_phase: bool) -> list[str]:
        """SOP Instance UIDs of the other magnitude echoes (and the phase), minus echo 1."""
        loaded = self.loaded
        refs = [ref for row in loaded.magnitude_sources for ref in row[1:]]
        if include_phase and loaded.phase_sources is not None:
            refs += [ref for row in loaded.phase_sources for ref in row]
        echo1 = set(self.echo1_uids())
        return [uid for uid in _unique(r.sop_instance_uid for r in refs) if uid not in echo1]

    def further(self, include_phase: bool) -> list[Dataset]:
        return [self.dataset(uid) for uid in self.further_uids(include_phase)]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass
class BuildContext:
    """Everything one run of the builders shares."""

    loaded: LoadedAcquisition
    sources: SourceImages
    uids: DerivedUids
    algorithm_version: str
    created: dt.datetime
    geometry: PlaneGeometry = field(init=False)

    def __post_init__(self) -> None:
        self.geometry = plane_geometry(self.loaded.gre.affine, self.loaded.gre.shape[2])

    @classmethod
    def create(
        cls,
        loaded: LoadedAcquisition,
        read_source: ReadSource,
        algorithm_version: str,
        created: dt.datetime | None = None,
    ) -> BuildContext:
        uids = DerivedUids.for_acquisition(loaded, ALGORITHM_NAME, algorithm_version)
        return cls(
            loaded=loaded,
            sources=SourceImages(loaded, read_source),
            uids=uids,
            algorithm_version=str(algorithm_version),
            created=created or dt.datetime.now(),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.loaded.gre.shape

    def series_number(self, role: str) -> int:
        numbers = [n for n in self.loaded.series_numbers if n is not None]
        base = 100 * min(numbers) if numbers else 9900
        return base + SERIES_OFFSETS[role]

    def series_uid(self, role: str) -> str:
        return self.uids.uid(f"{role}/series")

    def instance_uid(self, role: str, index: int = 0) -> str:
        return self.uids.uid(f"{role}/instance", index)

    @property
    def software_versions(self) -> str:
        return f"{ALGORITHM_NAME} {self.algorithm_version}"

    def highdicom_kwargs(self, role: str, index: int = 0) -> dict[str, Any]:
        """Identity keywords for a highdicom SOP class constructor (one instance per series,
        unless ``index`` says otherwise)."""
        return {
            "series_instance_uid": self.series_uid(role),
            "series_number": self.series_number(role),
            "sop_instance_uid": self.instance_uid(role, index),
            "instance_number": index + 1,
            "manufacturer": MANUFACTURER,
        }

    def dates(self) -> dict[str, Any]:
        """Series and content date/time (the build time) for highdicom constructors."""
        return {
            "series_date": self.created.date(),
            "series_time": self.created.time(),
            "content_date": self.created.date(),
            "content_time": self.created.time(),
        }

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME,
            family=ALGORITHM_FAMILY,
            version=self.algorithm_version,
            source=MANUFACTURER,
        )

    @property
    def body_part(self) -> str:
        return str(self.loaded.patient_study.get("BodyPartExamined") or "HEAD")

    # --- geometry: the one writer of every derived object's plane strings -----------------
    #
    # Cornerstone3D (OHIF) overlays a Parametric Map or SEG on its referenced series only when
    # their ImageOrientationPatient values are the same *strings*; so every derived object
    # writes its plane geometry through these methods (DS text by :func:`ds_text`).

    def orientation_text(self) -> list[str]:
        """ImageOrientationPatient of every derived object."""
        return [ds_text(v) for v in self.geometry.orientation]

    def position_text(self, k: int) -> list[str]:
        """ImagePositionPatient of slice ``k``."""
        return [ds_text(v) for v in self.geometry.positions[k]]

    def pixel_spacing_text(self) -> list[str]:
        return [ds_text(v) for v in self.geometry.pixel_spacing]

    def slice_spacing_text(self) -> str:
        """SliceThickness and SpacingBetweenSlices."""
        return ds_text(self.geometry.slice_spacing)

    def slice_of_position(self, position: Iterable[float], tol_mm: float = 1e-3) -> int:
        """The slice ``k`` whose ImagePositionPatient is ``position`` (within ``tol_mm``)."""
        p = np.asarray([float(v) for v in position], dtype=np.float64)
        distances = np.linalg.norm(self.geometry.positions - p, axis=1)
        k = int(np.argmin(distances))
        if distances[k] > tol_mm:
            raise ValueError(f"no slice at {p.tolist()} (nearest {distances[k]:.3g} mm away)")
        return k

    def write_frame_geometry(self, ds: Dataset) -> None:
        """Rewrite the plane geometry of a multi-frame object built by highdicom (Parametric
        Map, SEG) with the strings of :meth:`orientation_text` etc., frame by frame, so that
        they equal those of the derived MR images character for character."""
        shared = ds.SharedFunctionalGroupsSequence[0]
        for item in shared.get("PlaneOrientationSequence", []):
            item.ImageOrientationPatient = self.orientation_text()
        for item in shared.get("PixelMeasuresSequence", []):
            item.PixelSpacing = self.pixel_spacing_text()
            item.SliceThickness = self.slice_spacing_text()
            if "SpacingBetweenSlices" in item:
                item.SpacingBetweenSlices = self.slice_spacing_text()
        for frame in ds.PerFrameFunctionalGroupsSequence:
            for item in frame.get("PlanePositionSequence", []):
                k = self.slice_of_position(item.ImagePositionPatient)
                item.ImagePositionPatient = self.position_text(k)

    # --- geometry for highdicom ----------------------------------------------------------

    def plane_positions(self) -> list[hd.PlanePositionSequence]:
        return [
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, _rounded(p))
            for p in self.geometry.positions
        ]

    def plane_orientation(self) -> hd.PlaneOrientationSequence:
        return hd.PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT, _rounded(self.geometry.orientation)
        )

    def pixel_measures(self) -> hd.PixelMeasuresSequence:
        g = self.geometry
        return hd.PixelMeasuresSequence(
            pixel_spacing=_rounded(g.pixel_spacing),
            slice_thickness=float(f"{g.slice_spacing:.6g}"),
            spacing_between_slices=float(f"{g.slice_spacing:.6g}"),
        )


def ds_text(value: float) -> str:
    """The DS text of a geometry value: the shortest of 10 down to 6 significant digits that
    fits 16 characters. Every derived object formats its plane geometry with this."""
    for digits in (10, 9, 8, 7, 6):
        s = f"{float(value):.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{float(value):.6g}"


def _rounded(values: Iterable[float] | NDArray[np.floating]) -> list[float]:
    """Floats that fit a DS (16 characters) without losing more than ~1e-6 mm."""
    return [float(f"{float(v):.10g}") for v in values]


def set_dimension_organization_uid(ds: Dataset, uid: str) -> None:
    """Replace highdicom's random Dimension Organization UID with a deterministic one."""
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in ds.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = uid


def source_reader(paths: Iterable[str | os.PathLike[str]]) -> ReadSource:
    """A :data:`ReadSource` over files: each header is read once (without pixel data) and
    indexed by SOP Instance UID. Unreadable files are skipped."""
    index: dict[str, Dataset] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        uid = ds.get("SOPInstanceUID")
        if uid:
            index[str(uid)] = ds

    def read(sop_instance_uid: str) -> Dataset:
        try:
            return index[sop_instance_uid]
        except KeyError:
            raise KeyError(f"source instance {sop_instance_uid} not among the files") from None

    return read
