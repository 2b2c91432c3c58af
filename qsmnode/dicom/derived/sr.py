"""The M1 measurements as a TID 1500 Measurement Report in a Comprehensive 3D SR.

Content tree (root: Imaging Measurement Report, observer = the qsmnode device):

- one Volumetric ROI group (TID 1411) per SEG segment (area × layer present): the Referenced
  Segment with its echo-1 source images, a finding site (primary motor cortex, laterality), the
  algorithm (name, version), and the measurements: χ mean, SD and median (ppm), T2*-weighted
  signal ratio ({ratio}), R2* (/s), cortical thickness (mm), voxel count ({voxels}) and volume
  (mm³). z-scores, where present, are statistical properties (TID 310/311) of χ mean and of the
  signal ratio;
- one Measurements group (TID 1501) per area for the full cortical depth ("all") and for any
  (area, layer) without a segment, referencing the echo-1 source images;
- "not covered" (``Measurement.covered`` False) is a qualitative evaluation Finding = Anatomy
  coverage incomplete, with the numbers left out (they are NaN);
- for every region with a voxel (each area × layer and each area's full depth), one Planar ROI
  group (TID 1410) with the same Tracking Identifier and Tracking UID: the rectangle around the
  region (a closed POLYLINE of 5 points) on the slice holding most of it, on the QSM derived MR
  image of that slice, its finding the region's name (private scheme).
  The volumetric groups are what a DICOM reader computes with; these outlines are what a viewer
  can draw and jump to. OHIF 3 draws only groups with a SCOORD and merges groups by Tracking UID,
  so each region shows as one measurement with its outline and the values of its group;
- one "Quality control" group (TID 1501) holding each quality flag as a qualitative evaluation
  (meets / does not meet the quality control standard) and its value as a measurement, and,
  with the same tracking UID, the outline of all M1 regions (TID 1410): OHIF 3 stops loading
  every measurement of an SR at the first group without a SCOORD (it reads
  ``measurement.coords[0]`` unguarded in ``_checkIfCanAddMeasurementsToDisplaySet``).

- the finding in words (the Key Object Selection's reason: the deep-layer χ finding, or why
  there is none, and the changes since a prior report), as TEXT in TID 1500's "Qualitative
  Evaluations" container;
- one "Acquisition protocol" group (field strength, voxel size, echo times) and, when the
  patient has a comparable prior report, one "Change since prior report" group per region
  compared (:mod:`qsmnode.dicom.derived.followup`), the prior report as other evidence.

Flag names are coded in the private scheme ``99QSMNODE``, declared in the Coding Scheme
Identification Sequence.

``ReferencedSegment.from_segmentation`` fails on a single-segment SEG (DOMAIN.md), so the
Referenced Segment is built directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from qsmnode.dicom.derived import codes
from qsmnode.dicom.derived.common import (
    ALGORITHM_NAME,
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    BuildContext,
)
from qsmnode.dicom.derived.followup import change_groups, protocol_group
from qsmnode.dicom.derived.segmentation import (
    AREA_TEXT,
    segment_name,
    segment_numbers,
    tracking_uid,
)
from qsmnode.dicom.geometry import slice_pixels
from qsmnode.m1.followup import FollowUp
from qsmnode.m1.result import AREAS, LAYERS, M1Result, Measurement, QualityFlag, segment_label

PRIVATE_SCHEME = codes.PRIVATE_SCHEME
PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="qsmnode quality-control flags",
    responsible_organization="qsmnode",
)
NORMATIVE_DESCRIPTION = "qsmnode normative table"


def _side(area: str) -> Code:
    return codes.LEFT if area.startswith("left") else codes.RIGHT


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _z_properties(z: float | None) -> hd.sr.MeasurementProperties | None:
    if not _finite(z):
        return None
    item = hd.sr.NumContentItem(
        name=codes.Z_SCORE,
        value=float(z),  # type: ignore[arg-type]
        unit=codes.NO_UNITS,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )
    return hd.sr.MeasurementProperties(
        measurement_statistical_properties=hd.sr.MeasurementStatisticalProperties(
            values=[item], description=NORMATIVE_DESCRIPTION
        )
    )


def measurement_items(m: Measurement, voxel_volume_mm3: float) -> list[hd.sr.Measurement]:
    """The NUM items of one row of the table, NaN values left out."""
    rows: list[tuple[Code, float, Code, Code | None, float | None]] = [
        (codes.MAGNETIC_SUSCEPTIBILITY, m.chi_mean_ppm, codes.PPM, codes.MEAN, m.chi_z),
        (codes.MAGNETIC_SUSCEPTIBILITY, m.chi_sd_ppm, codes.PPM, codes.STANDARD_DEVIATION, None),
        (codes.MAGNETIC_SUSCEPTIBILITY, m.chi_median_ppm, codes.PPM, codes.MEDIAN, None),
        (
            codes.T2STAR_WEIGHTED_SIGNAL,
            m.t2star_signal_ratio,
            codes.RATIO,
            codes.MEAN,
            m.t2star_signal_ratio_z,
        ),
        (codes.R2STAR, m.r2star_mean_per_s, codes.PER_SECOND, codes.MEAN, None),
        (codes.THICKNESS, m.thickness_mean_mm, codes.MILLIMETER, codes.MEAN, None),
        (codes.QUANTITY, float(m.voxel_count), codes.VOXELS, None, None),
        (codes.VOLUME, m.voxel_count * voxel_volume_mm3, codes.CUBIC_MILLIMETER, None, None),
    ]
    out = []
    for name, value, unit, derivation, z in rows:
        if not _finite(value):
            continue
        out.append(
            hd.sr.Measurement(
                name=name,
                value=float(value),
                unit=unit,
                derivation=derivation,
                properties=_z_properties(z),
            )
        )
    return out


def _coverage(m: Measurement | None) -> list[hd.sr.QualitativeEvaluation]:
    if m is not None and m.covered:
        return []
    return [hd.sr.QualitativeEvaluation(dicom_codes.DCM.Finding, codes.ANATOMY_COVERAGE_INCOMPLETE)]


def _echo1_by_slice(ctx: BuildContext, slices: Sequence[int]) -> list[tuple[str, str, list[int]]]:
    """``(sop_class, sop_instance, frame numbers)`` of the echo-1 images of some slices."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for k in slices:
        ref = ctx.sources.slice_source(k)
        frames = grouped.setdefault((ref.sop_class_uid, ref.sop_instance_uid), [])
        if ref.frame_number is not None:
            frames.append(ref.frame_number)
    return [(cls, uid, frames) for (cls, uid), frames in grouped.items()]


