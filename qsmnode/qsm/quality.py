"""Phase reliability: find voxels whose unwrapped phase cannot be trusted, and repair the field.

Two symptoms mark them (the same quantities ROMEO's quality map uses, Dymerska 2021):

- a *spatial* one: an unwrapped template that still jumps by more than π to a neighbour. Either
  the true gradient exceeds π per voxel (the phase is aliased, typically next to the sinuses)
  or the unwrapper had to cut there; both sides of such a cut are suspect;
- a *temporal* one: a large residual of the linear field fit over echoes (a temporal
  unwrapping error, flow, or noise).

:func:`repair_field` drops the unreliable voxels, keeps the largest connected reliable region
(so islands unwrapped with the wrong 2π multiple, which the cut isolates, are removed), puts
back enclosed holes (veins, dark nuclei) and fills their field by normalised convolution
(Knutsson & Westin 1993) from the reliable neighbours, so one outlier of a few ppm cannot spread
through the background removal and the dipole inversion.

:func:`map_ranges` is the plausibility gate after the whole run: a χ map or field so flat that
it cannot come from a head (for example a phase that carries no field) is not a result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from qsmnode.qsm.util import bounding_box, erode_faces, farther_than


@dataclass(frozen=True)
class RepairParams:
    """Which voxels of the fitted field are unreliable, to be dropped or filled
    (:func:`phase_jumps`, :func:`residual_outliers`, :func:`repair_field`).

    Attributes:
        jump_limit_rad: a jump of the unwrapped template to a neighbour above it (rad);
            default π.
        residual_floor_rad: a fit residual above ``max(residual_floor_rad, residual_factor ×
            its median in the mask)`` is an outlier (rad); default 1.
        residual_factor: see ``residual_floor_rad``; default 10.
    """

    jump_limit_rad: float = float(np.pi)
    residual_floor_rad: float = 1.0
    residual_factor: float = 10.0


@dataclass(frozen=True)
class PeelParams:
    """Outer mask layers holding strong sources (bone/air partial volume) are peeled before
    background removal or inversion (:func:`peel_source_layers`).

    Attributes:
        factor: a layer is hot above this times the deep 99th percentile of ``|∇²f|``;
            default 1.
        max_mm: peel at most this depth (mm); default 4.
    """

    factor: float = 1.0
    max_mm: float = 4.0


def phase_jumps(
    unwrapped: NDArray[np.floating], mask: NDArray[np.bool_], limit: float = np.pi
) -> NDArray[np.bool_]:
    """Mask voxels with a face neighbour in the mask whose phase differs by more than ``limit``."""
    u = np.asarray(unwrapped, dtype=np.float32)
    out = np.zeros(u.shape, dtype=bool)
    for axis in range(u.ndim):
        lo = [slice(None)] * u.ndim
        hi = [slice(None)] * u.ndim
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        lo_t, hi_t = tuple(lo), tuple(hi)
        jump = (np.abs(u[hi_t] - u[lo_t]) > limit) & mask[hi_t] & mask[lo_t]
        out[lo_t] |= jump
        out[hi_t] |= jump
    return out


def residual_outliers(
    residual_rad: NDArray[np.floating],
    mask: NDArray[np.bool_],
    floor_rad: float = 1.0,
    factor: float = 10.0,
) -> NDArray[np.bool_]:
    """Voxels whose field-fit residual exceeds ``max(floor_rad, factor × median in mask)``."""
    inside = residual_rad[mask]
    if inside.size == 0:
        return np.zeros(mask.shape, bool)
    limit = max(floor_rad, factor * float(np.median(inside)))
    return mask & (residual_rad > limit)


def repair_field(
    field_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    unreliable: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    sigma_mm: float = 1.5,
) -> tuple[NDArray[np.float32], NDArray[np.bool_], int]:
    """Field with unreliable voxels removed or filled; the new mask; how many were filled.

    The reliable part's largest component is kept; holes enclosed by it (within the original
    mask) are filled with the normalised Gaussian average (``sigma_mm``) of reliable neighbours,
    repeated with a doubled width where that average is undefined.
    """
    good = mask & ~unreliable
    labels, n = ndimage.label(good)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        good = labels == int(np.argmax(sizes))
    new_mask = ndimage.binary_fill_holes(good) & mask  # 3-D only: enclosed holes
    holes = new_mask & ~good
    out = np.where(good, np.asarray(field_ppm, np.float32), np.float32(0.0))
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    todo = holes.copy()
    sigma = sigma_mm
    while todo.any() and sigma < 50.0:
        w = good.astype(np.float32)
        num = ndimage.gaussian_filter(out * w, sigma / vs, mode="constant")
        den = ndimage.gaussian_filter(w, sigma / vs, mode="constant")
        ok = todo & (den > 1e-3)
        out[ok] = num[ok] / den[ok]
        todo &= ~ok
        sigma *= 2.0
    new_mask &= ~todo
    out[~new_mask] = 0.0
    return out, new_mask, int(holes.sum())


def _laplacian_abs(field: NDArray[np.float32], vs: NDArray[np.float64]) -> NDArray[np.float32]:
    out = np.zeros_like(field)
    for axis, h in enumerate(vs):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        d = field[tuple(hi)] - field[tuple(lo)]
        d *= np.float32(1.0 / (h * h))
        out[tuple(lo)] += d
        out[tuple(hi)] -= d
    return np.abs(out, out=out)


def peel_source_layers(
    field_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    *,
    max_mm: float = 4.0,
    factor: float = 1.0,
    deep_mm: float = 8.0,
    min_fraction: float = 0.05,
) -> tuple[NDArray[np.bool_], int]:
    """Peel outer mask layers that hold strong susceptibility sources (bone/air partial volume).

    Inside the mask, background fields are harmonic, so ``|∇²f|`` measures local sources
    (``∇²f = (⅓∇² − ∂²_b) χ``). A magnitude mask that reaches the skull has an outer rim where
    ``|∇²f|`` is several times its level in brain tissue. Layer by layer, boundary voxels are
    removed where the mean ``|∇²f|`` over their interior neighbours (3×3×3) exceeds ``factor``
    × the 99th percentile deeper than ``deep_mm``; the hot interior voxels of that outer layer
    go with them. Stops when fewer than ``min_fraction`` of the boundary is hot, or after
    ``max_mm``. Returns the new mask and the number of voxels removed.
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    box = bounding_box(mask, margin=2)
    m = np.ascontiguousarray(mask[box], dtype=bool)
    f = np.asarray(field_ppm[box], dtype=np.float32)
    face = ndimage.generate_binary_structure(3, 1)
    inner = erode_faces(m)
    g = _laplacian_abs(f * m, vs)
    deep = inner & farther_than(m, vs, deep_mm)
    if deep.sum() < 100:
        return mask.copy(), 0
    limit = factor * float(np.percentile(g[deep], 99))
    start = int(m.sum())
    steps = max(1, int(np.ceil(max_mm / vs.min())))
    for _ in range(steps):
        inner = erode_faces(m)
        second = inner & ~erode_faces(inner)
        boundary = m & ~inner
        g = _laplacian_abs(f * m, vs) * inner
        cnt = ndimage.uniform_filter(inner.astype(np.float32), 3)
        mean_g = np.zeros_like(g)
        np.divide(ndimage.uniform_filter(g, 3), cnt, out=mean_g, where=cnt > 0)
        hot_boundary = boundary & (mean_g > limit)
        if hot_boundary.sum() < min_fraction * boundary.sum():
            break
        hot_second = second & (mean_g > limit) & ndimage.binary_dilation(hot_boundary, face)
        m &= ~(hot_boundary | hot_second)
    out = np.zeros(mask.shape, bool)
    out[box] = m
    return out, start - int(m.sum())


