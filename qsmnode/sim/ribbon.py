"""The simulator's own cortical thickness and depth: flow lines of a closed-form potential.

The phantom's cortex is given by two continuous surfaces, the zero level sets of a white field
``white`` (> 0 inside white matter) and a pial field ``pial`` (> 0 inside grey ∪ white matter),
both close to signed distances (mm), sampled on a grid with trilinear interpolation. Between
them the potential

    u = white / (white − pial)

is 0 on the white surface and 1 on the pial surface and, for distance functions, is the
fraction of the local distance between the two surfaces. Its level sets are the
*equidistant* intermediate surfaces of the level-set layering of Waehnert et al.
(NeuroImage 2014;93:210), and its gradient lines meet the white and the pial surface at right
angles, as the Laplace field lines of Jones et al. (Hum Brain Mapp 2000;11:12) do. The truth
is measured along those lines: at a grey-matter point x the line of T = ∇u/|∇u| is
integrated both ways (second-order Runge–Kutta, step ``step_mm``; the step that crosses a
surface is cut by linear interpolation of that surface's field), inward to the white surface
(length s_in) and outward to the pial surface (s_out).

- **thickness** W = s_in + s_out (mm);
- **equidistant depth** s_out / W (0 at the pial surface, 1 at white matter, the
  ``M1Result`` convention);
- **equivolume depth** (Bok 1929; Waehnert 2014): the volume of the column between the pial
  surface and x over the whole column's volume. A thin tube of lines has a cross-section A(s)
  with d ln A/ds = ∇·T (the divergence of a unit field is the rate of change of the log area
  of a bundle of its lines; on a shell it gives A ∝ r² or r). Both volumes, ∫A ds, are
  integrated along the line (Simpson's rule per step) with the area itself, not with
  Waehnert's linear-in-depth approximation of the area.

Why it measures what the analysis estimates (``qsmnode.m1.layers``: the Laplace equation
solved on the voxel labels, Yezzi–Prince lengths by upwind transport, Waehnert's equivolume
formula with the area ratio from the field lines' divergence), and where the two may
legitimately differ: both measure a curve from the white to the pial surface that meets each
surface at right angles, and both cut the column into equal volumes. On a flat sheet and on
spherical and cylindrical shells (convex or concave) both families of lines are the radial
lines, so both give the closed forms (``tests/test_m1_anatomy.py`` checks this module against
them). In folded cortex they are different curves: u is built from the two distances
algebraically, the Laplace potential solves a PDE over the whole ribbon, so where the two
surfaces are far from parallel (fundi, crowns, the narrowing walls of a sulcus) the lines and
their lengths differ by a few tenths of a millimetre, a disagreement between two legitimate
definitions. Measured at the hand knob of the anatomy phantom against the Laplace /
Yezzi–Prince layering of the same continuous ribbon at 0.5 mm: the lines of u are 0.27 mm
longer on average (median 0.08 mm, MAE 0.34 mm), equivolume depth MAE 0.056. (The white
surface's normal lines, the ``tnormal`` of Lerch & Evans, NeuroImage 2005;24:163, were tried
first: they meet the pial surface obliquely in the folds and came out 0.42 mm longer.)
The analysis's own errors (segmentation, voxel staircase, the oblique anisotropic grid) come
on top.

The algorithm, the grids and the code are the simulator's own: nothing here comes from
``qsmnode.m1``. T and ∇·T are central finite differences of u on the surfaces' grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

F32 = NDArray[np.float32]

_MIN_GAP_MM = 0.25
"""Smallest pial − white gap (mm) in the potential's denominator."""
_U_RANGE = 2.0
"""The potential is clipped to [−2, 3]: far outside the ribbon its value does not matter."""


