"""The simulated scanner's DICOM writer: what real Siemens and Philips scanners send.

``write_dicom(gre, out_dir, style)`` writes one multi-echo GRE acquisition the way a vendor does,
so that the receiver, the grouping and the loader are tested against the pitfalls of real files
(DOMAIN.md, "Vendor DICOM pitfalls"). Styles:

``siemens`` (syngo E11-like)
    Classic MR Image Storage, one file per slice per echo. Magnitude in series ``n``, phase in
    series ``n + 1``, same SeriesDescription. ImageType ``ORIGINAL\\PRIMARY\\M\\ND`` or
    ``...\\P\\ND``. Instance numbers run slice-fastest, echo by echo.
``siemens-xa`` (XA "interoperability" export)
    As ``siemens`` but each echo is its own series and EchoNumbers is absent: magnitude echo
    ``e`` in series ``n + e``, phase echo ``e`` in series ``n + E + e`` (``E`` echoes). Group by
    EchoTime. Manufacturer "Siemens Healthineers".
``philips`` (R5-like classic)
    One series holding magnitude and phase of every echo. ImageType
    ``ORIGINAL\\PRIMARY\\M_FFE\\M\\FFE`` / ``ORIGINAL\\PRIMARY\\PHASE MAP\\P\\FFE`` and private
    (2005,1011) ``M``/``P`` (creator "Philips MR Imaging DD 001", which owns block 10 of group
    2005). Instances: all magnitude frames (slice-major, echo fastest), then all phase frames.
``enhanced`` (Philips-like Enhanced MR)
    One Enhanced MR Image Storage file with every frame (magnitude then phase, slice, echo
    fastest) like the real Philips sample. Per frame: FrameType ``...\\M``/``...\\P``,
    ComplexImageComponent MAGNITUDE/PHASE, EffectiveEchoTime, rescale and plane position.

``write_t1w_dicom(image, affine, out_dir, study)`` adds a same-session 3D MPRAGE-like T1w
(Siemens-like classic files, single-echo magnitude, ``GR\\IR`` with an InversionTime) to the
study, for the T1w route of the M1 analysis.

Pixel encodings (all uint16, 12 bits stored):

- Magnitude: ``stored = round(magnitude * s)`` with ``s = 4095 / max(magnitude)`` over all
  echoes (:func:`magnitude_scale`), so the echo decay is kept. Philips and enhanced record
  RescaleSlope ``1/s`` (values come back in the input units); Siemens writes no rescale tags,
  like real E11 magnitude, so its values are ``magnitude * s`` in arbitrary units.
- Siemens phase: ``stored`` 0..4095, RescaleSlope 2, RescaleIntercept -4096;
  ``radians = (2 * stored - 4096) * π / 4096``.
- Philips phase: ``stored`` 0..4095, RescaleSlope 6284/4095 (1.53455…), RescaleIntercept -3142,
  RescaleType ``mrad``; ``radians = (stored * slope - 3142) / 1000``.

Geometry follows :mod:`qsmnode.dicom.geometry` (``i`` = column, ``j`` = row, ``k`` = slice).
UIDs are deterministic: study, frame of reference, series and instances derive from
``SimStudyInfo.seed`` (UUID-5 based ``2.25.`` UIDs), so the same seed writes the same UIDs.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from qsmnode.acquisition import GAMMA_BAR_HZ_PER_T, MultiEchoGRE
from qsmnode.dicom.geometry import PlaneGeometry, frame_stack, plane_geometry

STYLES = ("siemens", "siemens-xa", "philips", "enhanced")

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

STORED_MAX = 4095
"""Largest stored value (12 bits stored in 16 allocated)."""
SIEMENS_PHASE_SLOPE = 2.0
SIEMENS_PHASE_INTERCEPT = -4096.0
PHILIPS_PHASE_SLOPE_TEXT = "1.53455433455433"  # 6284 / 4095, as the real files write it
PHILIPS_PHASE_SLOPE = float(PHILIPS_PHASE_SLOPE_TEXT)
PHILIPS_PHASE_INTERCEPT = -3142.0
PHILIPS_PRIVATE_CREATOR = "Philips MR Imaging DD 001"
"""Owner of block 0x10 of group 2005, which holds (2005,1011) ImageTypeMR ("M"/"P")."""
PHILIPS_IMAGING_CREATOR = "Philips Imaging DD 001"

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://qsmnode/sim/vendor_dicom")
_IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'implementation').int}"
_IMPLEMENTATION_VERSION = "QSMNODE_SIM_1"


def sim_uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID (UUID version 5) from any parts (seed, role, numbers)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class SimStudyInfo:
    """Patient, study and protocol data of a simulated exam. All of it is clearly synthetic.

    One seed is one study: the Study and Frame of Reference UIDs depend only on ``seed``;
    series and instance UIDs add the style, series number and instance number.
    """

    seed: int | str = 1
    patient_name: str = "SIM^PHANTOM"
    patient_id: str = "QSMNODE-SIM-0001"
    patient_birth_date: str = ""
    patient_sex: str = "O"
    study_id: str = "SIM1"
    accession_number: str = ""
    study_description: str = "QSMNODE simulated 7T QSM"
    study_date: str = "20240101"
    study_time: str = "090000"
    series_number: int = 5
    series_description: str = "gre_qsm_7T"
    protocol_name: str = "gre_qsm_7T"
    repetition_time_ms: float | None = None
    """None: last echo time + 8 ms."""
    flip_angle_deg: float = 15.0
    pixel_bandwidth_hz: float = 260.0
    institution_name: str = "QSMNODE SIMULATOR"
    station_name: str = "SIM7T"
    slice_thickness_mm: float | None = None
    """None: the slice spacing (contiguous slices, as a 3-D slab). Thinner than the spacing:
    slices with gaps, as a 2-D protocol writes them (with ``acquisition_type`` "2D")."""
    acquisition_type: str = "3D"
    """MRAcquisitionType: "3D", or "2D" for a 2-D multi-slice protocol."""

    @property
    def study_instance_uid(self) -> str:
        return sim_uid(self.seed, "study")

    @property
    def frame_of_reference_uid(self) -> str:
        return sim_uid(self.seed, "frame-of-reference")

    def series_instance_uid(self, style: str, series_number: int) -> str:
        return sim_uid(self.seed, "series", style, series_number)

    def sop_instance_uid(self, style: str, series_number: int, instance_number: int) -> str:
        return sim_uid(self.seed, "instance", style, series_number, instance_number)


@dataclass(frozen=True)
class _Vendor:
    manufacturer: str
    model: str
    software: str
    serial: str


_VENDORS = {
    "siemens": _Vendor("SIEMENS", "Investigational_Device_7T", "syngo MR E11", "79001"),
    "siemens-xa": _Vendor("Siemens Healthineers", "MAGNETOM Terra.X", "syngo MR XA60", "79002"),
    "philips": _Vendor("Philips Medical Systems", "Achieva", "5.7.1\\5.7.1.1", "79003"),
    "enhanced": _Vendor("Philips Medical Systems", "Achieva", "5.7.1\\5.7.1.1", "79003"),
}


# ---------------------------------------------------------------------------------------------
# pixel encodings


def magnitude_scale(gre: MultiEchoGRE) -> float:
    """Stored units per magnitude unit: ``4095 / max(magnitude)`` over all echoes (1 if zero)."""
    peak = float(np.max(gre.magnitude))
    return STORED_MAX / peak if peak > 0 and math.isfinite(peak) else 1.0


def encode_magnitude(magnitude: NDArray[np.floating], scale: float) -> NDArray[np.uint16]:
    """``round(magnitude * scale)`` clipped to 0..4095, as little-endian uint16."""
    stored = np.rint(np.asarray(magnitude, dtype=np.float64) * scale)
    return np.clip(stored, 0, STORED_MAX).astype("<u2")


def encode_phase_siemens(phase: NDArray[np.floating]) -> NDArray[np.uint16]:
    """Radians in [-π, π) to Siemens stored values: ``(2·stored - 4096)·π/4096 = phase``."""
    stored = np.rint((np.asarray(phase, dtype=np.float64) + np.pi) * (2048.0 / np.pi))
    return (stored.astype(np.int64) & 4095).astype("<u2")  # +π rounds to 4096 = -π


def encode_phase_philips(phase: NDArray[np.floating]) -> NDArray[np.uint16]:
    """Radians to Philips stored values: ``stored·1.53455 - 3142`` mrad = phase."""
    mrad = np.asarray(phase, dtype=np.float64) * 1000.0
    stored = np.rint((mrad - PHILIPS_PHASE_INTERCEPT) / PHILIPS_PHASE_SLOPE)
    return np.clip(stored, 0, STORED_MAX).astype("<u2")


# ---------------------------------------------------------------------------------------------
# small dataset helpers


def _ds(x: float) -> str:
    """A float as a valid DS string (at most 16 characters; integers without ".0")."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return format_number_as_ds(x)


