"""Header building shared by every style: small dataset helpers (DS values, elements,
sequences), Part 10 files written whole or from elements encoded once per series, and the
attributes every simulated image carries (patient, study, series, equipment, MR image)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
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
from qsmnode.dicom.geometry import PlaneGeometry
from qsmnode.sim.vendor_dicom.encoding import STORED_MAX
from qsmnode.sim.vendor_dicom.study import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    VENDORS,
    SimStudyInfo,
)


def ds_text(x: float) -> str:
    """A float as a valid DS string (at most 16 characters; integers without ".0")."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return format_number_as_ds(x)


def ds_list(values: Iterable[float]) -> list[str]:
    """Each value as a DS string (:func:`ds_text`)."""
    return [ds_text(v) for v in values]


_VR_CACHE: dict[str, tuple[int, str]] = {}


def tag_vr(keyword: str) -> tuple[int, str]:
    """The tag and VR of a standard attribute's keyword (cached)."""
    try:
        return _VR_CACHE[keyword]
    except KeyError:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(keyword) from None
        _VR_CACHE[keyword] = (tag, dictionary_VR(tag))
        return _VR_CACHE[keyword]


def put(ds: Dataset, keyword: str, value: Any) -> None:
    """Set a standard attribute with a new element (never mutates a shared one)."""
    tag, vr = tag_vr(keyword)
    ds[tag] = DataElement(tag, vr, value)


def item(**attributes: Any) -> Dataset:
    """A sequence item holding ``attributes`` (standard keywords)."""
    built = Dataset()
    for keyword, value in attributes.items():
        put(built, keyword, value)
    return built


def seq(*items: Dataset) -> Sequence:
    """A sequence of ``items``."""
    return Sequence(list(items))


def clone(base: Dataset) -> Dataset:
    """A new dataset sharing the (never mutated) elements of ``base``."""
    return Dataset(dict(base.items()))


def save_dataset(ds: Dataset, path: Path, sop_class: str, sop_instance: str) -> None:
    """Write ``ds`` as a Part 10 file (explicit VR little endian) with the simulator's meta."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


_ENCODINGS = convert_encodings("ISO_IR 100")


def encode_element(elem: DataElement) -> bytes:
    """One element in explicit VR little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem, _ENCODINGS)
    return fp.getvalue()


def encode_dataset(ds: Dataset) -> dict[int, bytes]:
    """Every element of ``ds`` encoded on its own, by tag, to be reused by many files."""
    return {int(elem.tag): encode_element(elem) for elem in ds}


def write_encoded(path: Path, elements: dict[int, bytes], sop_class: str, sop_uid: str) -> None:
    """Write a Part 10 file from pre-encoded elements (the classic writer's fast path: the
    elements shared by a series are encoded once, not once per file)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    body = b"".join(elements[tag] for tag in sorted(elements))
    with open(path, "wb") as f:
        f.write(fp.getvalue())
        f.write(body)


def ms_text(seconds: float) -> str:
    """Seconds as a DS string of milliseconds."""
    return ds_text(round(seconds * 1000.0, 6))


def tr_ms(gre: MultiEchoGRE, study: SimStudyInfo) -> float:
    """The repetition time in ms: the study's, else the last echo time + 8 ms."""
    if study.repetition_time_ms is not None:
        return study.repetition_time_ms
    return round(max(gre.echo_times_s) * 1000.0 + 8.0, 3)


def common_attributes(
    gre: MultiEchoGRE, study: SimStudyInfo, style: str, series_number: int
) -> Dataset:
    """Patient, study, series, frame of reference, equipment and image pixel attributes."""
    vendor = VENDORS[style]
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
    ds.MagneticFieldStrength = ds_text(gre.field_strength_t)
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


def classic_mr_attributes(
    gre: MultiEchoGRE, study: SimStudyInfo, geo: PlaneGeometry, philips: bool
) -> dict:
    """MR Image module and Image Plane attributes of classic single-frame files."""
    ni, nj, _ = gre.shape
    attrs: dict[str, Any] = {
        "ScanningSequence": "GR",
        "SequenceVariant": ["SP"] if philips else ["SP", "OSP"],
        "ScanOptions": "FC" if philips else "",
        "SequenceName": "" if philips else f"*fl{study.acquisition_type.lower()}{gre.n_echoes}",
        "AngioFlag": "N",
        "SliceThickness": ds_text(study.slice_thickness_mm or geo.slice_spacing),
        "RepetitionTime": ds_text(tr_ms(gre, study)),
        "NumberOfAverages": "1",
        "ImagingFrequency": ds_text(GAMMA_BAR_HZ_PER_T * gre.field_strength_t / 1e6),
        "ImagedNucleus": "1H",
        "SpacingBetweenSlices": ds_text(geo.slice_spacing),
        "NumberOfPhaseEncodingSteps": nj if philips else ni,
        "EchoTrainLength": gre.n_echoes,
        "PercentSampling": "100",
        "PercentPhaseFieldOfView": "100",
        "PixelBandwidth": ds_text(study.pixel_bandwidth_hz),
        "AcquisitionMatrix": [ni, 0, 0, nj] if philips else [0, nj, ni, 0],
        "InPlanePhaseEncodingDirection": "COL" if philips else "ROW",
        "FlipAngle": ds_text(study.flip_angle_deg),
        "PixelSpacing": ds_list(geo.pixel_spacing),
        "ImageOrientationPatient": ds_list(geo.orientation),
    }
    return attrs


def real_world_value_mapping(
    slope: float, intercept: float, unit: str, meaning: str, explanation: str
) -> Dataset:
    """A Real World Value Mapping item: stored 0..4095 to ``slope * stored + intercept``."""
    return item(
        LUTExplanation=explanation,
        MeasurementUnitsCodeSequence=seq(
            item(
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


def folder_name(study: SimStudyInfo) -> str:
    """The series description made safe as a folder name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in study.series_description)
