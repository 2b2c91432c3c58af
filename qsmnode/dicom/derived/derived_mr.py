"""QSM and R2* as classic derived MR Image series, for viewers that cannot show Parametric Maps.

One single-frame MR Image per slice ``k``, int16, with the plane geometry of the acquisition
affine. Stored values are plain integers in a stated unit (no rescale: the MR Image IOD has no
Modality LUT, and viewers then show the number as it is):

- QSM: 1 unit = 1 ppb (0.001 ppm), window 0 ± 150 ppb;
- R2*: 1 unit = 0.1 s⁻¹, window 0..100 s⁻¹ (centre 500, width 1000 units).

Each image references its echo-1 source slice (Referenced Image and Source Image Sequences); the
Source Image Sequence also lists the same slice of the other echoes (and of the phase, for QSM).
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from qsmnode.dicom.derived.common import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    BuildContext,
    ds_text,
)
from qsmnode.dicom.geometry import slice_normal, slice_pixels
from qsmnode.dicom.load import SourceRef

INT16_MIN, INT16_MAX = -32768, 32767


@dataclass(frozen=True)
class MRSpec:
    """What distinguishes one derived MR series from the other."""

    role: str
    image_type_value3: str
    series_description: str
    units_per_input_unit: float
    """Stored value = round(input × this): 1000 for ppm → ppb, 10 for s⁻¹ → 0.1 s⁻¹."""
    unit_text: str
    window_center: float
    window_width: float
    quantity_text: str
    include_phase: bool


QSM_MR = MRSpec(
    role="qsm-mr",
    image_type_value3="QSM",
    series_description="QSM [ppb]",
    units_per_input_unit=1000.0,
    unit_text="1 unit = 1 ppb (0.001 ppm) of magnetic susceptibility",
    window_center=0.0,
    window_width=300.0,
    quantity_text="QSM (magnetic susceptibility) from the multi-echo GRE magnitude and phase",
    include_phase=True,
)

R2STAR_MR = MRSpec(
    role="r2s-mr",
    image_type_value3="R2STAR",
    series_description="R2* [0.1/s]",
    units_per_input_unit=10.0,
    unit_text="1 unit = 0.1 1/s of R2*",
    window_center=500.0,
    window_width=1000.0,
    quantity_text="R2* from the multi-echo GRE magnitude",
    include_phase=False,
)

_COPIED_MR_ATTRIBUTES = (
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "SequenceName",
    "AngioFlag",
    "RepetitionTime",
    "ImagingFrequency",
    "ImagedNucleus",
    "FlipAngle",
    "ProtocolName",
)
"""Acquisition attributes of the source (classic MR header) carried over to the derived images.
Enhanced sources keep them in functional groups; the defaults below stand in."""

_MR_DEFAULTS = {
    "ScanningSequence": "GR",
    "SequenceVariant": "SP",
    "ScanOptions": "",
    "MRAcquisitionType": "3D",
}


def to_stored(volume: NDArray[np.floating], units_per_input_unit: float) -> NDArray[np.int16]:
    """``round(volume × units_per_input_unit)`` as int16, clipped to its range; NaN → 0."""
    scaled = np.rint(np.asarray(volume, dtype=np.float64) * units_per_input_unit)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=INT16_MAX, neginf=INT16_MIN)
    return np.clip(scaled, INT16_MIN, INT16_MAX).astype(np.int16)


_ds = ds_text


def _source_item(ref: SourceRef) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame_number is not None:
        item.ReferencedFrameNumber = ref.frame_number
    return item


def _purpose_source() -> list[Dataset]:
    code = Dataset()
    code.CodeValue = "121322"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Source image for image processing operation"
    return [code]


def _slice_sources(ctx: BuildContext, k: int, include_phase: bool) -> list[SourceRef]:
    loaded = ctx.loaded
    refs = list(loaded.magnitude_sources[k])
    if include_phase and loaded.phase_sources is not None:
        refs += list(loaded.phase_sources[k])
    return refs


def build_derived_mr(
    ctx: BuildContext, volume: NDArray[np.floating], spec: MRSpec
) -> list[hd.SOPClass]:
    """One MR Image per slice of an ``[i, j, k]`` volume on the acquisition grid."""
    if volume.shape != ctx.shape:
        raise ValueError(f"{spec.role}: volume {volume.shape} is not the acquisition {ctx.shape}")
    stored = to_stored(volume, spec.units_per_input_unit)
    loaded = ctx.loaded
    header = loaded.header
    geo = ctx.geometry
    normal = slice_normal(geo.orientation)
    gre = loaded.gre
    echoes_ms = ", ".join(f"{te * 1000:g}" for te in gre.echo_times_s)
    description = (
        f"{spec.quantity_text} ({gre.n_echoes} echoes, TE {echoes_ms} ms) by "
        f"{ctx.software_versions}. {spec.unit_text}."
    )
    out: list[hd.SOPClass] = []
    for k in range(ctx.shape[2]):
        source = ctx.sources.slice_source(k)
        source_ds = ctx.sources.dataset(source.sop_instance_uid)
        ds = hd.SOPClass(
            study_instance_uid=loaded.study_uid,
            series_instance_uid=ctx.series_uid(spec.role),
            series_number=ctx.series_number(spec.role),
            sop_instance_uid=ctx.instance_uid(spec.role, k),
            sop_class_uid=MRImageStorage,
            instance_number=k + 1,
            modality="MR",
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MODEL_NAME,
            software_versions=ctx.software_versions,
            device_serial_number=DEVICE_SERIAL_NUMBER,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=spec.series_description,
            specific_character_set=source_ds.get("SpecificCharacterSet"),
            **ctx.dates(),
        )
        ds.copy_patient_and_study_information(source_ds)
        # General Series, Frame of Reference
        ds.BodyPartExamined = ctx.body_part
        ds.PatientPosition = header.get("PatientPosition") or "HFS"
        ds.FrameOfReferenceUID = loaded.frame_of_reference_uid
        ds.PositionReferenceIndicator = loaded.patient_study.get("PositionReferenceIndicator", "")
        # General Image
        ds.ImageType = ["DERIVED", "SECONDARY", spec.image_type_value3]
        ds.DerivationDescription = description
        ds.ImageComments = spec.unit_text
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.ReferencedImageSequence = [_source_item(source)]
        items = []
        for ref in _slice_sources(ctx, k, spec.include_phase):
            item = _source_item(ref)
            item.PurposeOfReferenceCodeSequence = _purpose_source()
            items.append(item)
        ds.SourceImageSequence = items
        # Image Plane
        ipp = geo.positions[k]
        ds.ImagePositionPatient = ctx.position_text(k)
        ds.ImageOrientationPatient = ctx.orientation_text()
        ds.PixelSpacing = ctx.pixel_spacing_text()
        ds.SliceThickness = ctx.slice_spacing_text()
        ds.SpacingBetweenSlices = ctx.slice_spacing_text()
        ds.SliceLocation = _ds(float(np.dot(ipp, normal)))
        # MR Image
        for keyword in _COPIED_MR_ATTRIBUTES:
            if keyword in header and header[keyword].value not in (None, ""):
                setattr(ds, keyword, header[keyword].value)
        for keyword, value in _MR_DEFAULTS.items():
            if keyword not in ds:
                setattr(ds, keyword, value)
        if "RepetitionTime" not in ds:
            ds.RepetitionTime = None
        ds.EchoTime = None  # derived from all echoes
        ds.EchoTrainLength = gre.n_echoes
        ds.MagneticFieldStrength = _ds(gre.field_strength_t)
        # Image Pixel
        pixels = np.ascontiguousarray(slice_pixels(stored, k))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = pixels.astype("<i2").tobytes()
        # VOI LUT
        ds.WindowCenter = _ds(spec.window_center)
        ds.WindowWidth = _ds(spec.window_width)
        ds.WindowCenterWidthExplanation = spec.series_description
        out.append(ds)
    return out