def _ds_list(values: Iterable[float]) -> list[str]:
    return [_ds(v) for v in values]


_VR_CACHE: dict[str, tuple[int, str]] = {}


def _tag_vr(keyword: str) -> tuple[int, str]:
    try:
        return _VR_CACHE[keyword]
    except KeyError:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(keyword) from None
        _VR_CACHE[keyword] = (tag, dictionary_VR(tag))
        return _VR_CACHE[keyword]


def _put(ds: Dataset, keyword: str, value: Any) -> None:
    """Set a standard attribute with a new element (never mutates a shared one)."""
    tag, vr = _tag_vr(keyword)
    ds[tag] = DataElement(tag, vr, value)


def _item(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        _put(item, keyword, value)
    return item


def _seq(*items: Dataset) -> Sequence:
    return Sequence(list(items))


def _clone(base: Dataset) -> Dataset:
    """A new dataset sharing the (never mutated) elements of ``base``."""
    return Dataset(dict(base.items()))


def _save(ds: Dataset, path: Path, sop_class: str, sop_instance: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


_ENCODINGS = convert_encodings("ISO_IR 100")


def _encode_element(elem: DataElement) -> bytes:
    """One element in explicit VR little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem, _ENCODINGS)
    return fp.getvalue()


def _encode_dataset(ds: Dataset) -> dict[int, bytes]:
    """Every element of ``ds`` encoded on its own, by tag, to be reused by many files."""
    return {int(elem.tag): _encode_element(elem) for elem in ds}


def _write_encoded(path: Path, elements: dict[int, bytes], sop_class: str, sop_uid: str) -> None:
    """Write a Part 10 file from pre-encoded elements (the classic writer's fast path: the
    elements shared by a series are encoded once, not once per file)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    body = b"".join(elements[tag] for tag in sorted(elements))
    with open(path, "wb") as f:
        f.write(fp.getvalue())
        f.write(body)


def _ms(seconds: float) -> str:
    return _ds(round(seconds * 1000.0, 6))


# ---------------------------------------------------------------------------------------------
# attributes shared by every style


def _tr_ms(gre: MultiEchoGRE, study: SimStudyInfo) -> float:
    if study.repetition_time_ms is not None:
        return study.repetition_time_ms
    return round(max(gre.echo_times_s) * 1000.0 + 8.0, 3)


def _common(gre: MultiEchoGRE, study: SimStudyInfo, style: str, series_number: int) -> Dataset:
    """Patient, study, series, frame of reference, equipment and image pixel attributes."""
    vendor = _VENDORS[style]
    ni, nj, _ = gre.shape
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = study.study_time
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = study.study_time
    ds.AcquisitionTime = study.study_time
    ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = vendor.manufacturer
    ds.InstitutionName = study.institution_name
    ds.ReferringPhysicianName = ""
    ds.StationName = study.station_name
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = study.series_description
    ds.ManufacturerModelName = vendor.model
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.BodyPartExamined = "HEAD"
    ds.MRAcquisitionType = study.acquisition_type
    ds.MagneticFieldStrength = _ds(gre.field_strength_t)
    ds.DeviceSerialNumber = vendor.serial
    ds.SoftwareVersions = vendor.software.split("\\")
    ds.ProtocolName = study.protocol_name
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = study.series_instance_uid(style, series_number)
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = nj
    ds.Columns = ni
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def _classic_mr(gre: MultiEchoGRE, study: SimStudyInfo, geo: PlaneGeometry, philips: bool) -> dict:
    """MR Image module and Image Plane attributes of classic single-frame files."""
    ni, nj, _ = gre.shape
    attrs: dict[str, Any] = {
        "ScanningSequence": "GR",
        "SequenceVariant": ["SP"] if philips else ["SP", "OSP"],
        "ScanOptions": "FC" if philips else "",
        "SequenceName": "" if philips else f"*fl{study.acquisition_type.lower()}{gre.n_echoes}",
        "AngioFlag": "N",
        "SliceThickness": _ds(study.slice_thickness_mm or geo.slice_spacing),
        "RepetitionTime": _ds(_tr_ms(gre, study)),
        "NumberOfAverages": "1",
        "ImagingFrequency": _ds(GAMMA_BAR_HZ_PER_T * gre.field_strength_t / 1e6),
        "ImagedNucleus": "1H",
        "SpacingBetweenSlices": _ds(geo.slice_spacing),
        "NumberOfPhaseEncodingSteps": nj if philips else ni,
        "EchoTrainLength": gre.n_echoes,
        "PercentSampling": "100",
        "PercentPhaseFieldOfView": "100",
        "PixelBandwidth": _ds(study.pixel_bandwidth_hz),
        "AcquisitionMatrix": [ni, 0, 0, nj] if philips else [0, nj, ni, 0],
        "InPlanePhaseEncodingDirection": "COL" if philips else "ROW",
        "FlipAngle": _ds(study.flip_angle_deg),
        "PixelSpacing": _ds_list(geo.pixel_spacing),
        "ImageOrientationPatient": _ds_list(geo.orientation),
    }
    return attrs


# ---------------------------------------------------------------------------------------------
# classic (single-frame) writers


@dataclass
class _Part:
    """Magnitude or phase: stored pixels per echo (``[k, Rows, Columns]``) and its attributes."""

    name: str  # "M" or "P"
    frames: list[NDArray[np.uint16]]
    attrs: dict[str, Any]


def _rwvm(slope: float, intercept: float, unit: str, meaning: str, explanation: str) -> Dataset:
    return _item(
        LUTExplanation=explanation,
        MeasurementUnitsCodeSequence=_seq(
            _item(
                CodeValue=unit,
                CodingSchemeDesignator="UCUM",
                CodeMeaning=meaning,
            )
        ),
        LUTLabel="QSMNODE_SIM",
        RealWorldValueLastValueMapped=STORED_MAX,
        RealWorldValueFirstValueMapped=0,
        RealWorldValueIntercept=float(intercept),
        RealWorldValueSlope=float(slope),
    )


def _frames(
    volume: NDArray[np.floating], encode: Callable[[NDArray], NDArray[np.uint16]]
) -> list[NDArray[np.uint16]]:
    """Encode each echo of an ``[i, j, k, e]`` volume into a contiguous ``[k, Rows, Columns]``."""
    return [frame_stack(encode(volume[..., e])) for e in range(volume.shape[3])]


def _parts(gre: MultiEchoGRE, style: str) -> list[_Part]:
    scale = magnitude_scale(gre)
    mag = _frames(gre.magnitude, lambda m: encode_magnitude(m, scale))
    if style in ("siemens", "siemens-xa"):
        return [
            _Part(
                "M",
                mag,
                {
                    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
                    "WindowCenter": _ds(STORED_MAX / 2),
                    "WindowWidth": _ds(STORED_MAX),
                },
            ),
            _Part(
                "P",
                _frames(gre.phase, encode_phase_siemens),
                {
                    "ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"],
                    "RescaleIntercept": _ds(SIEMENS_PHASE_INTERCEPT),
                    "RescaleSlope": _ds(SIEMENS_PHASE_SLOPE),
                    "RescaleType": "US",
                    "WindowCenter": "0",
                    "WindowWidth": "8192",
                },
            ),
        ]
    slope = 1.0 / scale
    return [
        _Part(
            "M",
            mag,
            {
                "ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
                "RescaleIntercept": "0",
                "RescaleSlope": _ds(slope),
                "RescaleType": "normalized",
                "WindowCenter": _ds(STORED_MAX * slope / 2),
                "WindowWidth": _ds(STORED_MAX * slope),
                "RealWorldValueMappingSequence": _seq(
                    _rwvm(slope, 0.0, "1", "no units", "Real World Value Mapping for normalized")
                ),
            },
        ),
        _Part(
            "P",
            _frames(gre.phase, encode_phase_philips),
            {
                "ImageType": ["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"],
                "RescaleIntercept": _ds(PHILIPS_PHASE_INTERCEPT),
                "RescaleSlope": PHILIPS_PHASE_SLOPE_TEXT,
                "RescaleType": "mrad",
                "WindowCenter": "0",
                "WindowWidth": "6284",
                "RealWorldValueMappingSequence": _seq(
                    _rwvm(
                        PHILIPS_PHASE_SLOPE,
                        PHILIPS_PHASE_INTERCEPT,
                        "mrad",
                        "milliradian",
                        "Real World Value Mapping for mrad",
                    )
                ),
            },
        ),
    ]


@dataclass
class _Series:
    number: int
    folder: str
    parts: list[_Part]
    echoes: list[int]
    echo_numbers: bool


def _instance_order(series: _Series, nk: int, style: str) -> list[tuple[_Part, int, int]]:
    """(part, echo, slice) of each instance, in instance-number order."""
    if style == "philips":  # parts, then slices, echo fastest
        return [(p, e, k) for p in series.parts for k in range(nk) for e in series.echoes]
    return [(p, e, k) for p in series.parts for e in series.echoes for k in range(nk)]


def _folder_name(study: SimStudyInfo) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in study.series_description)