def trilinear(
    vols: tuple[F32, ...], inv_affine: NDArray[np.float64], q: tuple[F32, F32, F32],
    cval: float, gradient: bool = False,
) -> tuple[list[F32], list[F32] | None]:
    """Trilinear interpolation of volumes on one grid at points (mm), sharing the weights;
    with ``gradient``, also the gradient (per mm) of the volumes' sum. ``cval`` outside."""
    shape = np.array(vols[0].shape)
    c = [
        np.float32(inv_affine[a, 0]) * q[0] + np.float32(inv_affine[a, 1]) * q[1]
        + np.float32(inv_affine[a, 2]) * q[2] + np.float32(inv_affine[a, 3])
        for a in range(3)
    ]
    i0 = [np.floor(v).astype(np.int64) for v in c]
    f = [(v - i).astype(np.float32) for v, i in zip(c, i0, strict=True)]
    valid = np.ones(c[0].shape, dtype=bool)
    for a in range(3):
        valid &= (i0[a] >= 0) & (i0[a] < shape[a] - 1)
        np.clip(i0[a], 0, shape[a] - 2, out=i0[a])
    strides = (shape[1] * shape[2], shape[2], 1)
    base = i0[0] * strides[0] + i0[1] * strides[1] + i0[2]
    g = [1 - f[0], f[0]], [1 - f[1], f[1]], [1 - f[2], f[2]]
    values, grads = [], [np.zeros_like(f[0]) for _ in range(3)] if gradient else None
    for vol in vols:
        flat = vol.reshape(-1)
        out = np.zeros_like(f[0])
        for a in (0, 1):
            for b in (0, 1):
                for d in (0, 1):
                    v = flat[base + (a * strides[0] + b * strides[1] + d)]
                    out += g[0][a] * g[1][b] * g[2][d] * v
                    if grads is not None:
                        sa, sb, sd = (2 * a - 1, 2 * b - 1, 2 * d - 1)
                        grads[0] += sa * g[1][b] * g[2][d] * v
                        grads[1] += g[0][a] * sb * g[2][d] * v
                        grads[2] += g[0][a] * g[1][b] * sd * v
        out[~valid] = np.float32(cval)
        values.append(out)
    if grads is not None:
        m = inv_affine[:3, :3]
        grads = [sum(np.float32(m[a, b]) * grads[a] for a in range(3)) for b in range(3)]
    return values, grads


@dataclass(frozen=True)
class Ribbon:
    """A cortical ribbon given by two continuous surfaces on one grid, with the unit direction
    field T = ∇u/|∇u| of its potential (white → pial) and that field's divergence (per mm)."""

    pial: F32
    white: F32
    direction: tuple[F32, F32, F32]
    divergence: F32
    inv_affine: NDArray[np.float64]

    @classmethod
    def from_fields(cls, pial: F32, white: F32, affine: NDArray[np.float64],
                    smooth_vox: float = 0.0) -> Ribbon:
        """The ribbon of ``pial``/``white`` on the grid ``affine`` (voxel → mm; axis-aligned
        voxels, any spacing). Its direction field is the unit gradient of the potential
        u = white / (white − pial) (0 on the white surface, 1 on the pial surface), after a
        Gaussian smoothing of u by ``smooth_vox`` voxels (0: none)."""
        affine = np.asarray(affine, dtype=np.float64)
        lin = affine[:3, :3]
        if not np.allclose(lin, np.diag(np.diag(lin))):
            raise ValueError("the ribbon's grid must have axis-aligned voxels")
        pial = np.asarray(pial, np.float32)
        white = np.asarray(white, np.float32)
        gap = np.maximum(pial - white, np.float32(_MIN_GAP_MM))
        u = np.clip(-white / gap, -_U_RANGE, 1 + _U_RANGE).astype(np.float32)
        if smooth_vox:
            u = ndimage.gaussian_filter(u, smooth_vox)
        # ∂/∂x in mm along each world axis (a negative spacing flips the axis).
        grad = [np.gradient(u, axis=a) / np.float32(lin[a, a]) for a in range(3)]
        del u, gap
        norm = np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2)
        norm = np.maximum(norm, np.float32(1e-6))
        direction = tuple((g / norm).astype(np.float32) for g in grad)
        del grad, norm
        div = sum(np.gradient(direction[a], axis=a) / np.float32(lin[a, a]) for a in range(3))
        return cls(pial, white, direction, np.asarray(div, np.float32), np.linalg.inv(affine))


@dataclass(frozen=True)
class Layers:
    """Thickness (mm) and depths (0 pial, 1 white matter) at points; NaN where the flow line
    did not reach a surface within the search length."""

    thickness_mm: F32
    depth_equidistant: F32
    depth_equivolume: F32


