"""Dipole inversion: local field (ppm) → susceptibility χ (ppm).

- :func:`tkd`: truncated k-space division (Shmueli et al., MRM 2009;62:1510; Wharton et al.,
  MRM 2010;63:1292): ``χ = F⁻¹[F(f) / D]`` with ``|D|`` clamped below at the threshold
  (keeping its sign), two FFTs.
- :func:`tv_admm`: ``min ½‖W(Dχ − f)‖² + λ‖∇χ‖₁`` by ADMM. By default the data term is
  weighted by the mask W (the field is only known inside it), with the split ``v = Dχ``
  (a pointwise update) next to ``z = ∇χ``, so the χ update stays a closed-form k-space
  division (Bilgic et al., MRM 2014;72:1444; the weighted linear variant of FANSI, Milovic
  et al., MRM 2018;80:814): four FFTs per iteration. ``data_term="unmasked"`` is the classic
  closed-form TV-ADMM of the QSM challenges (two FFTs per iteration), which fits ``Dχ = 0``
  outside the mask: wrong wherever the field of the χ inside leaks out (slab faces, the
  superior sagittal sinus at the brain surface).
- :func:`single_step_tv`: TV-regularised inversion of the *total* field through its
  Laplacian (Chatnuntawech 2017; Langkammer 2015), which removes the background without an
  SMV erosion: the same ADMM with the kernel ``∇²D``, four FFTs per iteration. The default of
  the engine (see ``pipeline``).

The kernel follows the true (oblique) B0 direction and the voxel size (``dipole.dipole_kernel``).
All work on the mask's bounding box, zero-padded by ``pad_mm`` so the circular convolution
does not fold the field of one edge into the other (important for slabs). Every function
returns ``(chi_ppm, info)`` where ``info["n_fft"]`` counts FFTs on ``info["fft_shape"]``.

The engine chooses a method by its parameter type (:data:`InversionMethod`: :class:`SingleStepTV`,
:class:`TVADMM`, :class:`TKD`), whose fields are the keywords of the function above (like QSM.jl's
keyword sets per method): ``invert`` runs a local-field method, ``invert_total`` the single-step
one.

Speed: the element-wise work between the FFTs is fused into one image-space and one k-space
pass per iteration, run on cache-sized blocks of planes, one contiguous range of planes per
thread (as many threads as ``scipy.fft`` workers; numpy releases the GIL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qsmnode.qsm.dipole import dipole_kernel
from qsmnode.qsm.util import (
    FftGrid,
    crop_to_mask,
    erode_faces,
    keywords,
    laplacian_7pt,
    thread_slabs,
)

Info = dict[str, Any]
F32 = NDArray[np.float32]
T = TypeVar("T")

_BLOCK_BYTES = 1 << 19
"""Bytes per array per block of the fused element-wise passes (fits a core's L2 cache)."""



def _paste(
    shape: tuple[int, ...],
    box: tuple[slice, slice, slice],
    chi: NDArray[np.float32],
    m: NDArray[np.bool_],
) -> NDArray[np.float32]:
    out = np.zeros(shape, np.float32)
    crop = chi[: m.shape[0], : m.shape[1], : m.shape[2]]
    out[box] = crop * m
    return out


def tkd(
    local_field_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    *,
    threshold: float = 0.15,
    pad_mm: float = 24.0,
) -> tuple[NDArray[np.float32], Info]:
    """TKD (Shmueli 2009, Wharton 2010): ``1/D`` with ``|D| < threshold`` set to ``±threshold``."""
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    box, grid, f, m = crop_to_mask(local_field_ppm, mask, vs, pad_mm)
    d = dipole_kernel(grid.shape, vs, b0_direction)
    t = np.float32(threshold)
    clamped = np.where(np.abs(d) < t, np.where(d < 0, -t, t), d)
    inv = np.float32(1.0) / clamped
    inv[0, 0, 0] = 0.0
    spec = grid.forward(f)
    spec *= inv
    chi = grid.inverse(spec)
    return _paste(local_field_ppm.shape, box, chi, m), {
        "n_fft": grid.n_fft,
        "fft_shape": grid.shape,
    }


# --------------------------------------------------------------------------- operators


def _grad_sq_eigenvalues(grid: FftGrid, vs: NDArray[np.float64]) -> NDArray[np.float32]:
    """``Σ_a |E_a(k)|²`` for periodic forward differences ``(x[i+1] − x[i]) / h_a``, half grid."""
    hs = grid.half_shape
    out = np.zeros(hs, np.float32)
    for axis in range(3):
        n = grid.shape[axis]
        k = np.arange(hs[axis], dtype=np.float64)
        ev = ((2.0 - 2.0 * np.cos(2.0 * np.pi * k / n)) / vs[axis] ** 2).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = hs[axis]
        out += ev.reshape(view)
    return out


def gradient(x: F32, voxel_size_mm: ArrayLike) -> list[F32]:
    """Periodic forward differences ``G_a x = (x[i+1] − x[i]) / h_a`` (reference operator)."""
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    return [((np.roll(x, -1, axis=a) - x) / np.float32(vs[a])).astype(np.float32) for a in range(3)]


def gradient_adjoint(y: list[F32], voxel_size_mm: ArrayLike) -> F32:
    """``Σ_a G_aᵀ y_a = Σ_a (y_a[i−1] − y_a[i]) / h_a``, the adjoint of :func:`gradient`."""
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    out = np.zeros_like(y[0])
    for a in range(3):
        out += (np.roll(y[a], 1, axis=a) - y[a]) / np.float32(vs[a])
    return out


def _by_ranges(n: int, work: Callable[[int, int], T]) -> tuple[list[tuple[int, int]], list[T]]:
    """Run ``work(lo, hi)`` on one contiguous range of axis 0 per thread; results in order."""
    slabs = thread_slabs(n)
    return ([(s.start, s.stop) for s in slabs.slices],
            slabs.map(lambda s: work(s.start, s.stop)))


def _planes(arr: NDArray[Any]) -> int:
    """Planes of axis 0 per cache block."""
    return max(1, _BLOCK_BYTES // max(arr[0].nbytes, 1))


def _shrink_into(g: F32, u: F32, kappa: np.float32 | F32, inv_h: np.float32) -> None:
    """``g ← (v − 2 clip(v)) / h`` with ``v = g + u`` and ``u ← clip(v, ±κ)`` (in place).

    ``v − clip(v)`` is the soft threshold ``z`` of the TV split, so ``v − 2 clip(v) = z − u``.
    κ is one threshold or one per difference (a weighted TV).
    """
    g += u
    np.clip(g, -kappa, kappa, out=u)
    g -= u
    g -= u
    g *= inv_h


def _tv_image_pass(
    chi: F32,
    old: F32 | None,
    u: list[F32],
    kappa: list[np.float32 | F32],
    inv_h: NDArray[np.float32],
    rhs: F32,
    data: tuple[F32, F32, F32, F32, F32, F32, float] | None,
) -> tuple[float, float]:
    """One fused image-space pass of the ADMM, blocked and threaded over axis 0.

    For each axis a: ``u_a ← clip(G_a χ + u_a, ±κ_a)`` (κ_a a number or an array on the
    grid), and ``rhs ← Σ_a G_aᵀ(z_a − u_a)``
    (the TV split's input to the next χ update). With ``data = (aχ, v, u1, x, c, vnum, α)``
    also the data split: ``h = α aχ + (1 − α) v``, ``v ← vnum + c (h + u1)``,
    ``u1 ← h + u1 − v`` and ``x ← v − u1``. Returns ``(‖χ − old‖², ‖χ‖²)`` (0 without old).
    """
    n0 = chi.shape[0]
    bp = _planes(chi)

    def k(a: int, b0: int, b1: int) -> np.float32 | F32:
        return kappa[a] if np.ndim(kappa[a]) == 0 else kappa[a][b0:b1]

    def work(lo: int, hi: int) -> tuple[F32, float, float]:
        g = np.empty((min(bp, hi - lo), *chi.shape[1:]), np.float32)
        t = np.empty_like(g)
        carry = np.empty(chi.shape[1:], np.float32)
        ss_d = ss_n = 0.0
        for b0 in range(lo, hi, bp):
            b1 = min(b0 + bp, hi)
            nb = b1 - b0
            gg, tt = g[:nb], t[:nb]
            c = chi[b0:b1]
            r = rhs[b0:b1]
            if old is not None:
                np.subtract(c, old[b0:b1], out=tt)
                ss_d += float(np.vdot(tt, tt))
                ss_n += float(np.vdot(c, c))
            if data is not None:
                achi, v, u1, x, cw, vnum, alpha = data
                vv, uu = v[b0:b1], u1[b0:b1]
                if alpha != 1.0:
                    np.multiply(achi[b0:b1], np.float32(alpha), out=tt)
                    np.multiply(vv, np.float32(1.0 - alpha), out=gg)
                    tt += gg
                    tt += uu
                else:
                    np.add(achi[b0:b1], uu, out=tt)
                np.multiply(tt, cw[b0:b1], out=vv)
                vv += vnum[b0:b1]
                np.subtract(tt, vv, out=uu)
                np.subtract(vv, uu, out=x[b0:b1])
            # axis 0: the plane after the block may belong to another range (read only)
            if nb > 1:
                np.subtract(chi[b0 + 1 : b1], chi[b0 : b1 - 1], out=gg[: nb - 1])
            np.subtract(chi[b1 % n0], chi[b1 - 1], out=gg[nb - 1])
            gg *= inv_h[0]
            _shrink_into(gg, u[0][b0:b1], k(0, b0, b1), inv_h[0])
            np.negative(gg, out=r)
            r[1:] += gg[:-1]
            if b0 > lo:
                r[0] += carry
            carry[...] = gg[nb - 1]
            # axes 1 and 2: within the block, periodic
            for a in (1, 2):
                n = chi.shape[a]
                hi_sl = [slice(None)] * 3
                lo_sl = [slice(None)] * 3
                hi_sl[a], lo_sl[a] = slice(1, n), slice(0, n - 1)
                first, last = list(hi_sl), list(lo_sl)
                first[a], last[a] = slice(0, 1), slice(n - 1, n)
                np.subtract(c[tuple(hi_sl)], c[tuple(lo_sl)], out=gg[tuple(lo_sl)])
                np.subtract(c[tuple(first)], c[tuple(last)], out=gg[tuple(last)])
                gg *= inv_h[a]
                _shrink_into(gg, u[a][b0:b1], k(a, b0, b1), inv_h[a])
                r -= gg
                r[tuple(hi_sl)] += gg[tuple(lo_sl)]
                r[tuple(first)] += gg[tuple(last)]
        return carry, ss_d, ss_n

    ranges, results = _by_ranges(n0, work)
    for k, (lo, _) in enumerate(ranges):
        rhs[lo] += results[k - 1][0]  # G_0ᵀ at the range's first plane needs the plane before
    return sum(r[1] for r in results), sum(r[2] for r in results)


def _kspace_pass(
    s1: NDArray[np.complex64],
    s2: NDArray[np.complex64],
    a1: NDArray[np.floating],
    a2: F32,
    kernel: F32 | None,
) -> None:
    """``s1 ← a1·s1 + a2·s2``, then ``s2 ← kernel·s1``; without a kernel ``a1`` is a constant
    spectrum and ``s1 ← a1 + a2·s2`` (``s1`` may be ``s2``). Blocked and threaded."""
    bp = _planes(s1)

    def work(lo: int, hi: int) -> None:
        for b0 in range(lo, hi, bp):
            b1 = min(b0 + bp, hi)
            x1, x2 = s1[b0:b1], s2[b0:b1]
            x2 *= a2[b0:b1]
            if kernel is None:  # s1 ← a1 + a2·s2 (a1 a constant spectrum)
                np.add(x2, a1[b0:b1], out=x1)
            else:
                x1 *= a1[b0:b1]
                x1 += x2
                np.multiply(x1, kernel[b0:b1], out=x2)

    _by_ranges(s1.shape[0], work)


def _admm_tv(
    grid: FftGrid,
    kernel: F32,
    data: F32,
    weight: F32 | None,
    vs: NDArray[np.float64],
    *,
    lam: float,
    tv_weights: list[F32] | None = None,
    rho_data: float,
    rho_tv: float,
    max_iter: int,
    tol: float,
    relax: float = 1.0,
) -> tuple[F32, Info]:
    """ADMM for ``min_χ ½‖W(Aχ − y)‖² + λ Σ_a ‖w_a G_a χ‖₁`` with A = F⁻¹ diag(kernel) F
    and w_a ``tv_weights`` on the grid (None: 1; float32, scaled in place into the thresholds).

    Splits ``z = Gχ`` (penalty ρ_tv, soft threshold) and, with a weight W, ``v = Aχ``
    (penalty ρ_data, pointwise update; Boyd et al. 2011, §3.4.3 over-relaxation α = relax).
    The χ update is diagonal in k-space (Bilgic 2014): with W, four FFTs per iteration
    (``χ̂ = (ρ_d K F(v − u1) + ρ_tv F Gᵀ(z − u)) / (ρ_d K² + ρ_tv|E|²)``, then χ and Aχ);
    without W (``weight=None``: the data term over the whole grid, y = 0 outside), two:
    ``χ̂ = (K F y + ρ_tv F Gᵀ(z − u)) / (K² + ρ_tv|E|²)``. ``data`` and ``weight`` are on the
    grid. Stops when ``‖Δχ‖/‖χ‖ < tol`` (after two iterations) or after ``max_iter``.
    """
    eig = _grad_sq_eigenvalues(grid, vs)
    r2 = np.float32(rho_tv)
    masked = weight is not None
    denom = kernel * kernel
    if masked:
        denom *= np.float32(rho_data)
    eig *= r2
    denom += eig
    del eig
    a2 = np.zeros_like(denom)
    np.divide(r2, denom, out=a2, where=denom > 0)  # ρ_tv / denom
    if masked:
        a1: NDArray[np.floating] = kernel * a2
        a1 *= np.float32(rho_data / rho_tv)  # ρ_d K / denom
        c = np.multiply(weight, weight, dtype=np.float32)
        c += np.float32(rho_data)
        np.divide(np.float32(rho_data), c, out=c)  # ρ_d / (W² + ρ_d)
        vnum = np.subtract(np.float32(1.0), c, dtype=np.float32)
        vnum *= data  # W² y / (W² + ρ_d)
        v = data.copy()  # start from the data
        u1 = np.zeros(grid.shape, np.float32)
        x = data.copy()  # v − u1, the data split's input to the next χ update
    else:
        a1 = grid.forward(data)
        a1 *= kernel
        a1 *= a2
        a1 /= r2  # K F y / denom
    del denom
    inv_h = (1.0 / vs).astype(np.float32)
    kappa: list[np.float32 | F32] = [np.float32(lam / rho_tv)] * 3
    if tv_weights is not None:  # scaled in place: the caller hands them over
        for w in tv_weights:
            w *= np.float32(lam / rho_tv)
        kappa = list(tv_weights)
    u = [np.zeros(grid.shape, np.float32) for _ in range(3)]
    rhs = np.zeros(grid.shape, np.float32)  # Gᵀ(z − u), zero at the start
    chi = np.zeros(grid.shape, np.float32)
    change = np.inf
    it = 0
    while it < max_iter:
        s2 = grid.forward(rhs)
        if masked:
            s1 = grid.forward(x)
            _kspace_pass(s1, s2, a1, a2, kernel)
            achi = grid.inverse(s2)
        else:
            s1 = s2
            _kspace_pass(s1, s2, a1, a2, None)
        del s2
        old = chi
        chi = grid.inverse(s1)
        del s1
        data_args = (achi, v, u1, x, c, vnum, relax) if masked else None
        ss_d, ss_n = _tv_image_pass(chi, old, u, kappa, inv_h, rhs, data_args)
        change = float(np.sqrt(ss_d / max(ss_n, 1e-30)))
        it += 1
        if change < tol and it > 1:
            break
    return chi, {
        "n_fft": grid.n_fft,
        "fft_shape": grid.shape,
        "iterations": it,
        "last_change": change,
        "lam": lam,
        "rho_data": rho_data if masked else None,
        "rho_tv": rho_tv,
    }


# --------------------------------------------------------------------------- inversions


def tv_admm(
    local_field_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    *,
    lam: float = 1e-4,
    rho: float | None = None,
    rho_data: float = 0.1,
    data_term: Literal["masked", "unmasked"] = "masked",
    weight: NDArray[np.floating] | None = None,
    tv_weights: Sequence[NDArray[np.floating]] | None = None,
    max_iter: int = 50,
    tol: float = 3e-3,
    relax: float = 1.0,
    pad_mm: float = 12.0,
) -> tuple[NDArray[np.float32], Info]:
    """TV-regularised dipole inversion by ADMM with a closed-form χ update (Bilgic 2014).

    Solves ``min_χ ½‖W(F⁻¹DFχ − f)‖² + λ Σ_a ‖G_a χ‖₁`` (anisotropic TV, gradients in ppm/mm)
    with TV penalty ``rho`` (default ``100·λ``). ``data_term="masked"`` (default): W is the
    mask, times ``weight`` (e.g. magnitude or inverse noise; scaled to mean 1 in the mask) if
    given, and χ outside the mask is left to the TV term (Milovic 2018's weighted linear
    split, penalty ``rho_data``): four FFTs per iteration. ``"unmasked"``: W = 1 on the whole
    padded box with f = 0 outside the mask (the QSM challenge TV-ADMM): two FFTs per
    iteration, but biased wherever the true field extends outside the mask. ``tv_weights``
    (three arrays of the field's shape, one per axis; e.g. MEDI's morphology weights,
    ``tfi.edge_weights``) weight the TV's differences, ``λ Σ_a ‖w_a G_a χ‖₁``; differences
    in the padding keep weight 1. Stops when
    ``‖Δχ‖/‖χ‖ < tol`` or after ``max_iter``. float32; memory about twelve (masked) or six
    arrays of the padded box.
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    rho_tv = 100.0 * lam if rho is None else rho
    box, grid, f, m = crop_to_mask(local_field_ppm, mask, vs, pad_mm)
    d = dipole_kernel(grid.shape, vs, b0_direction)
    fe = grid.embed(f)
    w = None
    if data_term == "masked":
        w = grid.embed(m.astype(np.float32))
        if weight is not None:
            wb = np.asarray(weight[box], np.float32) * m
            w = grid.embed(wb / np.float32(max(float(wb[m].mean()), 1e-30)))
    elif data_term != "unmasked":
        raise ValueError(f"unknown data term {data_term!r}")
    tw = None
    if tv_weights is not None:
        tw = []
        for wa in tv_weights:
            g = np.ones(grid.shape, np.float32)
            g[: m.shape[0], : m.shape[1], : m.shape[2]] = wa[box]
            tw.append(g)
    chi, info = _admm_tv(
        grid, d, fe, w, vs, lam=lam, rho_data=rho_data, rho_tv=rho_tv, max_iter=max_iter,
        tol=tol, relax=relax, tv_weights=tw,
    )
    info["data_term"] = data_term
    return _paste(local_field_ppm.shape, box, chi, m), info


def _laplacian_eigenvalues(grid: FftGrid, vs: NDArray[np.float64]) -> NDArray[np.float32]:
    """Eigenvalues (≤ 0) of the periodic 7-point Laplacian on the half spectrum."""
    out = _grad_sq_eigenvalues(grid, vs)
    out *= np.float32(-1.0)
    return out


def single_step_tv(
    total_field_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    *,
    lam: float = 1e-4,
    rho_data: float = 0.01,
    rho_tv: float | None = None,
    max_iter: int = 30,
    tol: float = 1e-2,
    pad_mm: float = 4.0,
    edge_voxels: int = 1,
    relax: float = 1.0,
) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.float32], Info]:
    """Single-step TV QSM from the *total* field: no separate background removal.

    The Laplacian of a background field vanishes inside the mask, so
    ``∇²f = ∇²(D χ)`` there (Laplacian-based single-step QSM: Chatnuntawech et al., NMR Biomed
    2017;30:e3570, "Single-step QSM with variational penalties"; Langkammer et al., NeuroImage
    2015;111:622, SS-TGV). Solves ``min ½‖M(∇²Dχ − ∇²f)‖² + λ‖∇χ‖₁`` with M the mask minus
    its outer voxel layer (where the 7-point Laplacian is defined), by ADMM with the splits
    ``v = ∇²Dχ`` (masked, pointwise update) and ``z = ∇χ`` (shrinkage); the χ update is
    diagonal in k-space. Four FFTs per iteration. χ is reported on the mask minus
    ``1 + edge_voxels`` voxel layers: the Laplacian needs one, and the next layer is poorly
    determined (on a head phantom its error was 2–3× that of the layer below), so the
    superficial cortex is kept but for a voxel or two.

    Returns χ (ppm, 0 outside the output mask), the output mask, the
    model local field ``Dχ`` on that mask (ppm, one more FFT) and info (``n_fft``,
    ``fft_shape``, iterations, last relative change).
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    rho2 = 100.0 * lam if rho_tv is None else rho_tv
    box, grid, f, m = crop_to_mask(total_field_ppm, mask, vs, pad_mm, extra_voxels=1)
    inner_box = erode_faces(m)
    inner = grid.embed(inner_box, np.float32)
    f_full = grid.embed(f)
    del f
    g = laplacian_7pt(f_full, vs)
    g *= inner
    del f_full
    a = _laplacian_eigenvalues(grid, vs)
    a *= dipole_kernel(grid.shape, vs, b0_direction)
    chi, info = _admm_tv(
        grid, a, g, inner, vs, lam=lam, rho_data=rho_data, rho_tv=rho2,
        max_iter=max_iter, tol=tol, relax=relax,
    )
    del a, g, inner
    keep = erode_faces(inner_box, edge_voxels)
    out = _paste(total_field_ppm.shape, box, chi, keep)
    mask_out = np.zeros(total_field_ppm.shape, bool)
    mask_out[box] = keep
    spec = grid.forward(chi)
    spec *= dipole_kernel(grid.shape, vs, b0_direction)
    model = _paste(total_field_ppm.shape, box, grid.inverse(spec), keep)
    info["fft_shape"] = grid.shape
    info["n_fft"] = grid.n_fft
    return out, mask_out, model, info


@dataclass(frozen=True)
class SingleStepTV:
    """Single-step TV QSM of the total field (:func:`single_step_tv`; Chatnuntawech et al., NMR
    Biomed 2017;30:e3570; Langkammer et al., NeuroImage 2015;111:622): no background removal.

    Attributes:
        lam: TV weight λ (field in ppm, gradients in ppm/mm); default 1e-4.
        rho_data: ADMM penalty of the Laplacian data split; default 0.01.
        rho_tv: ADMM penalty of the gradient split; default None: ``100·lam``.
        max_iter: ADMM iterations at most; default 30.
        tol: stop when ``‖Δχ‖/‖χ‖`` is below it; default 1e-2.
        pad_mm: zero padding around the mask's box (mm); default 4.
        edge_voxels: voxel layers dropped from χ beyond the Laplacian's one; default 1.
        relax: ADMM over-relaxation; default 1 (none).
    """

    lam: float = 1e-4
    rho_data: float = 0.01
    rho_tv: float | None = None
    max_iter: int = 30
    tol: float = 1e-2
    pad_mm: float = 4.0
    edge_voxels: int = 1
    relax: float = 1.0
    method: str = field(default="single_step_tv", init=False)

    def invert_total(
        self, total_field_ppm: NDArray[np.floating], mask: NDArray[np.bool_],
        voxel_size_mm: ArrayLike, b0_direction: ArrayLike,
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.float32], Info]:
        """χ, its mask, the model local field and info (:func:`single_step_tv`)."""
        return single_step_tv(total_field_ppm, mask, voxel_size_mm, b0_direction,
                              **keywords(self))


@dataclass(frozen=True)
class TVADMM:
    """TV-regularised dipole inversion of the local field by ADMM (:func:`tv_admm`; Bilgic et
    al., MRM 2014;72:1444; the masked data term: Milovic et al., MRM 2018;80:814).

    Attributes:
        lam: TV weight λ (field in ppm, gradients in ppm/mm); default 1e-4.
        rho: ADMM penalty of the gradient split; default None: ``100·lam``.
        rho_data: ADMM penalty of the masked data split; default 0.1.
        data_term: ``"masked"`` (default; weighted by the mask and the noise weight) or
            ``"unmasked"`` (the QSM challenges' closed form).
        max_iter: ADMM iterations at most; default 50.
        tol: stop when ``‖Δχ‖/‖χ‖`` is below it; default 3e-3.
        relax: ADMM over-relaxation; default 1 (none).
        pad_mm: zero padding around the mask's box (mm); default 24 (the engine's; the
            function's own is 12).
    """

    lam: float = 1e-4
    rho: float | None = None
    rho_data: float = 0.1
    data_term: Literal["masked", "unmasked"] = "masked"
    max_iter: int = 50
    tol: float = 3e-3
    relax: float = 1.0
    pad_mm: float = 24.0
    method: str = field(default="tv_admm", init=False)

    def invert(self, local_field_ppm: NDArray[np.floating], mask: NDArray[np.bool_],
               voxel_size_mm: ArrayLike, b0_direction: ArrayLike,
               weight: NDArray[np.floating] | None = None) -> tuple[NDArray[np.float32], Info]:
        """χ and info, the data term weighted by ``weight`` (inverse noise; None: the mask)."""
        return tv_admm(local_field_ppm, mask, voxel_size_mm, b0_direction, weight=weight,
                       **keywords(self))


@dataclass(frozen=True)
class TKD:
    """Truncated k-space division (:func:`tkd`; Shmueli et al., MRM 2009;62:1510; Wharton et
    al., MRM 2010;63:1292).

    Attributes:
        threshold: ``|D|`` below it is set to ``±threshold``; default 0.15.
        pad_mm: zero padding around the mask's box (mm); default 24.
    """

    threshold: float = 0.15
    pad_mm: float = 24.0
    method: str = field(default="tkd", init=False)

    def invert(self, local_field_ppm: NDArray[np.floating], mask: NDArray[np.bool_],
               voxel_size_mm: ArrayLike, b0_direction: ArrayLike,
               weight: NDArray[np.floating] | None = None) -> tuple[NDArray[np.float32], Info]:
        """χ and info (``weight`` is not used)."""
        return tkd(local_field_ppm, mask, voxel_size_mm, b0_direction, **keywords(self))


LocalFieldInversion = TVADMM | TKD
"""A dipole inversion of the local field (after background removal)."""

InversionMethod = SingleStepTV | TVADMM | TKD
"""A dipole inversion with its settings; ``method`` is its name in records."""