CHI_RANGE_FLOOR_PPM = 0.005
"""Smallest plausible spread of χ inside the QSM mask, from its 1st to its 99th percentile
(ppm). A normal run spans about ±0.1..±0.3 ppm (grey and white matter, iron-rich nuclei,
veins); a phase that carries no field gives exactly 0, and a method that fails on its grid
gives next to nothing. Measured 1st..99th percentile spreads (ppm) of χ / local field in the
QSM mask / total field in the brain mask, through ``run_pipeline`` (QSM only, single-step TV,
the default until 2026-12-07, unless named):

- the real ROMEO 3 T 3-echo head (``romeo-3echo-nifti/small``, 0.47 × 0.47 × 1 mm,
  ``run_qsm``): 0.509 / 0.118 / 1.35.
- the real Philips 3 T 2-echo sample (``philips-3t-2echo/classic``, 3 mm, its brain mask
  restricted by the template prior): 0.172 / 0.054 / 1.12 (with the former magnitude-only
  mask, which held the skull: 2.93 / 0.723 / 3.44; PDF + TV-ADMM 4.56 / 0.887;
  RESHARP+LBV + TV-ADMM 2.73 / 0.677; + TKD 2.39 / 0.677).
- the simulator's slabs: ``preset("small-slab")`` 0.064 / 0.024 / 0.179; the anatomy phantom
  on it (the fault and T1w tests) 0.061 / 0.025 / 0.259.
- ``preset("tiny")`` (7 T, 3 × 3 × 3.6 mm): 0.023 / 0.014 / 0.609 (PDF + TV-ADMM 0.244 /
  0.052; RESHARP+LBV + TV-ADMM 0.063 / 0.026; + TKD 0.078 / 0.026).
- the node tests' QSM grid (``tests.nodeutil.QSM_SCAN``: the tiny preset's field of view on
  56 × 68 × 12 voxels of 3 × 3 × 12 mm, any vendor style): 0.037 / 0.023 / 0.580; the 2-D
  gap test's 24 × 28 × 12 at 3 mm: 0.015 / 0.032 / 0.088.

The floor is 3× below the lowest of these (the 2-D gap test's small grid), 4.6× below the tiny
preset and 34× below real heads. Grids with 4..7 mm voxels in-plane fall below it with
single-step TV, whose χ there is nearly flat: ``tests.nodeutil.SMALL_SCAN`` (24 × 28 × 12
voxels of 7 × 7 × 12 mm) 0.00095 / 0.00047 (other methods 0.17..0.35 ppm; the default TFI
0.158 / 0.049), 4 × 4 × 6 mm
(42 × 50 × 24) 0.0037, 5 × 5 × 8 mm 0.0019..0.0028 (3.5 × 3.5 × 12 mm: 0.0099). Such a map
is refused, as it should be: it says nothing about the tissue."""

