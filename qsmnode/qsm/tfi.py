"""Preconditioned total field inversion (TFI): total field (ppm) → susceptibility χ (ppm).

Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. "Preconditioned total field inversion (TFI)
method for quantitative susceptibility mapping." MRM 2017;78:303–315 (published 2018).

The field inside the mask is explained by one susceptibility map over the whole padded box,
the brain's sources and the background's (skull, air, scalp) together, so no separate
background removal is needed:

    min_χ  ½‖W (f − D χ)‖²  +  λ Σ_a ‖t_a w_a G_a χ‖₁ ,

with W the mask times an optional inverse-noise weight (the engine passes none by default,
``QSMParams.noise_weighting``: it scored worse at 7T; the field is only known inside the mask),
D the dipole convolution (``dipole.dipole_kernel``, the true oblique B0 direction), G_a the
forward differences (ppm/mm), w_a the optional morphology weight of MEDI (Liu T et al., MRM
2012;68:1563: 0 where the magnitude has an edge) and t_a 1 on differences between two mask
voxels, ``outside_tv`` on the others. χ outside the mask is larger than inside by one or two
orders of magnitude and only weakly determined, which makes the normal equations badly
conditioned; TFI solves for ``y`` with ``χ = P y``, where the preconditioner P is 1 inside
the mask and ``p_outside`` (the paper's 30) outside, so CG moves the background sources as
fast as the brain's.

The ℓ1 term is handled by iteratively reweighted least squares (the Gauss-Newton form of
MEDI/TFI, lagged diffusivity): each outer iteration fixes ``V_a = 1/√((w_a G_a χ)² + ε)``
and solves ``P (D W² D + λ Gᵀ t w V w t G) P y = P D W² f`` by CG warm started from the
previous ``y`` (four FFTs per CG step). The data term is linear in the field (the paper's is
the nonlinear complex exponential; the engine's fitted field is already unwrapped).

Where this differs from the paper, measured (issue 11, ``benchmarks/RESULTS.md``):

- no TV on the background sources (``outside_tv=0``; the paper's TV covers the whole box):
  with it, the brain's outer voxels explain the background more cheaply than the far sources
  do (test phantom: χ NRMSE 1.19 against 0.34);
- the TV term stops at the mask's border (t_a), on both sides alike: a one-sided border term
  tied the brain's edge to the ppm-sized background χ (7T MNI head, 1 mm, both with the
  TV-ADMM below: NRMSE 44.5 % against 40.7 %);
- the IRLS is not run to convergence (a whole head is ~700 FFTs already): χ in the brain
  is taken from TV-ADMM (``inversion.tv_admm``, ``polish_lam``) of the local field
  ``f − D χ_outside``, i.e. TFI is used for what the error budget says costs most, the
  background; ``polish_lam=None`` returns the TFI χ itself;
- that TV-ADMM stops after 20 iterations (``polish_iter``), not TV-ADMM's own 50: stopping
  early smooths, and 20 beat 50 on all three 7T seeds (NRMSE 38.8 / 39.1 / 40.5 % against
  40.7 / 40.7 / 42.7 %, tissue 64 / 68 / 62 % against 71 / 74 / 70 %, deep grey 16 / 20 / 10 %
  against 22 / 24 / 15 %); on the test phantom 0.36 against 0.34;
- that TV-ADMM's TV carries MEDI's morphology weights (``polish_edge_fraction``, 30 % of the
  mask's magnitude gradients left unregularised; Liu T et al., MRM 2012;68:1563): plain TV
  shrinks the one- or two-voxel deep cortical layer next to white matter, where the clinical
  M1 change sits, and an edge of the T2*-weighted magnitude frees it. Anatomy phantom,
  deep-layer change of a true 0.030 ppm, poses 0-4: 0.024 / 0.032 / 0.022 / 0.025 / 0.027
  against 0.011 / 0.024 / 0.012 / 0.016 / 0.016 ppm with plain TV; 7T MNI heads NRMSE
  36.2 / 36.9 / 39.6 % against 38.8 / 39.1 / 40.5 %, XSIM 0.690 / 0.662 / 0.703 against
  0.628 / 0.600 / 0.662 (10 % of the gradients: half the gain; 50 %: the same scores, but a
  worse deep grey on seed 1). In the joint fit, 10 % edges had not helped (40.5 % against
  40.7 %, measured before the shorter polish);
- that TV-ADMM's data weight falls linearly towards the mask's border over 6 mm
  (``polish_border_mm``, :func:`border_weight`, times the noise weight): the local field the
  joint fit leaves is least reliable there (7T head, seed 0: 6.0e-3 ppm RMS error within 2 mm
  of the border, 1.5e-3 deeper than 8 mm; TV-ADMM from the *true* local field scores 17.8 %
  against 36.2 %). Same captured inputs, the polish alone re-run: 7T MNI heads, seeds
  0 / 1 / 2, NRMSE 34.9 / 35.7 / 38.3 % against 36.2 / 37.1 / 39.7 %, deep grey 13.2 / 16.6 /
  9.3 % against 14.2 / 17.9 / 10.3 %, tissue 57 / 61 / 58 % against 59 / 64 / 60 %; 3T SNR 50
  33.3 % against 34.7 %; 7T slabs 47.5 / 52.2 / 50.1 % against 48.6 / 53.6 / 51.2 %, their
  M1 error −0.0032 / −0.0023 / −0.0048 against −0.0047 / −0.0031 / −0.0054 ppm. Deeper rises
  scored the heads better still (12 mm: 33.9 / 35.0 / 37.4 %; 12 mm, the rise to the power
  1.5: 33.0 / 34.4 / 36.8 %) but lost the project's anatomy phantom's deep-layer M1 change, which
  lies within a few millimetres of the border (+0.030 ppm true; poses 0-2, 12 mm, power 1.5:
  0.0213 / 0.0277 / 0.0194 against 0.0244 / 0.0324 / 0.0220 ppm); 6 mm keeps it (poses 0-4:
  0.0236 / 0.0302 / 0.0221 / 0.0239 / 0.0278 against 0.0244 / 0.0324 / 0.0220 / 0.0244 /
  0.0273 ppm, χ NRMSE better on four of five; all these with the noise weight). A Bregman
  step (the residual added back) and other λ, ρ or iteration counts of the polish gained
  nothing (36.1-37.5 %);
- the joint fit's λ stays 2e-4, though 1e-3 scored every independent case better (now that
  the polish makes the brain's χ, the joint fit only splits the field): 7T MNI heads
  32.0 / 33.7 / 34.8 % against 33.0 / 34.2 / 36.7 %, 3T SNR 50 / 30 / 35° tilt 31.2 / 35.6 /
  36.4 % against 32.4 / 37.0 / 37.1 %, slabs 46.3 % against 48.8 % over seeds 0-4. It cost
  the clinical measure: the slabs' deep-M1 error over those seeds −0.0040 ± 0.0012 ppm against
  −0.0037 ± 0.0008, seed 3 at −0.0057 (outside ±0.005; −0.0048 at 2e-4), and the project's
  anatomy phantom's deep-layer change 0.0242 against 0.0249 ppm (mean of poses 0-4, true
  0.030). RESULTS.md, session 17;
- the background sources live in 14 mm around the mask's box, not more: a harmonic field in
  the brain is made as well by sources near it. Against 20 mm the grid of a whole 1 mm head
  has 17 % fewer voxels and the joint fit takes 16-18 % less time (7T heads 34-35 → 28-29 s,
  7T slabs 12 → 10 s), for NRMSE +0.03 to +0.15 points on the 7T heads (seeds 0-2), −0.15
  to −0.4 on the slabs (their M1 error −0.0046 / −0.0037 → −0.0047 / −0.0028 ppm) and the
  same on 3T; 6 mm lost 1 point. The TV-ADMM polish keeps its own 24 mm (14 mm there cost
  0.5 points).

Measured (qsm-forward MNI head, qsm-ci scores, ``benchmarks/RESULTS.md``): see the list above
and the table of ``qsmnode.qsm.engine``; 3T and slab figures in RESULTS.md. About 810 FFTs on
the padded whole-head box. The engine's default (``qsmnode.qsm.engine``).

``coarse_factor=2`` starts the joint fit from one on a grid twice as coarse (three
reweightings there, about 90 FFTs' worth) and then, with ``max_outer=1, cg_max_iter=100``,
does one quadratic solve at full resolution: 580 FFTs, and as good on the MNI heads (39.1 /
38.8 / 39.0 %, XSIM 0.636 / 0.618 / 0.672), but the test phantom, whose air pocket lies
1.5 mm from the brain, needs the full-resolution reweightings (0.51 against 0.36), so it is
an option, not the default.

The engine runs it like single-step TV (it takes the total field and needs no background
removal): ``TFI().invert_total`` returns χ (0 outside the mask), the mask, the local field
``f − D χ_outside`` on the mask, and info (``n_fft`` counts FFTs on ``fft_shape``, the
TV-ADMM's scaled to that grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qsmnode.qsm.dipole import dipole_kernel
from qsmnode.qsm.inversion import tv_admm
from qsmnode.qsm.util import (
    FftGrid,
    Slabs,
    block_mean,
    bounding_box,
    cg,
    convolve,
    crop_to_mask,
    keywords,
    thread_slabs,
    upsample_linear,
)

F32 = NDArray[np.float32]
Info = dict[str, Any]


def forward_differences(x: F32, inv_h: NDArray[np.float32], out: list[F32] | None = None
                        ) -> list[F32]:
    """``G_a x = (x[i+1] − x[i]) / h_a`` along each axis a, periodic (1/mm times x's unit).

    Args:
        x: 3-D float32 array.
        inv_h: ``1 / voxel size`` (1/mm) per axis.
        out: three float32 arrays of x's shape to write into (default: new ones).

    Returns:
        The three difference arrays.
    """
    if out is None:
        out = [np.empty_like(x) for _ in range(3)]
    for a in range(3):
        n = x.shape[a]
        hi = tuple(slice(1, n) if b == a else slice(None) for b in range(3))
        lo = tuple(slice(0, n - 1) if b == a else slice(None) for b in range(3))
        first = tuple(slice(0, 1) if b == a else slice(None) for b in range(3))
        last = tuple(slice(n - 1, n) if b == a else slice(None) for b in range(3))
        np.subtract(x[hi], x[lo], out=out[a][lo])
        np.subtract(x[first], x[last], out=out[a][last])
        out[a] *= inv_h[a]
    return out


def edge_weights(magnitude: F32, mask: NDArray[np.bool_], voxel_size_mm: ArrayLike,
                 edge_fraction: float) -> list[F32]:
    """MEDI's morphology weights (Liu T et al., MRM 2012;68:1563): per axis, 0 where the
    gradient of the masked magnitude is among the largest ``edge_fraction`` of the mask's,
    1 elsewhere (so χ may jump where the anatomy has an edge).

    Args:
        magnitude: combined magnitude (any scale), float32.
        mask: where the magnitude is trusted; it is 0 outside (the mask's own border counts
            as an edge).
        voxel_size_mm: voxel edge lengths.
        edge_fraction: fraction of the mask's gradient components set to 0 (e.g. 0.1);
            0 gives all-ones weights.

    Returns:
        Three float32 weight arrays of the magnitude's shape.
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    inv_h = (1.0 / vs).astype(np.float32)
    if edge_fraction <= 0:
        return [np.ones(magnitude.shape, np.float32) for _ in range(3)]
    mag = (magnitude * mask).astype(np.float32)
    scale = float(np.percentile(mag[mask], 99)) if mask.any() else 1.0
    mag /= np.float32(max(scale, 1e-30))
    g = forward_differences(mag, inv_h)
    values = np.concatenate([np.abs(ga[mask]) for ga in g])
    threshold = float(np.quantile(values, 1.0 - edge_fraction)) if values.size else np.inf
    return [(np.abs(ga) <= threshold).astype(np.float32) for ga in g]


def border_weight(mask: NDArray[np.bool_], voxel_size_mm: ArrayLike, depth_mm: float) -> F32:
    """A data weight that rises linearly from the mask's border to 1 at ``depth_mm`` inside:
    ``min(1, d / depth_mm)``, with d the distance (mm) from a voxel's centre to the
    nearest voxel outside the mask (or beyond the array). 0 outside the mask.

    The local field a background step leaves is least reliable near the mask's border (on the
    qsm-forward 7T head, seed 0, TFI's local field is off by 6.0e-3 ppm RMS within 2 mm of the
    border, 1.5e-3 ppm deeper than 8 mm), so a dipole inversion should lean on it less there.

    d is exact up to ``depth_mm`` (beyond it only "deeper" matters): the squared Euclidean
    distance is separable (Saito T, Toriwaki J, Pattern Recognit 1994;27:1551), one min-plus
    pass per axis over the shifts within ``depth_mm``, in float32 on the mask's box. On the
    1 mm head that is 0.16 s against 0.5-2 s for ``scipy.ndimage.distance_transform_edt``,
    whose int index arrays of the whole box are most of its time.

    Args:
        mask: where the field is (bool).
        voxel_size_mm: voxel edge lengths (mm).
        depth_mm: depth at which the weight reaches 1 (mm).

    Returns:
        float32 weight of the mask's shape.
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    out = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return out
    box = bounding_box(mask)
    cap = np.float32(depth_mm * depth_mm)  # squared distances at or beyond it all mean "deep"
    d2 = np.where(np.pad(mask[box], 1), cap, np.float32(0))  # 0 on the voxels outside
    before, scratch = np.empty_like(d2), np.empty_like(d2)
    for axis, h in enumerate(vs):  # the passes only lower d2: it stays <= cap
        np.copyto(before, d2)
        n = d2.shape[axis]
        for k in range(1, min(int(depth_mm / h), n - 1) + 1):
            lo, hi = [slice(None)] * 3, [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, n - k), slice(k, n)
            step = np.float32((h * k) ** 2)
            for a, b in ((tuple(lo), tuple(hi)), (tuple(hi), tuple(lo))):
                candidate = scratch[a]
                np.add(before[b], step, out=candidate)
                np.minimum(d2[a], candidate, out=d2[a])
    np.sqrt(d2, out=d2)
    d2 *= np.float32(1.0 / depth_mm)
    out[box] = d2[1:-1, 1:-1, 1:-1]
    return out


def _add_axis_term(x: F32, v: F32, diff: F32, out: F32, a: int) -> None:
    """``out += D_aᵀ (v · D_a x)`` along axis ``a`` (periodic), ``diff`` as scratch."""
    n = x.shape[a]

    def cut(lo: int, hi: int) -> tuple[slice, ...]:
        return tuple(slice(lo, hi) if b == a else slice(None) for b in range(3))

    np.subtract(x[cut(1, n)], x[cut(0, n - 1)], out=diff[cut(0, n - 1)])
    np.subtract(x[cut(0, 1)], x[cut(n - 1, n)], out=diff[cut(n - 1, n)])
    diff *= v
    out -= diff
    out[cut(1, n)] += diff[cut(0, n - 1)]
    out[cut(0, 1)] += diff[cut(n - 1, n)]


def add_tv_term(x: F32, v: list[F32], diff: F32, out: F32, *, slabs: Slabs | None = None) -> None:
    """``out += Σ_a Dᵀ_a (v_a · D_a x)`` with ``D_a`` the unscaled periodic forward difference
    (``x[i+1] − x[i]``) and ``Dᵀ_a g = g[i−1] − g[i]``: the IRLS's TV term (the CG applies it
    on every step), with ``diff`` (x's shape) as scratch.

    Three passes, each slab by slab (``slabs`` of axis 0 on their thread pool, or serially):
    the axis-0 differences into ``diff``; their adjoint into ``out`` (a slab reads the plane
    before it); then axes 1 and 2, with the slab's part of ``diff`` as scratch. The result is
    the same for any slabs, bit for bit. Measured on a 162×200×180 grid, 2 cores: 30 ms
    serially, 16 ms in two slabs (blocks of planes inside a slab gained nothing: the arrays
    fit the 480 MiB L3 cache, and blocks of one plane lost the threads' gain).
    """
    n0 = x.shape[0]
    sl = slabs if slabs is not None else Slabs(n0)

    def differences(s: slice) -> None:
        i0, i1 = s.start, s.stop
        hi = min(i1, n0 - 1)
        np.subtract(x[i0 + 1:hi + 1], x[i0:hi], out=diff[i0:hi])
        if i1 == n0:
            np.subtract(x[0:1], x[n0 - 1:n0], out=diff[n0 - 1:n0])
        diff[s] *= v[0][s]

    def adjoint_axis_0(s: slice) -> None:
        o = out[s]
        o -= diff[s]
        o[1:] += diff[s.start:s.stop - 1]
        o[0] += diff[s.start - 1]  # the first slab: the periodic wrap, diff[−1]

    def axes_1_2(s: slice) -> None:
        for a in (1, 2):
            _add_axis_term(x[s], v[a][s], diff[s], out[s], a)

    for step in (differences, adjoint_axis_0, axes_1_2):
        sl.map(step)


def _joint_fit(
    grid: FftGrid, d: F32, f_full: F32, inside: NDArray[np.bool_], w2: F32, precond: F32,
    inv_h: NDArray[np.float32], wg: list[F32] | None, *, lam: float, outside_tv: float,
    eps: float, max_outer: int, cg_max_iter: int, cg_tol: float, chi0: F32 | None,
) -> tuple[F32, list[int], list[float], float]:
    """The IRLS of :func:`tfi` on one FFT grid: ``max_outer`` reweightings, each a CG solve of
    ``P (D W² D + λ Gᵀ t w V w t G) P y = P D W² f`` warm started from the last ``y``.

    Args:
        grid: the padded FFT grid; ``d`` its dipole kernel (half spectrum).
        f_full: total field on the grid (ppm, 0 outside the mask).
        inside: the mask on the grid; ``w2`` the squared data weight; ``precond`` P.
        inv_h: 1 / voxel size (1/mm); ``wg``: MEDI edge weights or None.
        lam, outside_tv, eps, max_outer, cg_max_iter, cg_tol: as :func:`tfi`.
        chi0: χ to start from (ppm; its gradients give the first weights), or None: 0.

    Returns:
        χ on the grid (ppm), CG steps and relative residuals per reweighting, and the
        relative change of χ in the mask at the last reweighting.
    """

    def dconv(x: F32) -> F32:
        return convolve(grid, x, d, slabs)

    lam32 = np.float32(lam)
    # TV weight per difference: 1 where both voxels are in the mask, outside_tv elsewhere
    tv_scale = [np.where(inside & np.roll(inside, -1, axis=a), np.float32(1.0),
                         np.float32(outside_tv)).astype(np.float32) for a in range(3)]
    eps32 = np.float32(eps)
    grads = [np.empty(grid.shape, np.float32) for _ in range(3)]
    px = np.empty(grid.shape, np.float32)  # buffers the CG steps reuse
    scratch = np.empty(grid.shape, np.float32)
    # element-wise work in slabs of axis 0, one per FFT worker, so it uses every core too: the
    # TV term's always, the light passes (CG updates, products) on a grid large enough to gain
    tv_slabs = thread_slabs(grid.shape[0], min_rows=8)
    slabs = thread_slabs(grid.shape[0], min_rows=8, n_voxels=int(np.prod(grid.shape)))
    rhs = dconv(w2 * f_full)
    rhs *= precond
    if chi0 is None:
        chi = np.zeros(grid.shape, np.float32)
        y = np.zeros(grid.shape, np.float32)
    else:
        chi = chi0
        y = chi0 / precond
    cg_iters: list[int] = []
    cg_res: list[float] = []
    change = np.inf
    for _ in range(max_outer):
        forward_differences(chi, inv_h, grads)
        vw = []
        for a in range(3):
            g = grads[a]
            if wg is not None:
                g *= wg[a]
            np.multiply(g, g, out=g)
            g += eps32
            np.sqrt(g, out=g)
            np.divide(lam32, g, out=g)  # λ / √((w G χ)² + ε)
            if wg is not None:
                g *= wg[a]
                g *= wg[a]
            if outside_tv != 1.0:
                g *= tv_scale[a]
            vw.append(g)
        for a in range(3):  # the 1/h of both G and Gᵀ, folded in once per reweighting
            vw[a] *= np.float32(inv_h[a] ** 2)

        def apply(x: F32, vw: list[F32] = vw) -> F32:
            slabs.multiply(x, precond, px)
            out = dconv(px)
            slabs.multiply(out, w2, out)
            out = dconv(out)
            add_tv_term(px, vw, scratch, out, slabs=tv_slabs)
            slabs.multiply(out, precond, out)
            return out

        y, n_it, res = cg(apply, rhs, y, tol=cg_tol, max_iter=cg_max_iter, relative_to="start",
                          slabs=slabs)
        cg_iters.append(n_it)
        cg_res.append(round(res, 5))
        new = y * precond
        diff = (new - chi)[inside]
        norm = float(np.linalg.norm(new[inside]))
        change = float(np.linalg.norm(diff)) / max(norm, 1e-30)
        chi = new
        grads = [vw[a] for a in range(3)]
    return chi, cg_iters, cg_res, change


def _coarse_start(
    shape: tuple[int, int, int], f_full: F32, inside: NDArray[np.bool_], w2: F32,
    voxel_size_mm: NDArray[np.float64], b0_direction: ArrayLike, factor: int, *,
    lam: float, p_outside: float, outside_tv: float, eps: float, max_outer: int,
    cg_max_iter: int, cg_tol: float,
) -> tuple[F32, Info]:
    """The joint fit on a grid ``factor`` times coarser (block means of the field and its
    weight; the mask where at least half a block is in it), interpolated back to ``shape``
    as the fine fit's start: the many CG steps that move the far background sources are
    paid on ``factor³`` fewer voxels.

    Returns:
        χ on the fine grid (ppm, float32) and info: the coarse grid's shape, its FFTs and
        CG steps per reweighting.
    """
    factors = (factor, factor, factor)
    frac = block_mean(inside.astype(np.float32), factors)
    inside_c = frac >= 0.5
    w2_c = block_mean(w2, factors) * inside_c
    f_c = block_mean(f_full, factors)
    f_c /= np.maximum(frac, np.float32(1e-6))
    f_c *= inside_c
    del frac
    grid_c = FftGrid(tuple(int(n) for n in f_c.shape))  # type: ignore[arg-type]
    vs_c = voxel_size_mm * factor
    d_c = dipole_kernel(grid_c.shape, vs_c, b0_direction)
    precond_c = np.where(inside_c, np.float32(1.0), np.float32(p_outside)).astype(np.float32)
    chi_c, iters, _, _ = _joint_fit(
        grid_c, d_c, f_c.astype(np.float32, copy=False), inside_c,
        w2_c.astype(np.float32, copy=False), precond_c,
        (1.0 / vs_c).astype(np.float32), None, lam=lam, outside_tv=outside_tv, eps=eps,
        max_outer=max_outer, cg_max_iter=cg_max_iter, cg_tol=cg_tol, chi0=None)
    # the background's χ only: the brain's starts from 0 (interpolating across the mask's
    # border would carry ppm-sized background χ into the brain's edge)
    outside_c = (~inside_c).astype(np.float32)
    chi = upsample_linear(chi_c * outside_c, factors, shape)
    chi /= np.maximum(upsample_linear(outside_c, factors, shape), np.float32(1e-3))
    chi[inside] = 0.0
    return chi, {"shape": grid_c.shape, "n_fft": grid_c.n_fft, "cg_iterations": iters}


def tfi(
    total_field_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    *,
    weight: NDArray[np.floating] | None = None,
    magnitude: NDArray[np.floating] | None = None,
    lam: float = 2e-4,
    p_outside: float = 30.0,
    outside_tv: float = 0.0,
    edge_fraction: float = 0.0,
    eps: float = 1e-6,
    pad_mm: float = 14.0,
    max_outer: int = 3,
    cg_max_iter: int = 60,
    cg_tol: float = 1e-3,
    polish_lam: float | None = 1e-4,
    polish_iter: int = 20,
    polish_edge_fraction: float = 0.3,
    polish_border_mm: float | None = 6.0,
    coarse_factor: int = 1,
    coarse_outer: int = 3,
    coarse_cg_max_iter: int = 60,
) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.float32], Info]:
    """Preconditioned total field inversion (Liu Z et al., MRM 2017;78:303).

    Solves ``min_χ ½‖W(f − Dχ)‖² + λ Σ_a ‖t_a w_a G_a χ‖₁`` over the mask's bounding box
    padded by ``pad_mm`` (module docstring), as ``χ = P y`` by IRLS with CG, then (by
    default) takes the brain's χ from TV-ADMM of the local field ``f − D χ_outside``.

    Args:
        total_field_ppm: total field (ppm of B0; background not removed), read in the mask.
        mask: where the field is known (bool); χ is returned on it.
        voxel_size_mm: voxel edge lengths (mm).
        b0_direction: unit vector of B0 in voxel-index space.
        weight: inverse-noise weight of the field (e.g. the combined magnitude), scaled to
            mean 1 in the mask; default None: 1.
        magnitude: magnitude for the morphology (edge) weights; used when ``edge_fraction``
            is above 0.
        lam: TV weight λ of the joint fit (field in ppm, gradients in ppm/mm); default 2e-4.
        p_outside: preconditioner outside the mask (1 inside); default 30 (the paper's).
        outside_tv: TV weight, relative to λ, of differences that leave the mask; default 0.
        edge_fraction: fraction of the mask's magnitude gradients left unregularised
            (MEDI's morphology prior); default 0 (plain TV).
        eps: IRLS smoothing of ``|G_a χ|`` ((ppm/mm)²); default 1e-6.
        pad_mm: zero padding around the mask's box where the background sources live (mm);
            default 14 (module docstring).
        max_outer: IRLS (reweighting) iterations; default 3.
        cg_max_iter: CG iterations per reweighting at most; default 60.
        cg_tol: CG residual reduction per reweighting; default 1e-3.
        polish_lam: λ of the TV-ADMM of the local field that gives the brain's χ
            (``inversion.tv_admm``, masked data term, noise weight, 24 mm padding); default
            1e-4; None: χ is the joint fit's.
        polish_iter: TV-ADMM iterations at most; default 20 (fewer than TV-ADMM's own 50:
            stopping early smooths, and on the qsm-forward heads 20 beat 30 and 50; module
            docstring).
        polish_edge_fraction: fraction of the mask's magnitude gradients whose TV weight in
            that TV-ADMM is 0 (:func:`edge_weights` of ``magnitude``); default 0.3; 0 or no
            magnitude: plain TV.
        polish_border_mm: that TV-ADMM's data weight is ``weight`` times
            :func:`border_weight` of the mask, rising to 1 at this depth (mm): the local
            field is least reliable near the border (module docstring); default 6; None:
            ``weight`` alone.
        coarse_factor: 1 (default): the joint fit starts from 0 at the field's resolution;
            2 or more: it starts from a joint fit on a grid that many times coarser
            (:func:`_coarse_start`), which is cheaper but loses where strong sources lie
            within a few millimetres of the brain (module docstring).
        coarse_outer: reweightings on the coarse grid; default 3.
        coarse_cg_max_iter: CG iterations per coarse reweighting at most; default 60.

    Returns:
        χ (ppm, float32, 0 outside the mask), the mask (bool), the local field
        ``f − D χ_outside`` on the mask (ppm, float32) and info: ``n_fft`` (the TV-ADMM's
        scaled to this grid), ``fft_shape``, ``iterations`` (CG steps in all), ``outer``,
        ``last_change`` (relative change of χ in the mask at the last reweighting), the CG
        residuals per reweighting, the settings and ``polish`` (the TV-ADMM's iterations).
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    inv_h = (1.0 / vs).astype(np.float32)
    box, grid, f, m = crop_to_mask(total_field_ppm, mask, vs, pad_mm, extra_voxels=1)
    d = dipole_kernel(grid.shape, vs, b0_direction)
    inside = grid.embed(m, bool).astype(bool)
    w2 = grid.embed(m.astype(np.float32))
    if weight is not None:
        wb = np.asarray(weight[box], np.float32) * m
        mean = float(wb[m].mean()) if m.any() else 1.0
        wb /= np.float32(max(mean, 1e-30))
        w2[: m.shape[0], : m.shape[1], : m.shape[2]] = wb * wb
    f_full = grid.embed(f)
    precond = np.where(inside, np.float32(1.0), np.float32(p_outside)).astype(np.float32)
    if magnitude is not None and edge_fraction > 0:
        mag = grid.embed(np.asarray(magnitude[box], np.float32))
        wg = edge_weights(mag, inside, vs, edge_fraction)
        del mag
    else:
        wg = None

    chi0 = None
    coarse_info: Info = {}
    if coarse_factor > 1:
        chi0, coarse_info = _coarse_start(grid.shape, f_full, inside, w2, vs, b0_direction,
                                          coarse_factor, lam=lam, p_outside=p_outside,
                                          outside_tv=outside_tv, eps=eps,
                                          max_outer=coarse_outer,
                                          cg_max_iter=coarse_cg_max_iter, cg_tol=cg_tol)
    chi, cg_iters, cg_res, change = _joint_fit(
        grid, d, f_full, inside, w2, precond, inv_h, wg, lam=lam, outside_tv=outside_tv,
        eps=eps, max_outer=max_outer, cg_max_iter=cg_max_iter, cg_tol=cg_tol, chi0=chi0)
    del f_full, chi0

    chi_in = chi * inside
    # the local field: the measured field less that of the fitted background sources
    background = convolve(grid, chi * ~inside, d)
    n = m.shape
    local = np.zeros(total_field_ppm.shape, np.float32)
    local[box] = (f - background[: n[0], : n[1], : n[2]]) * m
    del background
    out = np.zeros(total_field_ppm.shape, np.float32)
    out[box] = chi_in[: n[0], : n[1], : n[2]]
    mask_out = np.zeros(total_field_ppm.shape, bool)
    mask_out[box] = m
    info: Info = {
        "n_fft": grid.n_fft,
        "fft_shape": grid.shape,
        "iterations": int(sum(cg_iters)),
        "outer": len(cg_iters),
        "cg_iterations": cg_iters,
        "cg_relres": cg_res,
        "last_change": change,
        "lam": lam,
        "p_outside": p_outside,
        "edge_fraction": edge_fraction,
    }
    if coarse_info:
        info["coarse"] = coarse_info
        info["n_fft"] += round(coarse_info["n_fft"] * np.prod(coarse_info["shape"])
                               / np.prod(grid.shape))
    if polish_lam is not None:
        tv_weights = None
        if magnitude is not None and polish_edge_fraction > 0:
            tv_weights = edge_weights(np.asarray(magnitude, np.float32), mask_out, vs,
                                      polish_edge_fraction)
        polish_weight = weight
        if polish_border_mm is not None:
            polish_weight = border_weight(mask_out, vs, polish_border_mm)
            if weight is not None:
                polish_weight *= np.asarray(weight, np.float32)
        out, polish_info = tv_admm(local, mask_out, vs, b0_direction, lam=polish_lam,
                                   weight=polish_weight, tv_weights=tv_weights,
                                   max_iter=polish_iter, pad_mm=24.0)
        info["polish"] = {k: polish_info[k] for k in ("iterations", "last_change", "n_fft")}
        info["n_fft"] += round(polish_info["n_fft"] * np.prod(polish_info["fft_shape"])
                               / np.prod(grid.shape))
    return out, mask_out, local, info


@dataclass(frozen=True)
class TFI:
    """Preconditioned total field inversion (:func:`tfi`; Liu Z, Kee Y, Zhou D, Wang Y,
    Spincemaille P, MRM 2017;78:303): χ of the brain and the background fitted together to
    the total field, so no background removal; the brain's χ then from TV-ADMM of the local
    field it leaves (module docstring).

    Attributes:
        lam: TV weight λ of the joint fit (field in ppm, gradients in ppm/mm); default 2e-4.
        p_outside: preconditioner outside the mask; default 30.
        outside_tv: TV weight (relative to λ) of differences leaving the mask; default 0.
        edge_fraction: magnitude gradients left unregularised (MEDI's morphology prior);
            default 0.
        eps: IRLS smoothing ((ppm/mm)²); default 1e-6.
        pad_mm: padding around the mask's box for the background sources (mm); default 14.
        max_outer: IRLS reweightings; default 3.
        cg_max_iter: CG iterations per reweighting at most; default 60.
        cg_tol: CG residual reduction per reweighting; default 1e-3.
        polish_lam: λ of the TV-ADMM of the local field; default 1e-4 (None: the joint
            fit's χ).
        polish_iter: TV-ADMM iterations at most; default 20.
        polish_edge_fraction: magnitude gradients left unregularised in that TV-ADMM;
            default 0.3.
        polish_border_mm: that TV-ADMM's data weight rises linearly from the mask's border
            to 1 at this depth (:func:`border_weight`); default 6 mm (None: no such rise).
        coarse_factor: start from a joint fit this many times coarser; default 1 (none).
        coarse_outer: reweightings on the coarse grid; default 3.
        coarse_cg_max_iter: CG iterations per coarse reweighting at most; default 60.
    """

    lam: float = 2e-4
    p_outside: float = 30.0
    outside_tv: float = 0.0
    edge_fraction: float = 0.0
    eps: float = 1e-6
    pad_mm: float = 14.0
    max_outer: int = 3
    cg_max_iter: int = 60
    cg_tol: float = 1e-3
    polish_lam: float | None = 1e-4
    polish_iter: int = 20
    polish_edge_fraction: float = 0.3
    polish_border_mm: float | None = 6.0
    coarse_factor: int = 1
    coarse_outer: int = 3
    coarse_cg_max_iter: int = 60
    method: str = field(default="tfi", init=False)

    def invert_total(
        self, total_field_ppm: NDArray[np.floating], mask: NDArray[np.bool_],
        voxel_size_mm: ArrayLike, b0_direction: ArrayLike,
        weight: NDArray[np.floating] | None = None,
        magnitude: NDArray[np.floating] | None = None,
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.float32], Info]:
        """χ, its mask, the model local field and info (:func:`tfi`); ``weight`` is the
        inverse-noise weight, ``magnitude`` feeds the edge weights."""
        return tfi(total_field_ppm, mask, voxel_size_mm, b0_direction, weight=weight,
                   magnitude=magnitude, **keywords(self))
