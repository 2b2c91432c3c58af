"""QSM (ppm) and R2* (s⁻¹) as Parametric Maps: float32 frames with a Real World Value Mapping.

One multi-frame instance per map, one frame per slice ``k`` of the acquisition, with the plane
geometry of the acquisition affine, written with the very strings of the derived MR images
(:meth:`BuildContext.write_frame_geometry`).

The source images (the first series of the Referenced Series Sequence) are the map's derived MR
series: one image per slice, one volume. A viewer overlays the map on the series it references
first; OHIF 3 loads a multi-echo source as a 4-D cine and then cannot place the map
("Referenced Volume is missing for the PMAP"), and places it only when the orientation strings
are identical. The acquired images (echo-1 magnitude, the other echoes and, for QSM, the phase)
are further sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from qsmnode.dicom.derived.common import (
    DEVICE_SERIAL_NUMBER,
    MODEL_NAME,
    BuildContext,
    set_dimension_organization_uid,
)
from qsmnode.dicom.geometry import frame_stack

UNIT_PPM = Code("ppm", "UCUM", "ppm")
"""The unit of CID 7181 (strict UCUM spells it ``[ppm]``; DICOM's context group uses ``ppm``)."""
UNIT_PER_SECOND = Code("/s", "UCUM", "/s")
"""UCUM for s⁻¹, as in CID 7181."""


@dataclass(frozen=True)
class MapSpec:
    """What distinguishes one parametric map from another."""

    role: str
    content_label: str
    series_description: str
    content_description: str
    lut_label: str
    lut_explanation: str
    unit: Code
    quantity: Code
    window_center: float
    window_width: float
    include_phase: bool
    """Whether the phase images are further sources (QSM) or only the magnitude (R2*)."""


QSM = MapSpec(
    role="qsm-pm",
    content_label="QSM",
    series_description="QSM (ppm)",
    content_description="Quantitative susceptibility map, ppm relative to the reference",
    lut_label="CHI_PPM",
    lut_explanation="Magnetic susceptibility (ppm)",
    unit=UNIT_PPM,
    quantity=codes.DCM.MagneticSusceptibility,
    window_center=0.0,
    window_width=0.3,
    include_phase=True,
)

R2STAR = MapSpec(
    role="r2s-pm",
    content_label="R2STAR",
    series_description="R2* (1/s)",
    content_description="R2* relaxation rate map, 1/s",
    lut_label="R2STAR_PER_S",
    lut_explanation="R2* (1/s)",
    unit=UNIT_PER_SECOND,
    quantity=codes.DCM.R2Star,
    window_center=50.0,
    window_width=100.0,
    include_phase=False,
)


def voi_transformation(center: float, width: float, explanation: str) -> hd.VOILUTTransformation:
    """A window; LINEAR_EXACT below a width of 1, where the LINEAR function's ±0.5 offsets
    would distort it (DOMAIN.md, highdicom traps)."""
    function = hd.VOILUTFunctionValues.LINEAR_EXACT if width < 1 else hd.VOILUTFunctionValues.LINEAR
    return hd.VOILUTTransformation(
        window_center=center,
        window_width=width,
        window_explanation=explanation,
        voi_lut_function=function,
    )


def build_parametric_map(
    ctx: BuildContext,
    volume: NDArray[np.floating],
    spec: MapSpec,
    reference: Sequence[Dataset],
) -> hd.pm.ParametricMap:
    """The Parametric Map of an ``[i, j, k]`` volume on the acquisition grid.

    ``reference`` is the single-volume series the map is shown on (its derived MR images, one
    per slice); it becomes the source images. NaN (outside the mask) is stored as 0.
    """
    if volume.shape != ctx.shape:
        raise ValueError(f"{spec.role}: volume {volume.shape} is not the acquisition {ctx.shape}")
    frames = frame_stack(np.nan_to_num(np.asarray(volume, dtype=np.float32), nan=0.0))
    lo, hi = float(frames.min()), float(frames.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=spec.lut_label,
        lut_explanation=spec.lut_explanation,
        unit=spec.unit,
        value_range=(lo, hi),
        slope=1.0,
        intercept=0.0,
        quantity_definition=spec.quantity,
    )
    pm = hd.pm.ParametricMap(
        source_images=list(reference),
        further_source_images=[*ctx.sources.echo1(), *ctx.sources.further(spec.include_phase)],
        pixel_array=frames,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            voi_transformation(spec.window_center, spec.window_width, spec.lut_explanation)
        ],
        plane_positions=ctx.plane_positions(),
        plane_orientation=ctx.plane_orientation(),
        pixel_measures=ctx.pixel_measures(),
        content_label=spec.content_label,
        content_description=spec.content_description,
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_versions,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        contains_recognizable_visual_features=True,
        series_description=spec.series_description,
        **ctx.highdicom_kwargs(spec.role),
        **ctx.dates(),
    )
    pm.BodyPartExamined = ctx.body_part
    ctx.write_frame_geometry(pm)
    set_dimension_organization_uid(pm, ctx.uids.uid(f"{spec.role}/dimension-organization"))
    return pm