def _segment_source_images(
    ctx: BuildContext, labels: np.ndarray, label: int
) -> list[hd.sr.SourceImageForSegmentation]:
    slices = np.flatnonzero(np.any(labels == label, axis=(0, 1)))
    return [
        hd.sr.SourceImageForSegmentation(cls, uid, frames or None)
        for cls, uid, frames in _echo1_by_slice(ctx, slices.tolist())
    ]


def _group_source_images(
    ctx: BuildContext, labels: np.ndarray, values: Sequence[int]
) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
    """The echo-1 images of the slices holding any of the label ``values`` (None if none)."""
    slices = np.flatnonzero(np.any(np.isin(labels, values), axis=(0, 1)))
    refs = [
        hd.sr.SourceImageForMeasurementGroup(cls, uid, frames or None)
        for cls, uid, frames in _echo1_by_slice(ctx, slices.tolist())
    ]
    return refs or None


def region_box(mask: np.ndarray) -> np.ndarray:
    """The rectangle around a 2-D mask (``[rows, columns]``) as a closed POLYLINE of five SCOORD
    points ``(column, row)``, the top-left corner of the top-left pixel at (0, 0), along the
    outer edges of the outermost pixels. A rectangle (not the region's contour, which the SEG
    holds): OHIF 3 lists a planar SR region in its measurement panel only as a rectangle (a
    POLYLINE of 4 or 5 points, its RectangleROI adapter)."""
    rows, columns = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("the mask is empty")
    x0, x1 = float(columns.min()), float(columns.max() + 1)
    y0, y1 = float(rows.min()), float(rows.max() + 1)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def region_code(name: str) -> Code:
    """The finding of a region's outline group: the region by name in the private scheme
    (``M1 left hand deep`` → ``M1-LH-DEEP``, ``M1 right foot all layers`` → ``M1-RF-ALL``),
    which OHIF shows as the measurement's label."""
    words = name.split()
    value = f"{words[0]}-{words[1][0]}{words[2][0]}-{words[3][:8]}".upper()
    return Code(value, PRIVATE_SCHEME, name)