FIELD_RANGE_FLOOR_PPM = 0.002
"""Smallest plausible 1st..99th percentile spread of the local field (inside the QSM mask)
and of the total field (inside the brain mask), ppm: 7× below the lowest measured on a grid
QSM works on (local field 0.014 ppm, the tiny preset; see :data:`CHI_RANGE_FLOOR_PPM`; real
heads 0.054..0.118 ppm). A field below it is constant: the phase held no field information."""


@dataclass(frozen=True)
class MapRange:
    """The spread of one map inside its mask, against the plausibility floor.

    Attributes:
        what: the map's name in plain words ("susceptibility (χ)", "local field", ...).
        region: where it was measured ("the χ mask": where χ is defined, "the brain mask").
        p1_ppm, p99_ppm: 1st and 99th percentiles of the finite values there (0 when none).
        voxels: finite voxels measured.
        floor_ppm: the smallest plausible ``p99_ppm - p1_ppm``.
    """

    what: str
    region: str
    p1_ppm: float
    p99_ppm: float
    voxels: int
    floor_ppm: float

    @property
    def span_ppm(self) -> float:
        return self.p99_ppm - self.p1_ppm

    @property
    def flat(self) -> bool:
        """Implausibly flat: spread below the floor, or nothing to measure."""
        return self.voxels == 0 or not self.span_ppm >= self.floor_ppm

    def text(self) -> str:
        """Plain words: what was measured and against which floor."""
        if self.voxels == 0:
            return f"the {self.what} has no voxels inside {self.region}"
        return (f"the {self.what} inside {self.region} spans {self.span_ppm:.3g} ppm from its "
                f"1st to its 99th percentile ({self.p1_ppm:.3g} to {self.p99_ppm:.3g} ppm, "
                f"{self.voxels} voxels), below the plausibility floor of {self.floor_ppm:g} ppm")


def map_range(values: NDArray[np.floating], mask: NDArray[np.bool_], what: str, region: str,
              floor_ppm: float) -> MapRange:
    """The 1st..99th percentile spread of ``values`` over the finite voxels of ``mask``."""
    inside = np.asarray(values)[np.asarray(mask, dtype=bool)]
    inside = inside[np.isfinite(inside)]
    if inside.size == 0:
        return MapRange(what, region, 0.0, 0.0, 0, floor_ppm)
    p1, p99 = np.percentile(inside, [1.0, 99.0])
    return MapRange(what, region, float(p1), float(p99), int(inside.size), floor_ppm)


def map_ranges(
    chi_ppm: NDArray[np.floating],
    qsm_mask: NDArray[np.bool_],
    local_field_ppm: NDArray[np.floating],
    total_field_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    *,
    chi_floor_ppm: float = CHI_RANGE_FLOOR_PPM,
    field_floor_ppm: float = FIELD_RANGE_FLOOR_PPM,
) -> tuple[MapRange, MapRange, MapRange]:
    """The spreads of χ and the local field inside ``qsm_mask`` and of the total field inside
    ``mask``, each with its floor; a result with any :attr:`MapRange.flat` is not plausible."""
    return (
        map_range(chi_ppm, qsm_mask, "susceptibility (χ) map", "the χ mask", chi_floor_ppm),
        map_range(local_field_ppm, qsm_mask, "local field", "the χ mask", field_floor_ppm),
        map_range(total_field_ppm, mask, "total field", "the brain mask", field_floor_ppm),
    )
