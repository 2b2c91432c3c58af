"""The M1 analysis of one acquisition: the composition of its steps.

1. Tissue segmentation of the slab from magnitude, R2* and χ (``segment``).
2. Registration of the subject to the MNI template, with a masked metric, and the atlas's
   hand and foot areas warped onto the subject (``register``, ``atlas``). With a same-session
   T1w (``SameSessionT1w``) the T1w is registered instead: it shares the GRE's Frame of
   Reference, so both affines map to the same scanner RAS and GRE → T1w is the identity
   given by the geometry; the T1w → template transform is then the GRE's too. When that
   registration fails or its quality is below the acceptable level, the GRE magnitude is
   registered instead, and the result says why (``M1Result.t1w_not_used``).
3. Cortical depth and thickness in the segmented grey matter (``layers``).
4. Measurements per area and layer, coverage and quality flags (``measure``). The
   registration has one flag per acceptance criterion (``registration_nmi``,
   ``registration_mask``), each naming its threshold, and one for the areas' sizes after the
   warp (``registration_areas``: a misregistration the two image figures pass). When a check
   the measures rest on fails
   (``RELIABILITY_CHECKS``: registration, grey/white ratio, cortical thickness; e.g. on a
   phantom sphere or a gross misregistration), the result carries a failed
   ``m1_measures_reliable`` flag saying which, and no z-score.

Arrays in, an ``M1Result`` out. The template and atlas arrive as arrays (``M1Atlas``); reading
them from their packages is the edge's job (``qsmnode.dicom.reference_data``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from qsmnode.acquisition import voxel_size_mm
from qsmnode.m1.atlas import resample_labels
from qsmnode.m1.laterality import laterality_check
from qsmnode.m1.layers import DepthMethod, cortical_layers
from qsmnode.m1.measure import (
    NormativeTable,
    area_coverage,
    measure_m1,
    quality_flags,
    region_labels,
)
from qsmnode.m1.register import Registration, RegistrationParams, register, warp_labels
from qsmnode.m1.result import (
    AREAS,
    RELIABILITY_FLAG,
    M1Result,
    Measurement,
    QualityFlag,
    unreliable_because,
)
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

    @cached_property
    def area_volumes_mm3(self) -> dict[str, float]:
        """Each area's volume in the atlas (mm³), counted once."""
        return area_volumes(self.areas, abs(float(np.linalg.det(self.areas_affine[:3, :3]))))


