"""Registration of a subject image to an MNI template, and MNI labels warped onto the subject.

Pure numerical code on arrays and affines (SimpleITK, numpy, scipy); the template and atlas
arrays come from ``qsmnode.dicom.reference_data``.

Method (``register``):
- both images go to a working grid of ``resolution_mm`` (2 mm): the subject on its own
  orientation, after smoothing (anti-aliasing) and, optionally, flattening of the receive-field
  bias (division by a masked Gaussian-smoothed copy of itself);
- the transform maps subject RAS mm to template RAS mm, and starts at the identity: the
  subject's affine already maps to RAS, so the DICOM geometry is the initialisation; the head's
  unknown pose is what the registration finds (the whole-head brain prior,
  ``BRAIN_PRIOR_PARAMS``, searches for its start instead: ``RegistrationParams.search_step_deg``);
- metric: Mattes mutual information (so a T2*-weighted magnitude registers to a T1-weighted
  template), evaluated only in the subject's mask (fixed-image mask): a vertex slab covers
  part of the brain, so nothing outside the covered brain pulls the solution;
- stages: rigid (Euler), then affine, each on a 3-level pyramid (8, 4, 2 mm), then a B-spline
  refinement (40 mm control-point spacing, L-BFGS-B, 8000 metric samples) with the same
  metric. The 8 mm level is for a head pitched or rolled in the coil: on qsm-forward's
  MNI head as a 7T vertex slab with the head turned 20° (``benchmarks/bench_m1_forward.py``,
  seed 0), a 4 mm start left the left hand knob 21 mm off (NMI 1.095, passing the check)
  and the left hand area held 3 % of the phantom's changed deep cortex; from 8 mm the knobs
  are 1.4 mm off and the area holds 37 % (43 % with the true pose); anatomy phantom Dice,
  thickness and deep-layer error unchanged, for 1.2 s more. On the anatomy phantom (a
  different template, randomly deformed), affine alone misplaced a hand area in one pose of
  eight (Dice 0.55); with the B-spline every hand area has Dice ≥ 0.75 and every foot area
  ≥ 0.9, for about 5 s more (docs/atlases.md);
- quality figure: the normalised mutual information (Studholme, (H(A) + H(B)) / H(A, B),
  1 = independent, 2 = identical) of subject and warped template in the subject mask, and the
  fraction of the mask that the template's brain covers.

What the quality figures can and cannot catch (measured 2026-12-06, issue 13):
- non-brain input (a water sphere) and a slab far from where its header puts it: the
  registration starts from the DICOM geometry and does not travel far (on the template
  itself, a 50 mm offset ended at NMI 1.024, an 85 mm one at 1.007), so a slab whose header
  puts it on the other hemisphere ends with a low NMI (1.009) rather than on the wrong
  hemisphere with a good one; a lateral slab whose pixels are mirrored left-right (a right
  hemisphere where the scanner says left) fits nowhere (NMI 1.009, mask_in_template 0.86);
  a wrong patient position in the header (a proper rotation of 180 degrees, which the
  registration does not undo): vertex slab with x, z negated (feet first entered for head
  first) NMI 1.008, with x, y negated (prone for supine) 1.041; the lateral slab with x, y
  negated 1.049, and with x, z negated the optimiser leaves the template altogether
  (``RegistrationLost``, a plain reason instead of ITK's "samples map outside" error);
- a slab mirrored left-right about the midline is NOT caught: a proper transform cannot undo
  a mirror, but a brain is nearly symmetric, so the mirror image registers as well (vertex
  slab: NMI 1.125, mask 1.000, as unmirrored). Registering also to the mirrored template
  and comparing (NMI with the template minus NMI with its mirror, rigid + affine) gave no
  usable margin: on the anatomy phantom (built on a symmetric template) ±0.004 either way;
  on real whole-head images, unmirrored / mirrored, Philips GRE +0.002 / -0.001 and
  Siemens T1w -0.001 / -0.000 (+0.014 / -0.001 only with a brain mask taken from the
  unmirrored registration, which favours it). No such check is made: a threshold there
  would reject real brains or pass mirrored ones at random. Nor can any image check catch
  a mirror made consistently in pixels and header (the data then say "the other
  hemisphere"): left and right rest on the DICOM geometry.

``warp_labels`` then samples MNI labels (e.g. the hand and foot areas of
``qsmnode.m1.atlas.split_areas``) at every subject voxel through the transform, by nearest
neighbour.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

F32 = NDArray[np.float32]

MIN_QUALITY_NMI = 1.07
"""Below this NMI a registration is flagged: on the anatomy phantom, registered slabs gave
1.09-1.17 and unregistered or failed ones 1.01-1.04."""
MIN_MASK_IN_TEMPLATE = 0.9
"""Below this fraction of the subject's brain mask inside the template's brain after
registration, a registration is flagged (the subject was not placed on the brain)."""


class RegistrationCheck(NamedTuple):
    """One acceptance criterion of a registration: its name, value, threshold (the value
    must be at least that) and whether it passed."""

    name: str
    value: float
    threshold: float
    passed: bool

    def describe(self) -> str:
        """``mask_in_template 0.850 < 0.9`` (the name, the value, how it compares; ASCII, for
        DICOM text without a character set)."""
        return (f"{self.name} {self.value:.3f} {'>=' if self.passed else '<'} "
                f"{self.threshold:g}")


@dataclass(frozen=True)
class RegistrationParams:
    """Settings of ``register``."""

    resolution_mm: float = 2.0
    """Working grid of the finest level."""
    levels: tuple[int, ...] = (4, 2, 1)
    """Shrink factors of the pyramid, relative to ``resolution_mm``."""
    affine: bool = True
    """After the rigid stage, an affine stage (scales and shears: brain size and shape)."""
    search_step_deg: float = 0.0
    """Angular step (degrees) of a search for the rigid stage's start; 0 = none (the start is
    the DICOM geometry). With a step, the metric is evaluated on the coarsest level at every
    rotation of a grid (``search_steps``) about the mask's centre, after a translation that
    puts the mask's centre on the template brain's (moments); the best ``search_starts``
    rotations, the moments start and the geometry start are each registered rigidly on the
    coarsest level (``search_iterations``), and the best by the metric goes on."""
    search_steps: tuple[int, int, int] = (3, 2, 2)
    """Grid points on each side of zero about the x (left-right: nodding), y (front-back) and z
    (foot-head) axes: (3, 2, 2) with 15 degrees is ±45, ±30, ±30 degrees, 175 rotations."""
    search_starts: int = 2
    """Best grid rotations refined on the coarsest level (besides the two fixed starts)."""
    search_iterations: int = 50
    """Iterations of each start's coarse rigid registration."""
    bspline_mesh_mm: float = 40.0
    """B-spline control-point spacing of the nonlinear refinement (0 = none)."""
    bspline_iterations: int = 50
    bspline_samples: int = 8000
    """Metric samples of the B-spline stage (its cost grows with them)."""
    histogram_bins: int = 32
    sampling_fraction: float = 0.3
    min_samples: int = 20000
    """Levels with few mask voxels sample more of them (up to all): a small slab's coarse
    level is otherwise too noisy to find the optimum."""
    iterations: int = 200
    flatten_bias_mm: float = 25.0
    """σ (mm) of the bias flattening of the subject (0 = none)."""
    threads: int = 1
    """Threads of each registration stage. One, because ITK's Mattes MI sums its joint
    histogram across threads in a varying order: with two, the same input gave different
    transforms run to run (NMI 1.039-1.044 on the tiny preset), and the measurements changed
    with them. ``analyse_m1`` runs the registration beside the segmentation and the layers
    instead, so the second core is not idle."""
    seed: int = 1