def _outline_group(
    ctx: BuildContext,
    labels: np.ndarray,
    values: Sequence[int],
    tracking: hd.sr.TrackingIdentifier,
    site: hd.sr.FindingSite | None,
    regions_on: Sequence[Dataset],
    finding_type: Code | None = None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """The TID 1410 group of a region: its rectangle on the slice with most of its voxels, on the
    image of ``regions_on`` for that slice, with the region's name as the finding (None when
    the region has no voxel)."""
    mask = np.isin(labels, values)
    counts = mask.sum(axis=(0, 1))
    if counts.max() == 0:
        return None
    k = int(np.argmax(counts))
    image = regions_on[k]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=region_box(slice_pixels(mask, k)),
        source_image=hd.sr.SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=finding_type or region_code(str(tracking[0].TextValue)),
        finding_category=codes.ANATOMICAL_STRUCTURE if site is not None else None,
        finding_sites=[site] if site is not None else None,
        algorithm_id=_algorithm(ctx),
    )


def _quality_tracking(ctx: BuildContext) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=ctx.uids.uid("sr/quality-control/tracking"), identifier="Quality control"
    )


def _quality_group(ctx: BuildContext, flags: Sequence[QualityFlag]) -> hd.sr.Template | None:
    if not flags:
        return None
    evaluations = []
    measurements = []
    for flag in flags:
        meaning = f"{flag.name}: {flag.text}" if flag.text else flag.name
        name = Code(flag.name[:16], PRIVATE_SCHEME, meaning[:64])
        value = (
            dicom_codes.DCM.UsableMeetsTheQualityControlStandard
            if flag.passed
            else dicom_codes.DCM.UsableDoesNotMeetTheQualityControlStandard
        )
        evaluations.append(hd.sr.QualitativeEvaluation(name, value))
        if _finite(flag.value):
            measurements.append(
                hd.sr.Measurement(name=name, value=float(flag.value), unit=codes.NO_UNITS)  # type: ignore[arg-type]
            )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_quality_tracking(ctx),
        finding_type=codes.QUALITY_CONTROL,
        algorithm_id=_algorithm(ctx),
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )


def _algorithm(ctx: BuildContext) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=ctx.algorithm_version)


QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


