"""The M1 analysis of one acquisition: the composition of its steps.

1. Tissue segmentation of the slab from magnitude, R2* and χ (``segment``).
2. Registration of the subject to the MNI template, with a masked metric, and the atlas's
   hand and foot areas warped onto the subject (``register``, ``atlas``).
3. Cortical depth and thickness in the segmented grey matter (``layers``).
4. Measurements per area and layer, coverage and quality flags (``measure``).

Arrays in, an ``M1Result`` out. The template and atlas arrive as arrays (``M1Atlas``); reading
them from their packages is the edge's job (``qsmnode.dicom.templates``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from qsmnode.acquisition import voxel_size_mm
from qsmnode.m1.layers import DepthMethod, cortical_layers
from qsmnode.m1.measure import (
    NormativeTable,
    area_coverage,
    measure_m1,
    quality_flags,
    region_labels,
)
from qsmnode.m1.register import Registration, RegistrationParams, register, warp_labels
from qsmnode.m1.result import AREAS, M1Result, QualityFlag
from qsmnode.m1.segment import SegmentParams, segment_tissue

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class M1Atlas:
    """The registration target and the M1 areas, in MNI space.

    ``areas`` holds 1..4 for the hand and foot areas in ``AREAS`` order (``atlas.split_areas``),
    5 for the rest of M1 and 0 elsewhere.
    """

    template: F32
    template_affine: NDArray[np.float64]
    areas: NDArray[np.uint8]
    areas_affine: NDArray[np.float64]


@dataclass(frozen=True)
class M1Params:
    segment: SegmentParams = field(default_factory=SegmentParams)
    registration: RegistrationParams = field(default_factory=RegistrationParams)
    depth_method: DepthMethod = "equivolume"
    min_volume_mm3: float = 20.0
    min_fov_fraction: float = 0.5
    coverage_margin_mm: float = 60.0
    """How far beyond the slab the areas are warped to know how much of each lies outside."""
    coverage_grid_mm: float = 2.0


def _extended_grid(
    shape: tuple[int, int, int], affine: NDArray[np.float64], margin_mm: float, step_mm: float
) -> tuple[tuple[int, int, int], NDArray[np.float64]]:
    """A coarse grid of the slab's orientation covering the slab plus a margin."""
    vs = voxel_size_mm(affine)
    rot = affine[:3, :3] / vs
    extent = np.asarray(shape) * vs + 2 * margin_mm
    n = np.ceil(extent / step_mm).astype(int)
    out = np.eye(4)
    out[:3, :3] = rot * step_mm
    corner = affine[:3, :3] @ np.full(3, -0.5) + affine[:3, 3]  # the slab's outer corner
    out[:3, 3] = corner + rot @ np.full(3, -margin_mm + step_mm / 2)
    return (int(n[0]), int(n[1]), int(n[2])), out


def expected_area_volumes(
    registration: Registration,
    atlas: M1Atlas,
    shape: tuple[int, int, int],
    affine: NDArray[np.float64],
    margin_mm: float,
    step_mm: float,
) -> dict[str, float]:
    """Each area's whole volume in the subject (mm³), warped onto a grid beyond the slab."""
    ext_shape, ext_affine = _extended_grid(shape, affine, margin_mm, step_mm)
    warped = warp_labels(registration, atlas.areas, atlas.areas_affine, ext_shape, ext_affine)
    counts = np.bincount(np.asarray(warped).ravel(), minlength=len(AREAS) + 1)
    return {area: float(counts[i]) * step_mm**3 for i, area in enumerate(AREAS, start=1)}


def analyse_m1(
    chi_ppm: F32,
    r2star_per_s: F32,
    magnitude: F32,
    brain_mask: NDArray[np.bool_],
    affine: NDArray[np.float64],
    atlas: M1Atlas,
    params: M1Params | None = None,
    normative: NormativeTable | None = None,
) -> tuple[M1Result, dict[str, float]]:
    """Run the M1 analysis; returns the result and the time of each step (s).

    Args:
        chi_ppm, r2star_per_s: the QSM engine's χ and R2* maps.
        magnitude: the echo-combined magnitude.
        brain_mask: the QSM brain mask (also the registration's metric mask).
        affine: voxel-to-RAS affine of the acquisition.
    """
    p = params or M1Params()
    vs = voxel_size_mm(affine)
    shape = tuple(int(n) for n in chi_ppm.shape)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    seg = segment_tissue(magnitude, r2star_per_s, chi_ppm, brain_mask, vs, p.segment)
    seconds["segmentation"] = time.perf_counter() - t

    t = time.perf_counter()
    reg = register(magnitude, affine, brain_mask, atlas.template, atlas.template_affine,
                   p.registration)
    warped = warp_labels(reg, atlas.areas, atlas.areas_affine, shape, affine)
    areas = np.where((warped >= 1) & (warped <= len(AREAS)), warped, 0).astype(np.uint8)
    expected = expected_area_volumes(reg, atlas, shape, affine, p.coverage_margin_mm,
                                     p.coverage_grid_mm)
    seconds["registration"] = time.perf_counter() - t

    t = time.perf_counter()
    layers = cortical_layers(seg.gm, seg.wm, vs, method=p.depth_method)
    seconds["layers"] = time.perf_counter() - t

    t = time.perf_counter()
    rule = {"expected_volume_mm3": expected, "min_volume_mm3": p.min_volume_mm3,
            "min_fov_fraction": p.min_fov_fraction}
    measurements = measure_m1(
        areas, seg.gm, layers.depth, layers.thickness_mm, chi_ppm, r2star_per_s,
        seg.corrected_magnitude, vs, normative=normative, depth_method=p.depth_method, **rule,
    )
    coverage = area_coverage(areas, seg.gm, layers.depth, vs, **rule)
    registration_flag = QualityFlag(
        "registration_nmi", bool(reg.acceptable), float(reg.quality_nmi),
        f"normalised mutual information {reg.quality_nmi:.3f} with the MNI template "
        f"({'acceptable' if reg.acceptable else 'below the acceptable level'})",
    )
    flags = (registration_flag, *quality_flags(coverage, seg.gm, seg.wm, layers.thickness_mm))
    labels = region_labels(areas, seg.gm, layers.depth)
    seconds["measurements"] = time.perf_counter() - t
    result = M1Result(
        labels=labels,
        depth=layers.depth.astype(np.float32),
        thickness_mm=layers.thickness_mm.astype(np.float32),
        measurements=measurements,
        flags=flags,
    )
    return result, seconds