@dataclass(frozen=True)
class Registration:
    """The result: ``transform`` maps subject RAS mm to template RAS mm."""

    transform: sitk.Transform
    quality_nmi: float
    """Normalised mutual information in the subject mask (1 = no shared information)."""
    mask_in_template: float
    """Fraction of the subject mask that falls inside the template's brain."""
    metric: float
    """Final Mattes MI metric value (negative: lower is better)."""
    seconds: float
    stage_seconds: tuple[tuple[str, float], ...] = ()
    """Wall time of each stage: prepare, rigid, affine, bspline (0 when skipped)."""

    def checks(self) -> tuple[RegistrationCheck, RegistrationCheck]:
        """The acceptance criteria: normalised mutual information ≥ ``MIN_QUALITY_NMI`` and
        mask_in_template ≥ ``MIN_MASK_IN_TEMPLATE``."""
        return (
            RegistrationCheck("normalised mutual information", self.quality_nmi,
                              MIN_QUALITY_NMI, self.quality_nmi >= MIN_QUALITY_NMI),
            RegistrationCheck("mask_in_template", self.mask_in_template, MIN_MASK_IN_TEMPLATE,
                              self.mask_in_template >= MIN_MASK_IN_TEMPLATE),
        )

    @property
    def acceptable(self) -> bool:
        """Whether every acceptance criterion passes (:meth:`checks`)."""
        return all(check.passed for check in self.checks())

    def rejection(self) -> str:
        """The failing criteria with their thresholds, e.g. ``mask_in_template 0.850 < 0.9``
        ("" when the registration is acceptable)."""
        return "; ".join(c.describe() for c in self.checks() if not c.passed)

    def to_template(self, points_mm: NDArray[np.float64]) -> NDArray[np.float64]:
        """Template RAS mm of subject RAS points ``[n, 3]``."""
        return np.array([self.transform.TransformPoint(tuple(map(float, p)))
                         for p in np.asarray(points_mm, dtype=np.float64)])