def _series_layout(gre: MultiEchoGRE, study: SimStudyInfo, style: str) -> list[_Series]:
    n = study.series_number
    echoes = list(range(gre.n_echoes))
    mag, ph = _parts(gre, style)
    safe = _folder_name(study)
    if style == "siemens":
        return [
            _Series(n, f"{n:04d}_{safe}_M", [mag], echoes, True),
            _Series(n + 1, f"{n + 1:04d}_{safe}_P", [ph], echoes, True),
        ]
    if style == "siemens-xa":
        ne = gre.n_echoes
        return [
            _Series(n + e, f"{n + e:04d}_{safe}_M_e{e + 1}", [mag], [e], False) for e in echoes
        ] + [
            _Series(n + ne + e, f"{n + ne + e:04d}_{safe}_P_e{e + 1}", [ph], [e], False)
            for e in echoes
        ]
    return [_Series(n, f"{n:04d}_{safe}", [mag, ph], echoes, True)]


def _write_classic(gre: MultiEchoGRE, out_dir: Path, style: str, study: SimStudyInfo) -> list[Path]:
    philips = style == "philips"
    _, _, nk = gre.shape
    geo = plane_geometry(gre.affine, nk)
    normal = geo.normal
    slice_locations = [_ds(float(p @ normal)) for p in geo.positions]
    positions = [_ds_list(p) for p in geo.positions]
    echo_times = [_ms(te) for te in gre.echo_times_s]
    mr_attrs = _classic_mr(gre, study, geo, philips)
    written: list[Path] = []
    for series in _series_layout(gre, study, style):
        base = _common(gre, study, style, series.number)
        base.SOPClassUID = MR_IMAGE_STORAGE
        for keyword, value in mr_attrs.items():
            _put(base, keyword, value)
        if philips:
            imaging = base.private_block(0x2001, PHILIPS_IMAGING_CREATOR, create=True)
            imaging.add_new(0x14, "SL", gre.n_echoes)  # number of echoes
            imaging.add_new(0x18, "SL", nk)  # number of slices
        part_bytes = {}
        for part in series.parts:
            pb = _clone(base)
            for keyword, value in part.attrs.items():
                _put(pb, keyword, value)
            if philips:
                pb.private_block(0x2005, PHILIPS_PRIVATE_CREATOR, create=True).add_new(
                    0x11, "CS", part.name
                )
            part_bytes[part.name] = _encode_dataset(pb)
        folder = out_dir / series.folder
        folder.mkdir(parents=True, exist_ok=True)
        order = _instance_order(series, nk, style)
        for number, (part, e, k) in enumerate(order, start=1):
            uid = study.sop_instance_uid(style, series.number, number)
            varying = [
                ("SOPInstanceUID", uid),
                ("InstanceNumber", number),
                ("EchoTime", echo_times[e]),
                ("ImagePositionPatient", positions[k]),
                ("SliceLocation", slice_locations[k]),
            ]
            if series.echo_numbers:
                varying.append(("EchoNumbers", str(e + 1)))
            elements = dict(part_bytes[part.name])
            for keyword, value in varying:
                tag, vr = _tag_vr(keyword)
                elements[tag] = _encode_element(DataElement(tag, vr, value))
            if philips:
                elements[0x2001100A] = _encode_element(DataElement(0x2001100A, "IS", str(k + 1)))
            pixels = part.frames[e][k].tobytes()
            elements[0x7FE00010] = _encode_element(DataElement(0x7FE00010, "OW", pixels))
            path = folder / f"{number:05d}.dcm"
            _write_encoded(path, elements, MR_IMAGE_STORAGE, uid)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# enhanced (multi-frame) writer


