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
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from qsmnode.qsm.util import bounding_box


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
    dist = ndimage.distance_transform_edt(m, sampling=vs)
    inner = ndimage.binary_erosion(m, structure=face)
    g = _laplacian_abs(f * m, vs)
    deep = inner & (dist > deep_mm)
    if deep.sum() < 100:
        return mask.copy(), 0
    limit = factor * float(np.percentile(g[deep], 99))
    start = int(m.sum())
    steps = max(1, int(np.ceil(max_mm / vs.min())))
    for _ in range(steps):
        inner = ndimage.binary_erosion(m, structure=face)
        second = inner & ~ndimage.binary_erosion(inner, structure=face)
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