def _to_sitk(volume: NDArray, affine: NDArray[np.float64]) -> sitk.Image:
    """A SimpleITK image in RAS mm (SimpleITK needs no LPS: both images share one frame)."""
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(volume, (2, 1, 0))))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(v) for v in a[:3, 3]))
    img.SetDirection(tuple(float(v) for v in (a[:3, :3] / spacing).ravel()))
    return img


def _from_sitk(img: sitk.Image) -> NDArray:
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def _grid_affine(affine: NDArray[np.float64], shape: tuple[int, ...],
                 resolution_mm: float) -> tuple[NDArray[np.float64], tuple[int, int, int]]:
    """A grid of the same orientation and extent with ``resolution_mm`` voxels."""
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    factor = resolution_mm / spacing
    new_shape = tuple(max(1, int(np.ceil(n / f))) for n, f in zip(shape, factor, strict=True))
    out = a.copy()
    out[:3, :3] = a[:3, :3] * factor
    # Keep the grid centred on the same extent.
    centre_old = (np.asarray(shape) - 1) / 2.0
    centre_new = (np.asarray(new_shape) - 1) / 2.0
    out[:3, 3] = a[:3, :3] @ centre_old + a[:3, 3] - out[:3, :3] @ centre_new
    return out, new_shape


def _downsample(volume: F32, affine: NDArray[np.float64], resolution_mm: float,
                order: int = 1) -> tuple[F32, NDArray[np.float64]]:
    """Anti-alias (Gaussian, σ ≈ the new voxel's half width) and resample a volume."""
    new_affine, new_shape = _grid_affine(affine, volume.shape, resolution_mm)
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    sigma = np.maximum(resolution_mm / spacing / 2.5, 0) if order > 0 else 0
    src = ndimage.gaussian_filter(volume.astype(np.float32), sigma) if order > 0 else volume
    m = np.linalg.inv(affine) @ new_affine
    out = ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=new_shape,
                                   order=order, mode="nearest")
    return out, new_affine


def _flatten(image: F32, mask: NDArray[np.bool_], sigma_vox: NDArray) -> F32:
    """Divide out a smooth multiplicative bias: image / (masked Gaussian mean), in the mask."""
    w = ndimage.gaussian_filter(mask.astype(np.float32), sigma_vox)
    m = ndimage.gaussian_filter(np.where(mask, image, 0).astype(np.float32), sigma_vox)
    smooth = m / np.maximum(w, np.float32(1e-3))
    return np.where(mask, image / np.maximum(smooth, np.float32(1e-6)), 0).astype(np.float32)