def area_volumes(labels: NDArray, voxel_mm3: float) -> dict[str, float]:
    """Volume (mm³) of each area of ``AREAS`` in a label volume (``AREAS.index(area) + 1``)."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=len(AREAS) + 1)
    return {area: float(counts[i]) * voxel_mm3 for i, area in enumerate(AREAS, start=1)}


@dataclass(frozen=True)
class SameSessionT1w:
    """A T1-weighted volume of the same session (same Frame of Reference as the GRE).

    ``affine`` maps its voxels to the same scanner RAS as the GRE's affine (the DICOM
    geometry of both series gives it). ``brain_mask`` is the registration's metric mask on
    the T1w grid; without one, the GRE's brain mask resampled onto the T1w grid is used
    (then only the covered brain drives the registration, but with T1 contrast)."""

    image: F32
    affine: NDArray[np.float64]
    brain_mask: NDArray[np.bool_] | None = None


@dataclass(frozen=True)
class M1Params:
    segment: SegmentParams = field(default_factory=SegmentParams)
    registration: RegistrationParams = field(default_factory=RegistrationParams)
    depth_method: DepthMethod = "equivolume"
    min_volume_mm3: float = 20.0
    min_fov_fraction: float = 0.5
    boundary_margin_mm: float = 1.5
    """Width of the area edges left out of the statistics (``measure.area_core``)."""
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
    return area_volumes(warped, step_mm**3)


def register_subject(
    magnitude: F32,
    affine: NDArray[np.float64],
    brain_mask: NDArray[np.bool_],
    atlas: M1Atlas,
    params: RegistrationParams | None = None,
    t1w: SameSessionT1w | None = None,
) -> Registration:
    """The subject-RAS → template transform, from the GRE magnitude or a same-session T1w.

    With a T1w, the transform found for the T1w serves the GRE unchanged: the two series
    share the scanner's RAS (same Frame of Reference), so GRE → T1w is the identity and the
    composition GRE → T1w → template is the T1w's transform."""
    if t1w is None:
        return register(magnitude, affine, brain_mask, atlas.template, atlas.template_affine,
                        params)
    image = np.asarray(t1w.image, dtype=np.float32)
    if image.ndim != 3 or np.shape(t1w.affine) != (4, 4):
        raise ValueError("the T1w must be a 3-D volume with a 4×4 affine")
    if t1w.brain_mask is not None:
        mask = np.asarray(t1w.brain_mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValueError("the T1w brain mask must have the T1w's shape")
    else:
        mask = resample_labels(np.asarray(brain_mask, dtype=np.uint8), affine,
                               image.shape, t1w.affine) > 0
    return register(image, t1w.affine, mask, atlas.template, atlas.template_affine, params)


def registration_flags(reg: Registration, through_t1w: bool) -> tuple[QualityFlag, ...]:
    """One quality flag per acceptance criterion of the registration, each naming its check
    and threshold (so a rejection says which criterion failed): ``registration_nmi`` and
    ``registration_mask``."""
    nmi, mask = reg.checks()
    what = "same-session T1w" if through_t1w else "GRE magnitude"
    return (
        QualityFlag("registration_nmi", nmi.passed, float(nmi.value),
                    f"{nmi.describe()}: of the {what} with the MNI template "
                    f"({'acceptable' if nmi.passed else 'below the acceptable level'})"),
        QualityFlag("registration_mask", mask.passed, float(mask.value),
                    f"{mask.describe()}: {mask.value:.0%} of the brain mask lies inside the "
                    f"template's brain after registration "
                    f"({'acceptable' if mask.passed else 'below the acceptable level'})"),
    )


AREA_SIZE_RANGE = (0.8, 1.25)
"""Allowed size of each area in view after the warp, relative to the others (its warped
volume over its atlas volume, divided by the median of that over the areas in view). A good
warp scales the areas alike: anatomy phantom slabs (poses 1-5, a randomly deformed
template) 0.87-1.07, qsm-forward's vertex slab 0.96-1.03. The misregistration of
``benchmarks/bench_m1_forward.py`` seed 0 before the 8 mm pyramid level (left hand knob 21 mm
off, NMI 1.095 and mask 0.996 passing) shrank the left hand area to 0.77 and grew another to
1.49; the real Philips 3T 3 mm whole head (NMI 1.082) gives 0.93-1.43."""


def area_size_flag(expected_mm3: dict[str, float], atlas_mm3: dict[str, float],
                   in_view: dict[str, bool],
                   size_range: tuple[float, float] = AREA_SIZE_RANGE) -> tuple[QualityFlag, ...]:
    """``registration_areas``: whether the warp kept the areas' relative sizes.

    Args:
        expected_mm3: each area's whole warped volume in the subject (beyond the slab too).
        atlas_mm3: each area's volume in the atlas.
        in_view: whether enough of the area is in the field of view to judge it (an area far
            outside the slab is warped by an unconstrained part of the transform).
        size_range: the allowed relative size (:data:`AREA_SIZE_RANGE`).

    Returns:
        One flag, or none when fewer than two areas are in view.
    """
    judged = [a for a in AREAS if in_view.get(a) and atlas_mm3.get(a, 0) > 0]
    if len(judged) < 2:
        return ()
    scale = {a: expected_mm3[a] / atlas_mm3[a] for a in judged}
    median = float(np.median(list(scale.values())))
    if median <= 0:
        return (QualityFlag("registration_areas", False, None,
                            "the atlas areas vanish after registration"),)
    relative = {a: v / median for a, v in scale.items()}
    worst = max(judged, key=lambda a: abs(np.log(max(relative[a], 1e-6))))
    lo, hi = size_range
    passed = all(lo <= v <= hi for v in relative.values())
    sizes = ", ".join(f"{a} {relative[a]:.2f}" for a in judged)
    text = (f"area sizes after registration relative to their median: {sizes} "
            f"(allowed {lo:g}-{hi:g}; "
            + ("acceptable)" if passed else
               f"{worst} is distorted: the registration misplaced the M1 region)"))
    return (QualityFlag("registration_areas", passed, float(relative[worst]), text),)


LATERALITY_FLAG = "t1w_laterality"
"""The flag of :func:`qsmnode.m1.laterality.laterality_check` (present only with a T1w)."""


def laterality_flags(magnitude: F32, affine: NDArray[np.float64],
                     brain_mask: NDArray[np.bool_], t1w: SameSessionT1w | None,
                     ) -> tuple[QualityFlag, ...]:
    """With a same-session T1w, whether the GRE is mirrored left-right with respect to it
    (:func:`qsmnode.m1.laterality.laterality_check`; a failure makes the measures not
    reliable); nothing without a T1w or when too little of the GRE lies in the T1w's view."""
    if t1w is None:
        return ()
    check = laterality_check(magnitude, affine, brain_mask, t1w.image, t1w.affine)
    if check is None:
        return ()
    return (QualityFlag(LATERALITY_FLAG, check.passed, float(check.difference), check.text()),)


def withhold_if_unreliable(
    measurements: tuple[Measurement, ...], flags: tuple[QualityFlag, ...]
) -> tuple[tuple[Measurement, ...], tuple[QualityFlag, ...]]:
    """When a check the measures rest on failed (:data:`~qsmnode.m1.result.RELIABILITY_CHECKS`):
    the measurements without z-scores (they are not to be compared with anyone's), and the
    flags with a failed ``m1_measures_reliable`` flag naming the failed checks. Otherwise both
    as they are."""
    failed = unreliable_because(flags)
    if not failed:
        return measurements, flags
    return (
        tuple(replace(m, chi_z=None, t2star_signal_ratio_z=None) for m in measurements),
        (*flags, QualityFlag(
            RELIABILITY_FLAG, False, None,
            f"the M1 measures are not reliable ({', '.join(failed)} failed); no z-score is "
            "reported")),
    )


def register_t1w_or_gre(
    magnitude: F32,
    affine: NDArray[np.float64],
    brain_mask: NDArray[np.bool_],
    atlas: M1Atlas,
    params: RegistrationParams | None = None,
    t1w: SameSessionT1w | None = None,
) -> tuple[Registration, str]:
    """The transform through the T1w when one is given and it registers acceptably
    (``Registration.acceptable``), else through the GRE magnitude; and why a given T1w was
    not used ("" when it was, or when none was given)."""
    why_not = ""
    if t1w is not None:
        try:
            reg = register_subject(magnitude, affine, brain_mask, atlas, params, t1w)
        except (ValueError, RuntimeError) as exc:
            why_not = f"its registration to the template failed ({exc})"
        else:
            if reg.acceptable:
                return reg, ""
            why_not = ("its registration to the template is below the acceptable level "
                       f"({reg.rejection()})")
    return register_subject(magnitude, affine, brain_mask, atlas, params), why_not


def analyse_m1(
    chi_ppm: F32,
    r2star_per_s: F32,
    magnitude: F32,
    brain_mask: NDArray[np.bool_],
    affine: NDArray[np.float64],
    atlas: M1Atlas,
    params: M1Params | None = None,
    normative: NormativeTable | None = None,
    t1w: SameSessionT1w | None = None,
) -> tuple[M1Result, dict[str, float]]:
    """Run the M1 analysis; returns the result and the time of each step (s).

    The registration runs in a second thread beside segmentation and layering, so the step
    times overlap and their sum exceeds the wall time.

    Args:
        chi_ppm, r2star_per_s: the QSM engine's χ and R2* maps. χ is all NaN when QSM was
            not computed (a 2-D protocol with slice gaps): the segmentation then works from
            magnitude and R2* (``segment``, "Without χ") and the χ measures are NaN; R2*, the
            T2*-weighted signal ratio and thickness are measured as usual. On thick slices the
            thickness is the layer code's on that anisotropic grid (``qsmnode.pipeline``
            states its limits).
        magnitude: the echo-combined magnitude.
        brain_mask: the QSM brain mask (also the registration's metric mask).
        affine: voxel-to-RAS affine of the acquisition.
        t1w: a same-session T1w to register to the template instead of the magnitude
            (:func:`register_t1w_or_gre`); the GRE is also checked against it for a
            left-right mirror (:func:`laterality_flags`, a reliability check).
    """
    p = params or M1Params()
    vs = voxel_size_mm(affine)
    shape = tuple(int(n) for n in chi_ppm.shape)
    seconds: dict[str, float] = {}

    def locate() -> tuple[Registration, str, NDArray[np.uint8], dict[str, float], float]:
        t = time.perf_counter()
        reg, t1w_not_used = register_t1w_or_gre(magnitude, affine, brain_mask, atlas,
                                                p.registration, t1w)
        warped = warp_labels(reg, atlas.areas, atlas.areas_affine, shape, affine)
        areas = np.where((warped >= 1) & (warped <= len(AREAS)), warped, 0).astype(np.uint8)
        expected = expected_area_volumes(reg, atlas, shape, affine, p.coverage_margin_mm,
                                         p.coverage_grid_mm)
        return reg, t1w_not_used, areas, expected, time.perf_counter() - t

    # The registration (single-threaded, for reproducibility; SimpleITK releases the GIL)
    # runs beside the segmentation and the layers, which do not depend on it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="m1-registration") as pool:
        located = pool.submit(locate)
        t = time.perf_counter()
        seg = segment_tissue(magnitude, r2star_per_s, chi_ppm, brain_mask, vs, p.segment)
        seconds["segmentation"] = time.perf_counter() - t
        t = time.perf_counter()
        layers = cortical_layers(seg.gm, seg.wm, vs, method=p.depth_method)
        seconds["layers"] = time.perf_counter() - t
        reg, t1w_not_used, areas, expected, seconds["registration"] = located.result()

    t = time.perf_counter()
    rule = {"expected_volume_mm3": expected, "min_volume_mm3": p.min_volume_mm3,
            "min_fov_fraction": p.min_fov_fraction}
    measurements = measure_m1(
        areas, seg.gm, layers.depth, layers.thickness_mm, chi_ppm, r2star_per_s,
        seg.corrected_magnitude, vs, normative=normative, depth_method=p.depth_method,
        boundary_margin_mm=p.boundary_margin_mm, **rule,
    )
    coverage = area_coverage(areas, seg.gm, layers.depth, vs, **rule)
    in_view = {a: c.fov_fraction >= p.min_fov_fraction for a, c in coverage.items()}
    flags = (*registration_flags(reg, t1w is not None and not t1w_not_used),
             *area_size_flag(expected, atlas.area_volumes_mm3, in_view),
             *quality_flags(coverage, seg.gm, seg.wm, layers.thickness_mm),
             *laterality_flags(magnitude, affine, brain_mask, t1w))
    measurements, flags = withhold_if_unreliable(measurements, flags)
    labels = region_labels(areas, seg.gm, layers.depth)
    seconds["measurements"] = time.perf_counter() - t
    result = M1Result(
        labels=labels,
        depth=layers.depth.astype(np.float32),
        thickness_mm=layers.thickness_mm.astype(np.float32),
        measurements=measurements,
        flags=flags,
        t1w_not_used=t1w_not_used,
    )
    return result, seconds