def _write_enhanced(
    gre: MultiEchoGRE, out_dir: Path, style: str, study: SimStudyInfo
) -> list[Path]:
    ni, nj, nk = gre.shape
    ne = gre.n_echoes
    geo = plane_geometry(gre.affine, nk)
    n = study.series_number
    ds = _common(gre, study, style, n)
    uid = study.sop_instance_uid(style, n, 1)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    ds.InstanceNumber = 1
    flavor = "T2_STAR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", flavor, "MIXED"]
    del ds.AcquisitionDate, ds.AcquisitionTime  # not in the Enhanced MR IOD
    duration_s = _tr_ms(gre, study) * nj * nk / 1000.0
    ds.AcquisitionDateTime = study.study_date + study.study_time
    ds.AcquisitionDuration = duration_s
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MIXED"
    ds.AcquisitionContrast = "T2_STAR"
    ds.ContentQualification = "RESEARCH"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ImageComments = "simulated by qsmnode"
    ds.AcquisitionContextSequence = _seq()
    # MR Pulse Sequence module
    ds.PulseSequenceName = "FFE"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    ds.NumberOfFrames = 2 * nk * ne
    # dimensions: stack, in-stack position, magnitude/phase, echo
    dim_uid = sim_uid(study.seed, "dimension-organization", style, n)
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=dim_uid))
    dims = [
        (0x00209056, 0x00209111, "Stack ID"),
        (0x00209057, 0x00209111, "In-Stack Position Number"),
        (0x00089208, 0x00189226, "Complex Image Component"),
        (0x00189082, 0x00189114, "Effective Echo Time"),
    ]
    ds.DimensionIndexSequence = _seq(
        *(
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=pointer,
                FunctionalGroupPointer=group,
                DimensionDescriptionLabel=label,
            )
            for pointer, group, label in dims
        )
    )
    shared = _item(
        PlaneOrientationSequence=_seq(_item(ImageOrientationPatient=_ds_list(geo.orientation))),
        PixelMeasuresSequence=_seq(
            _item(
                SliceThickness=_ds(study.slice_thickness_mm or geo.slice_spacing),
                SpacingBetweenSlices=_ds(geo.slice_spacing),
                PixelSpacing=_ds_list(geo.pixel_spacing),
            )
        ),
        MRTimingAndRelatedParametersSequence=_seq(
            _item(
                RepetitionTime=_ds(_tr_ms(gre, study)),
                FlipAngle=_ds(study.flip_angle_deg),
                EchoTrainLength=ne,
                RFEchoTrainLength=0,
                GradientEchoTrainLength=ne,
                SpecificAbsorptionRateSequence=_seq(
                    _item(
                        SpecificAbsorptionRateDefinition="IEC_HEAD",
                        SpecificAbsorptionRateValue=0.5,
                    )
                ),
                OperatingModeSequence=_seq(
                    *(
                        _item(OperatingModeType=kind, OperatingMode="IEC_NORMAL")
                        for kind in ("STATIC FIELD", "RF", "GRADIENT")
                    )
                ),
                GradientOutputType="DB_DT",
                GradientOutput=20.0,
            )
        ),
        MRFOVGeometrySequence=_seq(
            _item(
                InPlanePhaseEncodingDirection="COLUMN",
                MRAcquisitionFrequencyEncodingSteps=ni,
                MRAcquisitionPhaseEncodingStepsInPlane=nj,
                MRAcquisitionPhaseEncodingStepsOutOfPlane=nk,
                PercentSampling="100",
                PercentPhaseFieldOfView="100",
            )
        ),
        MRModifierSequence=_seq(
            _item(
                InversionRecovery="NO",
                FlowCompensation="NONE",
                Spoiling="RF_AND_GRADIENT",
                T2Preparation="NO",
                SpectrallySelectedExcitation="NONE",
                SpatialPresaturation="NONE",
                PartialFourier="NO",
                ParallelAcquisition="NO",
            )
        ),
        MRImagingModifierSequence=_seq(
            _item(
                MagnetizationTransfer="NONE",
                BloodSignalNulling="NO",
                Tagging="NONE",
                TransmitterFrequency=GAMMA_BAR_HZ_PER_T * gre.field_strength_t / 1e6,
                PixelBandwidth=_ds(study.pixel_bandwidth_hz),
            )
        ),
        MRReceiveCoilSequence=_seq(
            _item(
                ReceiveCoilName="SIM 32CH HEAD",
                ReceiveCoilManufacturerName="",
                ReceiveCoilType="MULTICOIL",
                QuadratureReceiveCoil="NO",
                MultiCoilDefinitionSequence=_seq(
                    _item(MultiCoilElementName="ALL", MultiCoilElementUsed="YES")
                ),
            )
        ),
        MRTransmitCoilSequence=_seq(
            _item(
                TransmitCoilName="SIM 8CH PTX",
                TransmitCoilManufacturerName="",
                TransmitCoilType="VOLUME",
            )
        ),
        MRAveragesSequence=_seq(_item(NumberOfAverages="1")),
        FrameAnatomySequence=_seq(
            _item(
                AnatomicRegionSequence=_seq(
                    _item(CodeValue="69536005", CodingSchemeDesignator="SCT", CodeMeaning="Head")
                ),
                FrameLaterality="U",
            )
        ),
    )
    ds.SharedFunctionalGroupsSequence = _seq(shared)

    scale = magnitude_scale(gre)
    mag_slope = 1.0 / scale
    parts = [
        (
            "M",
            "MAGNITUDE",
            _frames(gre.magnitude, lambda m: encode_magnitude(m, scale)),
            _item(RescaleIntercept="0", RescaleSlope=_ds(mag_slope), RescaleType="US"),
            _item(
                WindowCenter=_ds(STORED_MAX * mag_slope / 2),
                WindowWidth=_ds(STORED_MAX * mag_slope),
            ),
            _rwvm(mag_slope, 0.0, "1", "no units", "Real World Value Mapping for normalized"),
        ),
        (
            "P",
            "PHASE",
            _frames(gre.phase, encode_phase_philips),
            _item(
                RescaleIntercept=_ds(PHILIPS_PHASE_INTERCEPT),
                RescaleSlope=PHILIPS_PHASE_SLOPE_TEXT,
                RescaleType="US",
            ),
            _item(WindowCenter="0", WindowWidth="6284"),
            _rwvm(
                PHILIPS_PHASE_SLOPE,
                PHILIPS_PHASE_INTERCEPT,
                "mrad",
                "milliradian",
                "Real World Value Mapping for mrad",
            ),
        ),
    ]
    frame_time = study.study_date + study.study_time
    plane_positions = [_seq(_item(ImagePositionPatient=_ds_list(p))) for p in geo.positions]
    echoes = [_seq(_item(EffectiveEchoTime=round(te * 1000.0, 6))) for te in gre.echo_times_s]
    frames: list[Dataset] = []
    pixel_chunks: list[bytes] = []
    for p_index, (letter, component, stored, pvt, voi, rwvm) in enumerate(parts, start=1):
        frame_type = _seq(
            _item(
                FrameType=["ORIGINAL", "PRIMARY", flavor, letter],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
                ComplexImageComponent=component,
                AcquisitionContrast="T2_STAR",
            )
        )
        pvt_seq, voi_seq, rwvm_seq = _seq(pvt), _seq(voi), _seq(rwvm)
        for k in range(nk):
            for e in range(ne):
                frame = Dataset()
                frame.FrameContentSequence = _seq(
                    _item(
                        FrameAcquisitionDateTime=frame_time,
                        FrameReferenceDateTime=frame_time,
                        FrameAcquisitionDuration=duration_s * 1000.0,
                        StackID="1",
                        InStackPositionNumber=k + 1,
                        DimensionIndexValues=[1, k + 1, p_index, e + 1],
                    )
                )
                frame.PlanePositionSequence = plane_positions[k]
                frame.MRImageFrameTypeSequence = frame_type
                frame.MREchoSequence = echoes[e]
                frame.PixelValueTransformationSequence = pvt_seq
                frame.FrameVOILUTSequence = voi_seq
                frame.RealWorldValueMappingSequence = rwvm_seq
                frames.append(frame)
                pixel_chunks.append(stored[e][k].tobytes())
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds[0x7FE00010] = DataElement(0x7FE00010, "OW", b"".join(pixel_chunks))
    path = out_dir / f"{n:04d}_{_folder_name(study)}" / "00001.dcm"
    _save(ds, path, ENHANCED_MR_IMAGE_STORAGE, uid)
    return [path]