def normalised_mutual_information(a: F32, b: F32, bins: int = 32) -> float:
    """Studholme's NMI (H(A) + H(B)) / H(A, B) of paired samples: 1 to 2."""
    if a.size < 10:
        return float("nan")
    h, _, _ = np.histogram2d(a, b, bins=bins)
    p = h / h.sum()

    def entropy(q: NDArray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    joint = entropy(p)
    return (entropy(p.sum(axis=0)) + entropy(p.sum(axis=1))) / joint if joint > 0 else 1.0


def _method(params: RegistrationParams, fixed_mask: sitk.Image, n_mask: int,
            levels: tuple[int, ...] | None = None) -> sitk.ImageRegistrationMethod:
    levels = params.levels if levels is None else levels
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=params.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    fractions = [float(np.clip(params.min_samples * f**3 / max(n_mask, 1),
                               params.sampling_fraction, 1.0)) for f in levels]
    reg.SetMetricSamplingPercentagePerLevel(fractions, params.seed)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(levels))
    reg.SetSmoothingSigmasPerLevel([0.5 * (f - 1) * params.resolution_mm for f in levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


class RegistrationLost(ValueError):
    """The registration's optimiser carried the subject off the template (ITK: "All samples
    map outside moving image buffer"): a gross misplacement of the input, e.g. a wrong
    patient position or slab position in the DICOM header, not a transient error."""


def _execute(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image,
             stage: str) -> None:
    """``reg.Execute``, with ITK's no-overlap error as a :class:`RegistrationLost` in plain
    words (ASCII: the text may reach a DICOM report); other errors as they are."""
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        if "overlap" not in str(exc):
            raise
        raise RegistrationLost(
            f"the registration to the MNI template failed at its {stage} stage: the subject "
            "image no longer overlapped the template (a gross misplacement; check the slab "
            "and patient position in the DICOM header)") from None


def _linear_stage(params: RegistrationParams, fixed_mask: sitk.Image, n_mask: int,
                  fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                  learning_rate: float, stage: str = "linear",
                  levels: tuple[int, ...] | None = None, iterations: int | None = None) -> float:
    """One rigid or affine stage on the pyramid (regular-step gradient descent, scales from
    physical shifts); optimises ``transform`` in place and returns the final metric.
    ``levels`` and ``iterations`` default to the parameters'."""
    reg = _method(params, fixed_mask, n_mask, levels=levels)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=1e-3,
        numberOfIterations=params.iterations if iterations is None else iterations,
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    _execute(reg, fixed, moving, stage)
    return float(reg.GetMetricValue())


def _searched_rigid_start(params: RegistrationParams, fixed_mask: sitk.Image, n_mask: int,
                          fixed: sitk.Image, moving: sitk.Image, centre: NDArray[np.float64],
                          shift: NDArray[np.float64]) -> sitk.Euler3DTransform:
    """The rigid start picked by a search (``RegistrationParams.search_step_deg``).

    1. The metric at every rotation of the grid (ITK's exhaustive optimiser) on the coarsest
       level, about ``centre``, with translation ``shift`` (moments: mask centre onto the
       template brain's centre).
    2. The ``search_starts`` best grid rotations, the moments start (no rotation, ``shift``)
       and the geometry start (identity) are each registered rigidly on the coarsest level for
       ``search_iterations`` iterations.
    3. The one with the lowest (best) metric is returned; the caller finishes the rigid stage.
    When a grid rotation carries the image off the template (ITK stops the search), only the
    two fixed starts are refined.

    A multi-start global search in the spirit of FSL FLIRT's coarse rotation search
    (Jenkinson & Smith 2001, Med Image Anal 5:143): a gradient descent from the geometry alone
    turns a head only slowly (on the phantom head turned about 40 degrees from the template,
    200 iterations at 8 mm turned it back by 3-5 degrees) and ends in a local optimum when it
    starts far off. The geometry and moments starts stay among the candidates because the
    coarse grid can mislead: on the Philips head the grid's best rotation (15 degrees
    nodding) was the wrong way, and the moments start won after its refinement.

    Args:
        params: the registration's settings (its ``search_*`` fields, ``levels[0]``).
        fixed_mask, n_mask, fixed, moving: as for :func:`_linear_stage`.
        centre: rotation centre (RAS mm): the mask's centre.
        shift: translation of the moments start (mm).

    Returns:
        The best start's Euler transform, registered on the coarsest level.
    """
    coarse = (params.levels[0],)
    start = sitk.Euler3DTransform()
    start.SetCenter(tuple(float(c) for c in centre))
    start.SetTranslation(tuple(float(v) for v in shift))
    reg = _method(params, fixed_mask, n_mask, levels=coarse)
    reg.SetOptimizerAsExhaustive(numberOfSteps=[int(n) for n in params.search_steps] + [0, 0, 0],
                                 stepLength=float(np.deg2rad(params.search_step_deg)))
    reg.SetOptimizerScales([1.0] * 6)
    reg.SetInitialTransform(start, inPlace=False)
    grid: list[tuple[float, tuple[float, ...]]] = []
    reg.AddCommand(sitk.sitkIterationEvent,
                   lambda: grid.append((reg.GetMetricValue(), tuple(reg.GetOptimizerPosition()))))
    try:
        _execute(reg, fixed, moving, "start search")
    except RegistrationLost:  # a far rotation left the template: the fixed starts remain
        grid.clear()
    grid.sort(key=lambda g: g[0])
    starts = [position for _, position in grid[:params.search_starts]]
    starts += [(0.0, 0.0, 0.0, *map(float, shift)), (0.0,) * 6]
    best: tuple[float, sitk.Euler3DTransform] | None = None
    for position in starts:
        rigid = sitk.Euler3DTransform()
        rigid.SetCenter(tuple(float(c) for c in centre))
        rigid.SetParameters(tuple(float(v) for v in position))
        try:
            metric = _linear_stage(params, fixed_mask, n_mask, fixed, moving, rigid,
                                   learning_rate=2.0, stage="rigid (start search)",
                                   levels=coarse, iterations=params.search_iterations)
        except RegistrationLost:
            continue
        if best is None or metric < best[0]:
            best = (metric, rigid)
    if best is None:
        raise RegistrationLost(
            "the registration to the MNI template failed at its start search: from every "
            "start the subject image left the template (a gross misplacement; check the slab "
            "and patient position in the DICOM header)")
    return best[1]


def register(
    subject: F32,
    subject_affine: NDArray[np.float64],
    subject_mask: NDArray[np.bool_],
    template: F32,
    template_affine: NDArray[np.float64],
    params: RegistrationParams | None = None,
) -> Registration:
    """Register a subject image to a template image.

    ``subject`` is any image whose contrast relates to the template's (mutual information):
    the T2*-weighted magnitude (RMS over echoes registers best), or a synthetic T1-like image
    from a tissue segmentation. ``subject_mask`` is the covered brain (e.g. the QSM brain
    mask). The template is a brain-extracted image (0 outside the brain).
    Sets SimpleITK's global thread count to ``params.threads`` (the registration method's own
    thread setting leaves its pyramid and metric filters threaded, and the transform then
    differed by 1e-9 mm run to run); the same input then gives the same transform.

    Raises:
        ValueError: the mask is (nearly) empty; :class:`RegistrationLost` (a ValueError)
            when the optimiser carries the subject off the template."""
    params = params or RegistrationParams()
    t0 = time.perf_counter()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(params.threads)
    res = params.resolution_mm
    subj, subj_aff = _downsample(subject, subject_affine, res)
    mask, _ = _downsample(subject_mask.astype(np.float32), subject_affine, res)
    mask = mask > 0.5
    n_mask = int(mask.sum())
    if n_mask < 100:
        raise ValueError(f"the subject mask has {n_mask} voxels at {res} mm: nothing to register")
    if params.flatten_bias_mm > 0:
        subj = _flatten(subj, mask, np.full(3, params.flatten_bias_mm / res))
    tmpl, tmpl_aff = _downsample(template, template_affine, res)
    fixed = _to_sitk(subj.astype(np.float32), subj_aff)
    fixed_mask = _to_sitk(mask.astype(np.uint8), subj_aff)
    moving = _to_sitk(tmpl.astype(np.float32), tmpl_aff)

    stages = [("prepare", time.perf_counter() - t0)]
    # Rigid, rotating about the covered brain's centre: from the geometry (identity), or from
    # the best of a start search.
    centre = subj_aff[:3, :3] @ np.argwhere(mask).mean(axis=0) + subj_aff[:3, 3]
    rigid_levels = params.levels
    if params.search_step_deg > 0:
        brain_centre = tmpl_aff[:3, :3] @ np.argwhere(tmpl > 0).mean(axis=0) + tmpl_aff[:3, 3]
        rigid = _searched_rigid_start(params, fixed_mask, n_mask, fixed, moving, centre,
                                      brain_centre - centre)
        rigid_levels = params.levels[1:] or params.levels
        stages.append(("search", time.perf_counter() - t0 - sum(v for _, v in stages)))
    else:
        rigid = sitk.Euler3DTransform()
        rigid.SetCenter(tuple(float(c) for c in centre))
    metric = _linear_stage(params, fixed_mask, n_mask, fixed, moving, rigid, learning_rate=2.0,
                           stage="rigid", levels=rigid_levels)
    transform: sitk.Transform = rigid

    stages.append(("rigid", time.perf_counter() - t0 - sum(v for _, v in stages)))
    if params.affine:
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        metric = _linear_stage(params, fixed_mask, n_mask, fixed, moving, affine,
                               learning_rate=1.0, stage="affine")
        transform = affine

    stages.append(("affine", time.perf_counter() - t0 - sum(v for _, v in stages)))
    if params.bspline_mesh_mm > 0:
        extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
        mesh = [max(1, round(float(e) / params.bspline_mesh_mm)) for e in extent]
        bspline = sitk.BSplineTransformInitializer(fixed, mesh)
        reg = _method(params, fixed_mask, n_mask, levels=(1,))
        reg.SetMetricSamplingPercentage(min(1.0, params.bspline_samples / n_mask), params.seed)
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                                 numberOfIterations=params.bspline_iterations,
                                 maximumNumberOfCorrections=5,
                                 maximumNumberOfFunctionEvaluations=2 * params.bspline_iterations)
        reg.SetMovingInitialTransform(transform)
        reg.SetInitialTransform(bspline, inPlace=True)
        _execute(reg, fixed, moving, "B-spline")
        metric = reg.GetMetricValue()
        transform = sitk.CompositeTransform([transform, bspline])

    stages.append(("bspline", time.perf_counter() - t0 - sum(v for _, v in stages)))
    warped = _from_sitk(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    inside = _from_sitk(sitk.Resample(_to_sitk((tmpl > 0).astype(np.uint8), tmpl_aff), fixed,
                                      transform, sitk.sitkNearestNeighbor, 0)) > 0
    overlap = mask & inside
    nmi = normalised_mutual_information(subj[overlap], warped[overlap])
    return Registration(
        transform=transform,
        quality_nmi=float(nmi),
        mask_in_template=float(overlap.sum() / max(int(mask.sum()), 1)),
        metric=float(metric),
        seconds=time.perf_counter() - t0,
        stage_seconds=tuple(stages),
    )


def _reference(shape: tuple[int, ...], affine: NDArray[np.float64],
               pixel: int = sitk.sitkUInt8) -> sitk.Image:
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    ref = sitk.Image([int(n) for n in shape], pixel)
    ref.SetSpacing(tuple(float(s) for s in spacing))
    ref.SetOrigin(tuple(float(v) for v in a[:3, 3]))
    ref.SetDirection(tuple(float(v) for v in (a[:3, :3] / spacing).ravel()))
    return ref


def warp_labels(
    registration: Registration,
    labels: NDArray,
    labels_affine: NDArray[np.float64],
    shape: tuple[int, int, int],
    affine: NDArray[np.float64],
    field_mm: float = 2.0,
) -> NDArray:
    """Template-space labels on the subject grid (nearest neighbour; 0 where they are not).

    A nonlinear transform is first sampled as a displacement field on a ``field_mm`` grid
    over the subject's (linear interpolation between its nodes is far below the voxel size
    for a smooth transform): evaluating a B-spline at millions of fine voxels is slow."""
    transform = registration.transform
    if field_mm > 0 and transform.GetName() not in ("Euler3DTransform", "AffineTransform"):
        f_aff, f_shape = _grid_affine(affine, shape, field_mm)
        f_shape = tuple(n + 2 for n in f_shape)
        f_aff = f_aff.copy()
        f_aff[:3, 3] -= f_aff[:3, :3] @ np.ones(3)
        ref = _reference(f_shape, f_aff)
        disp = sitk.TransformToDisplacementField(
            transform, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
            ref.GetSpacing(), ref.GetDirection())
        transform = sitk.DisplacementFieldTransform(disp)
    src = _to_sitk(np.asarray(labels).astype(np.uint8), labels_affine)
    out = sitk.Resample(src, _reference(shape, affine), transform, sitk.sitkNearestNeighbor, 0)
    return _from_sitk(out).astype(np.asarray(labels).dtype)


BRAIN_PRIOR_PARAMS = RegistrationParams(resolution_mm=4.0, levels=(2, 1), bspline_mesh_mm=0.0,
                                        search_step_deg=15.0)
"""Registration for :func:`template_brain_prior` (issue 11, 2026-12-07): a start search
(rotations on a 15 degree grid at 8 mm, ±45 degrees nodding, ±30 about the other axes; the two
best, the moments start and the geometry start refined at 8 mm), then rigid and affine each
at 8 then 4 mm; no B-spline. Measured on the qsm-forward head whose scalp touches the brain
(2 mm, skull 1 mm; three seeds/tilts, each as simulated, with its head mask eroded or dilated
by a voxel, and turned by ±15 degrees or by 20 degrees and 28 mm: 18 cases): NMI 1.200-1.215,
prior Dice 0.938-0.942 against the true brain, restricted mask Dice 0.984-0.985, 2.7-16 s
(load 3-7). The one-level registration (4 mm, from the geometry; in
``benchmarks/bench_brain_prior.py``) was rejected in 10 of those 18 (NMI 1.026-1.058,
priors 930-2005 mL, Dice 0.64-0.90) and two more passed off the optimum (NMI 1.10 and 1.13,
Dice 0.86 and 0.93). On the Philips 3T head, as acquired,
with its mask eroded or dilated, turned ±15 degrees or 20 degrees and 28 mm: NMI
1.116-1.120, prior 1405-1465 mL (one-level: 1.084-1.120, 1271-1481 mL).
What did not help: the same search with the affine on the 4 mm level alone (its first steps
grew the template over the head in 10 of 12 phantom cases, NMI 1.02-1.06); refining only
the grid's best rotation (on the Philips head it was the wrong one)."""


def template_brain_prior(
    image: F32,
    affine: NDArray[np.float64],
    head_mask: NDArray[np.bool_],
    template: F32,
    template_affine: NDArray[np.float64],
    params: RegistrationParams = BRAIN_PRIOR_PARAMS,
) -> tuple[NDArray[np.bool_], Registration]:
    """The template's brain carried onto a subject image: a brain prior for masking.

    Atlas-based brain extraction (Iglesias 2011, ROBEX; the registration step of ANTs'
    ``antsBrainExtraction``): :func:`register` the subject (e.g. the first-echo magnitude),
    with its whole-head signal mask as the metric mask, to the brain-extracted template; then
    :func:`warp_labels` the template's brain (``template > 0``) back onto the subject grid.
    The mutual information pairs the template's zero exterior with scalp and skull, so the
    brain's outline is what aligns.

    Args:
        image: subject image ``[i, j, k]``.
        affine: its voxel-to-RAS affine.
        head_mask: the subject's signal mask (head), the registration's metric mask.
        template: brain-extracted template (0 outside the brain).
        template_affine: its affine.
        params: registration settings (default :data:`BRAIN_PRIOR_PARAMS`).

    Returns:
        The prior (bool, on the subject grid) and the registration (for its quality).

    Raises:
        ValueError: as :func:`register` (empty mask, :class:`RegistrationLost`).
    """
    registration = register(image, affine, head_mask, template, template_affine, params)
    brain = (np.asarray(template) > 0).astype(np.uint8)
    prior = warp_labels(registration, brain, template_affine,
                        tuple(int(n) for n in image.shape[:3]), affine) > 0  # type: ignore[arg-type]
    return prior, registration


def brain_prior_function(
    affine: NDArray[np.float64],
    template: F32,
    template_affine: NDArray[np.float64],
    params: RegistrationParams = BRAIN_PRIOR_PARAMS,
) -> Callable[[F32, NDArray[np.bool_]], NDArray[np.bool_]]:
    """A ``brain_prior`` for :func:`qsmnode.qsm.engine.run_qsm`, which knows no affine nor
    template: ``f(image, head_mask)`` is :func:`template_brain_prior`'s prior for an image on
    the grid of ``affine``.

    Args:
        affine: the subject grid's voxel-to-RAS affine.
        template: brain-extracted template (e.g. ``M1Atlas.template``).
        template_affine: its affine.
        params: registration settings (default :data:`BRAIN_PRIOR_PARAMS`).

    Returns:
        The function. It raises ``ValueError`` when the registration fails or its normalised
        mutual information is below :data:`MIN_QUALITY_NMI` (then the prior is not used).
    """

    def prior(image: F32, head_mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
        brain, registration = template_brain_prior(image, affine, head_mask, template,
                                                   template_affine, params)
        if registration.quality_nmi < MIN_QUALITY_NMI:
            raise ValueError(f"registration to the template for the brain prior: normalised "
                             f"mutual information {registration.quality_nmi:.3f} < "
                             f"{MIN_QUALITY_NMI:g}")
        return brain

    return prior