def _march(ribbon: Ribbon, q: tuple[F32, F32, F32], outward: bool, step_mm: float,
           max_mm: float) -> tuple[F32, F32]:
    """Follow the direction field from each point (outward to the pial surface, or inward to
    the white surface): the length travelled and the column volume ∫A ds, with the
    cross-section A = 1 at the start. NaN where the surface was not reached within
    ``max_mm`` (or the line left the grid).

    Each step is a second-order Runge–Kutta (midpoint) step of length h; the log-area
    (d ln A/ds = ±∇·T) and the volume are integrated with Simpson's rule over the step's
    start, midpoint and end. The step that crosses the surface counts for the fraction of it
    inside, from the linear interpolation of the surface's field between its two ends."""
    n = q[0].size
    length = np.full(n, np.nan, dtype=np.float32)
    volume = np.full(n, np.nan, dtype=np.float32)
    sign = np.float32(1.0 if outward else -1.0)
    h = np.float32(step_mm)
    target = ribbon.pial if outward else ribbon.white
    vols = (*ribbon.direction, ribbon.divergence, target)

    def sample(p: list[F32]) -> tuple[list[F32], F32, F32]:
        """Direction (signed for this march), ±∇·T and the level (> 0 inside) at points."""
        (t0, t1, t2, d, v), _ = trilinear(vols, ribbon.inv_affine, tuple(p), np.nan)
        return [sign * t0, sign * t1, sign * t2], sign * d, (v if outward else -v)

    pos = [c.astype(np.float32).copy() for c in q]
    direction, div, level = sample(pos)
    s = np.zeros(n, dtype=np.float32)
    log_area = np.zeros(n, dtype=np.float32)
    vol = np.zeros(n, dtype=np.float32)
    active = np.flatnonzero(np.isfinite(level))
    for _ in range(int(np.ceil(max_mm / step_mm))):
        if active.size == 0:
            break
        p = [c[active] for c in pos]
        t0 = [c[active] for c in direction]
        d0, f0 = div[active], level[active]
        mid = [p[a] + h / 2 * t0[a] for a in range(3)]
        tm, dm, _ = sample(mid)
        new = [p[a] + h * tm[a] for a in range(3)]
        t1, d1, f1 = sample(new)
        la0 = log_area[active]
        la_mid = la0 + h / 4 * (d0 + dm)
        la1 = la0 + h / 6 * (d0 + 4 * dm + d1)
        dv = h / 6 * (np.exp(la0) + 4 * np.exp(la_mid) + np.exp(la1))
        crossed = ~(f1 > 0)  # NaN (off the grid) stops the line too, unmeasured
        frac = np.ones(active.size, dtype=np.float32)
        hit = crossed & np.isfinite(f1)
        frac[hit] = np.clip(f0[hit] / np.maximum(f0[hit] - f1[hit], np.float32(1e-12)), 0, 1)
        s[active] += h * frac
        vol[active] += dv * frac
        log_area[active] = la1
        for a in range(3):
            pos[a][active] = new[a]
            direction[a][active] = np.nan_to_num(t1[a])
        div[active] = np.nan_to_num(d1)
        level[active] = f1
        ok = active[hit]
        length[ok] = s[ok]
        volume[ok] = vol[ok]
        active = active[~crossed]
    return length, volume


def flow_layers(ribbon: Ribbon, q: tuple[F32, F32, F32], step_mm: float = 0.4,
                  max_mm: float = 8.0) -> Layers:
    """Thickness and depths at points ``q`` (mm, arrays of one shape) of the ribbon's grey
    matter (``pial ≥ 0`` and ``white < 0``; other points give NaN)."""
    shape = np.shape(q[0])
    flat = tuple(np.ravel(c).astype(np.float32) for c in q)
    (p, w), _ = trilinear((ribbon.pial, ribbon.white), ribbon.inv_affine, flat, np.nan)
    inside = (p >= 0) & (w < 0)
    thickness = np.full(flat[0].size, np.nan, dtype=np.float32)
    equidistant = thickness.copy()
    equivolume = thickness.copy()
    if inside.any():
        qi = tuple(c[inside] for c in flat)
        s_out, v_out = _march(ribbon, qi, True, step_mm, max_mm)
        s_in, v_in = _march(ribbon, qi, False, step_mm, max_mm)
        total = s_in + s_out
        thickness[inside] = total
        equidistant[inside] = s_out / np.maximum(total, np.float32(1e-6))
        # v_in was integrated with the area at x as unit, v_out likewise: one column.
        equivolume[inside] = v_out / np.maximum(v_in + v_out, np.float32(1e-9))
    return Layers(thickness.reshape(shape), equidistant.reshape(shape),
                  equivolume.reshape(shape))