def write_dicom(
    gre: MultiEchoGRE, out_dir: Path, style: str, study: SimStudyInfo | None = None
) -> list[Path]:
    """Write ``gre`` as a scanner of ``style`` would; return the written files in order.

    Args:
        gre: the acquisition (magnitude, wrapped phase, echo times, affine, B0).
        out_dir: created if needed; one subfolder per series.
        style: one of :data:`STYLES`.
        study: patient/study data and UID seed; default ``SimStudyInfo()``.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: expected one of {STYLES}")
    study = study or SimStudyInfo()
    out_dir = Path(out_dir)
    if style == "enhanced":
        return _write_enhanced(gre, out_dir, style, study)
    return _write_classic(gre, out_dir, style, study)


# ---------------------------------------------------------------------------------------------
# same-session T1w (MPRAGE-like)


@dataclass(frozen=True)
class T1wProtocol:
    """What a 3D MPRAGE-like T1w series says about itself (Siemens-like classic files).

    ``series_number`` must differ from the GRE's: the series and instance UIDs derive from the
    study seed, a "t1w" role and the series number, so the two never collide.
    """

    series_number: int = 2
    series_description: str = "t1_mprage_sag"
    inversion_time_s: float = 1.05
    echo_time_s: float = 0.00226
    repetition_time_s: float = 2.3
    flip_angle_deg: float = 9.0
    sequence_name: str = "*tfl3d1_16ns"


def write_t1w_dicom(
    image: NDArray[np.floating],
    affine: NDArray[np.float64],
    out_dir: Path,
    study: SimStudyInfo | None = None,
    protocol: T1wProtocol | None = None,
    field_strength_t: float = 7.0,
) -> list[Path]:
    """Write a T1w volume (e.g. from :func:`qsmnode.sim.anatomy.simulate_t1w`) as a classic
    single-echo magnitude MR series of the study ``study``: same Study and Frame of Reference
    UIDs as the GRE written with it, ScanningSequence ``GR\\IR``, InversionTime, SequenceName
    ``*tfl3d1_16ns``, one file per slice (Siemens-like, no rescale). Returns the files in order.

    Args:
        image: ``[i, j, k]`` intensities (any non-negative scale; stored as 12 bits).
        affine: its voxel-to-RAS affine (any orientation with orthogonal i and j).
    """
    volume = np.asarray(image, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"the T1w image must be 3-D [i, j, k], not of shape {volume.shape}")
    protocol = protocol or T1wProtocol()
    study = study or SimStudyInfo()
    series = dataclasses.replace(
        study,
        series_number=protocol.series_number,
        series_description=protocol.series_description,
        protocol_name=protocol.series_description,
        flip_angle_deg=protocol.flip_angle_deg,
        repetition_time_ms=protocol.repetition_time_s * 1000.0,
    )
    # The shared writers take an acquisition: a single echo without phase stands in for it.
    t1w = MultiEchoGRE(
        magnitude=volume[..., None],
        phase=np.broadcast_to(np.float32(0), (*volume.shape, 1)),  # never read
        echo_times_s=(protocol.echo_time_s,),
        affine=np.asarray(affine, dtype=np.float64),
        field_strength_t=field_strength_t,
    )
    _, _, nk = volume.shape
    geo = plane_geometry(t1w.affine, nk)
    style, role = "siemens", "t1w-siemens"
    n = protocol.series_number
    base = _common(t1w, series, style, n)
    base.SeriesInstanceUID = study.series_instance_uid(role, n)
    base.SOPClassUID = MR_IMAGE_STORAGE
    for keyword, value in _classic_mr(t1w, series, geo, philips=False).items():
        _put(base, keyword, value)
    scale = magnitude_scale(t1w)
    for keyword, value in {
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
        "ScanningSequence": ["GR", "IR"],
        "SequenceVariant": ["SK", "SP", "MP"],
        "ScanOptions": "IR",
        "SequenceName": protocol.sequence_name,
        "InversionTime": _ms(protocol.inversion_time_s),
        "EchoTrainLength": 1,
        "WindowCenter": _ds(STORED_MAX / 2),
        "WindowWidth": _ds(STORED_MAX),
    }.items():
        _put(base, keyword, value)
    shared = _encode_dataset(base)
    stored = frame_stack(encode_magnitude(volume, scale))
    normal = geo.normal
    echo_time = _ms(protocol.echo_time_s)
    folder = out_dir / f"{n:04d}_{_folder_name(series)}"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for k in range(nk):
        number = k + 1
        uid = study.sop_instance_uid(role, n, number)
        elements = dict(shared)
        for keyword, value in (
            ("SOPInstanceUID", uid),
            ("InstanceNumber", number),
            ("EchoTime", echo_time),
            ("EchoNumbers", "1"),
            ("ImagePositionPatient", _ds_list(geo.positions[k])),
            ("SliceLocation", _ds(float(geo.positions[k] @ normal))),
        ):
            tag, vr = _tag_vr(keyword)
            elements[tag] = _encode_element(DataElement(tag, vr, value))
        elements[0x7FE00010] = _encode_element(DataElement(0x7FE00010, "OW", stored[k].tobytes()))
        path = folder / f"{number:05d}.dcm"
        _write_encoded(path, elements, MR_IMAGE_STORAGE, uid)
        written.append(path)
    return written