def _finding_container(finding: str) -> hd.sr.ContainerContentItem:
    """TID 1500's "Qualitative Evaluations" container holding the finding as TEXT."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = [hd.sr.TextContentItem(
        name=dicom_codes.DCM.Finding, value=finding,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    return container


def _prior_evidence(follow_up: FollowUp | None) -> list[Dataset]:
    """The prior report compared with, as other evidence (a reference, not its content)."""
    if follow_up is None or follow_up.prior is None:
        return []
    prior = follow_up.prior
    ref = Dataset()
    ref.StudyInstanceUID = prior.study_uid
    ref.SeriesInstanceUID = prior.report_series_uid
    ref.SOPClassUID = prior.report_class_uid
    ref.SOPInstanceUID = prior.report_uid
    return [ref]


def build_report(
    ctx: BuildContext,
    m1: M1Result,
    seg: hd.seg.Segmentation | None,
    evidence: Sequence[Dataset] = (),
    regions_on: Sequence[Dataset] = (),
    follow_up: FollowUp | None = None,
    finding: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of an M1 analysis. ``seg`` is the SEG of the same result (None when it has no
    region); ``evidence`` lists further derived objects (e.g. the Parametric Maps) to record;
    ``regions_on`` is one image per slice ``k`` (the QSM derived MR images) on which each
    region's outline is drawn (none without it); ``follow_up`` the comparison with the
    patient's prior report (its change groups, and the prior report as other evidence);
    ``finding`` the result's finding in words (the KOS's reason), as the report's qualitative
    evaluation."""
    if regions_on and len(regions_on) != ctx.shape[2]:
        raise ValueError(f"regions_on has {len(regions_on)} images for {ctx.shape[2]} slices")
    labels = np.asarray(m1.labels)
    numbers = segment_numbers(seg) if seg is not None else {}
    voxel_volume = float(np.prod(ctx.loaded.gre.voxel_size_mm))
    groups: list[hd.sr.Template] = []
    outlines: list[hd.sr.Template] = []
    trackings: dict[tuple[str, str], hd.sr.TrackingIdentifier] = {}
    sites: dict[str, hd.sr.FindingSite] = {}
    for area in AREAS:
        site = hd.sr.FindingSite(codes.PRIMARY_MOTOR_CORTEX, laterality=_side(area))
        sites[area] = site
        for layer in (*LAYERS, "all"):
            try:
                m: Measurement | None = m1.measurement(area, layer)
            except KeyError:
                m = None
            number = numbers.get((area, layer))
            if m is None and number is None:
                continue
            values = [segment_label(area, x) for x in (LAYERS if layer == "all" else [layer])]
            items = measurement_items(m, voxel_volume) if m is not None and m.covered else []
            tracking = hd.sr.TrackingIdentifier(
                uid=tracking_uid(ctx, area, layer),
                identifier=segment_name(area, layer)
                if layer != "all"
                else (f"M1 {AREA_TEXT[area]} all layers"),
            )
            trackings[(area, layer)] = tracking
            common = {
                "tracking_identifier": tracking,
                "finding_type": codes.CEREBRAL_CORTEX,
                "finding_category": codes.ANATOMICAL_STRUCTURE,
                "finding_sites": [site],
                "algorithm_id": _algorithm(ctx),
                "measurements": items or None,
                "qualitative_evaluations": _coverage(m) or None,
            }
            if number is not None and seg is not None:
                referenced = hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_images=_segment_source_images(ctx, labels, segment_label(area, layer)),
                )
                groups.append(
                    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                        referenced_segment=referenced, **common
                    )
                )
            else:
                groups.append(
                    hd.sr.MeasurementsAndQualitativeEvaluations(
                        source_images=_group_source_images(ctx, labels, values), **common
                    )
                )
            if regions_on:
                outline = _outline_group(ctx, labels, values, tracking, site, regions_on)
                if outline is not None:
                    outlines.append(outline)
    if follow_up is not None:
        groups += change_groups(follow_up, trackings, sites, _algorithm(ctx))
    groups += outlines
    groups.append(protocol_group(ctx, _quality_tracking(ctx), _algorithm(ctx)))
    quality = _quality_group(ctx, m1.flags)
    if quality is not None:
        groups.append(quality)
    if regions_on:
        # the checks and the protocol are of the M1 regions as a whole: their outline, so that
        # a viewer that shows only groups with a region (OHIF) shows them too
        every = [segment_label(a, x) for a in AREAS for x in LAYERS]
        outline = _outline_group(ctx, labels, every, _quality_tracking(ctx), None,
                                 regions_on, finding_type=codes.QUALITY_CONTROL)
        if outline is not None:
            groups.append(outline)

    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uids.uid("sr/device"),
            name=f"{ALGORITHM_NAME} {ctx.algorithm_version}",
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
            serial_number=DEVICE_SERIAL_NUMBER,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    if finding:
        report[0].ContentSequence.append(_finding_container(finding))
    all_evidence = [
        *ctx.sources.echo1(), *regions_on, *([seg] if seg is not None else []), *evidence,
        *_prior_evidence(follow_up),
    ]
    sr = hd.sr.Comprehensive3DSR(
        evidence=all_evidence,
        content=report[0],
        is_complete=True,
        series_description="M1 QSM measurements (SR)",
        coding_schemes=[codes.UBERON_SCHEME, PRIVATE_SCHEME_ITEM],
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_versions,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        **ctx.highdicom_kwargs("sr"),
        **ctx.dates(),
    )
    return sr
