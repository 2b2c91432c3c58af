"""The M1 regions as a BINARY Segmentation: one segment per (area, layer) present.

Segments are numbered 1.. in the order of their label value in ``M1Result.labels`` (area-major:
left hand deep, middle, superficial, right hand ..., right foot superficial); labels with no
voxel are skipped. Each segment is coded (see :mod:`qsmnode.dicom.derived.codes`), carries a
deterministic tracking UID (shared with the SR's measurement group for the same region) and a
display colour (shared with the key images).

The source images are a single-volume series (the QSM derived MR images, one per slice): OHIF 3
shows a SEG on the series it references first and loads a multi-echo source as a 4-D cine, on
which it cannot place the segments. The acquired echo-1 magnitude (and the other echoes) are
further sources. Plane geometry strings are those of the derived MR images.

BINARY, not LABELMAP: dcmtk 3.6.7 and Debian's dciodvfy do not know LABELMAP (DOMAIN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from qsmnode.dicom.derived import codes
from qsmnode.dicom.derived.common import (
    DEVICE_SERIAL_NUMBER,
    MODEL_NAME,
    BuildContext,
    set_dimension_organization_uid,
)
from qsmnode.dicom.geometry import frame_stack
from qsmnode.m1.result import AREAS, LAYERS, M1Result, segment_label, segment_of

AREA_TEXT = {
    "left_hand": "left hand",
    "right_hand": "right hand",
    "left_foot": "left foot",
    "right_foot": "right foot",
}
LAYER_TEXT = {
    "deep": "deep third of cortical depth (next to white matter)",
    "middle": "middle third of cortical depth",
    "superficial": "superficial third of cortical depth (next to the pial surface)",
    "all": "full cortical depth",
}
AREA_RGB = {
    "left_hand": (235, 64, 52),
    "right_hand": (52, 128, 235),
    "left_foot": (245, 176, 30),
    "right_foot": (60, 190, 90),
}
"""Display colour of each area (deep layer darkest); the key images use the same colours."""
_LAYER_SHADE = {"deep": 0.6, "middle": 0.8, "superficial": 1.0}


def segment_rgb(area: str, layer: str) -> tuple[int, int, int]:
    r, g, b = AREA_RGB[area]
    f = _LAYER_SHADE.get(layer, 1.0)
    return (round(r * f), round(g * f), round(b * f))


def segment_name(area: str, layer: str) -> str:
    """The short label, e.g. ``"M1 left hand deep"``."""
    return f"M1 {AREA_TEXT[area]} {layer}"


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of the SEG: its number, label value and region."""

    number: int
    label: int
    area: str
    layer: str
    voxel_count: int
    tracking_uid: str

    @property
    def name(self) -> str:
        return segment_name(self.area, self.layer)


def tracking_uid(ctx: BuildContext, area: str, layer: str) -> str:
    """The tracking UID of a region (the same in the SEG and in the SR)."""
    return ctx.uids.uid(f"m1/{area}/{layer}/tracking")


def segments_present(ctx: BuildContext, labels: NDArray[np.integer]) -> list[SegmentInfo]:
    """The segments the SEG will hold, in segment-number order."""
    counts = np.bincount(labels.ravel(), minlength=len(AREAS) * len(LAYERS) + 1)
    out: list[SegmentInfo] = []
    for label in range(1, len(AREAS) * len(LAYERS) + 1):
        if counts[label] == 0:
            continue
        area, layer = segment_of(label)
        out.append(
            SegmentInfo(
                number=len(out) + 1,
                label=label,
                area=area,
                layer=layer,
                voxel_count=int(counts[label]),
                tracking_uid=tracking_uid(ctx, area, layer),
            )
        )
    return out


def _description(ctx: BuildContext, seg: SegmentInfo) -> hd.seg.SegmentDescription:
    side = codes.LEFT if seg.area.startswith("left") else codes.RIGHT
    desc = hd.seg.SegmentDescription(
        segment_number=seg.number,
        segment_label=seg.name,
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=codes.CEREBRAL_CORTEX,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=ctx.algorithm_identification(),
        tracking_uid=seg.tracking_uid,
        tracking_id=seg.name,
        primary_anatomic_structures=[codes.PRIMARY_MOTOR_CORTEX],
        display_color=hd.color.CIELabColor.from_rgb(*segment_rgb(seg.area, seg.layer)),
    )
    modifier = Dataset()
    modifier.CodeValue = side.value
    modifier.CodingSchemeDesignator = side.scheme_designator
    modifier.CodeMeaning = side.meaning
    desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    desc.SegmentDescription = (
        f"Primary motor cortex (M1), {AREA_TEXT[seg.area]} area, {LAYER_TEXT[seg.layer]}"
    )
    return desc


def build_segmentation(
    ctx: BuildContext, m1: M1Result, reference: Sequence[Dataset]
) -> hd.seg.Segmentation | None:
    """The SEG of the M1 regions, or None when no region has a voxel. ``reference`` is the
    single-volume series the segments are drawn on (the QSM derived MR images)."""
    labels = np.asarray(m1.labels)
    if labels.shape != ctx.shape:
        raise ValueError(f"M1 labels {labels.shape} are not the acquisition {ctx.shape}")
    segments = segments_present(ctx, labels)
    if not segments:
        return None
    frames = frame_stack(labels)  # [k, rows, columns]
    masks = np.stack([frames == s.label for s in segments], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=list(reference),
        further_source_images=[*ctx.sources.echo1(), *ctx.sources.further(include_phase=False)],
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(ctx, s) for s in segments],
        plane_positions=ctx.plane_positions(),
        plane_orientation=ctx.plane_orientation(),
        pixel_measures=ctx.pixel_measures(),
        content_label="M1_REGIONS",
        content_description="M1 hand and foot areas by cortical depth",
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_versions,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        series_description="M1 regions (SEG)",
        coding_schemes=[codes.UBERON_SCHEME],
        **ctx.highdicom_kwargs("seg"),
        **ctx.dates(),
    )
    seg.BodyPartExamined = ctx.body_part
    ctx.write_frame_geometry(seg)
    set_dimension_organization_uid(seg, ctx.uids.uid("seg/dimension-organization"))
    return seg


def segment_numbers(seg: hd.seg.Segmentation) -> dict[tuple[str, str], int]:
    """``(area, layer) → segment number`` of a SEG built here (from its tracking IDs)."""
    out = {}
    for item in seg.SegmentSequence:
        for area in AREAS:
            for layer in LAYERS:
                if item.get("TrackingID") == segment_name(area, layer):
                    out[(area, layer)] = int(item.SegmentNumber)
    return out


__all__ = [
    "AREA_RGB",
    "SegmentInfo",
    "build_segmentation",
    "segment_label",
    "segment_name",
    "segment_numbers",
    "segment_rgb",
    "segments_present",
]
