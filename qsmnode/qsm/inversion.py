"""Dipole inversion: local field (ppm) → susceptibility χ (ppm).

- :func:`tkd`: truncated k-space division (Shmueli et al., MRM 2009;62:1510; Wharton et al.,
  MRM 2010;63:1292): ``χ = F⁻¹[F(f) / D]`` with ``|D|`` clamped below at the threshold
  (keeping its sign), two FFTs.
- :func:`tv_admm`: ``min ½‖Dχ − f‖² + λ‖∇χ‖₁`` by ADMM with the closed-form k-space χ update
  (Bilgic et al., "Fast QSM with L1-regularization and automatic parameter selection",
  MRM 2014;72:1444; the TV-ADMM of the QSM challenges): two FFTs per iteration.
- :func:`single_step_tv`: TV-regularised inversion of the *total* field through its
  Laplacian (Chatnuntawech 2017; Langkammer 2015), which removes the background without an
  SMV erosion: four FFTs per iteration. The default of the engine (see ``pipeline``).

The kernel follows the true (oblique) B0 direction and the voxel size (``dipole.dipole_kernel``).
Both work on the mask's bounding box, zero-padded by ``pad_mm`` so the circular convolution
does not fold the field of one edge into the other (important for slabs). Every function
returns ``(chi_ppm, info)`` where ``info["n_fft"]`` counts FFTs on ``info["fft_shape"]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from qsmnode.qsm.dipole import dipole_kernel
from qsmnode.qsm.util import FftGrid, bounding_box, fast_shape, laplacian_7pt

Info = dict[str, Any]


def _setup(
    field: NDArray[np.floating], mask: NDArray[np.bool_], voxel_size_mm: ArrayLike, pad_mm: float
) -> tuple[tuple[slice, slice, slice], FftGrid, NDArray[np.float32], NDArray[np.bool_]]:
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    box = bounding_box(mask)
    m = np.ascontiguousarray(mask[box], dtype=bool)
    f = np.asarray(field[box], dtype=np.float32) * m
    grid = FftGrid(fast_shape(m.shape, np.ceil(pad_mm / vs).astype(int)))
    return box, grid, f, m


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
    box, grid, f, m = _setup(local_field_ppm, mask, vs, pad_mm)
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


def _forward_diff(
    x: NDArray[np.float32], axis: int, h: float, out: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Periodic forward difference ``(x[i+1] − x[i]) / h`` along ``axis`` into ``out``."""
    n = x.shape[axis]
    sl = [slice(None)] * 3

    def at(s: slice | int) -> tuple[slice | int, ...]:
        sl[axis] = s
        return tuple(sl)

    np.subtract(x[at(slice(1, n))], x[at(slice(0, n - 1))], out=out[at(slice(0, n - 1))])
    np.subtract(x[at(slice(0, 1))], x[at(slice(n - 1, n))], out=out[at(slice(n - 1, n))])
    out *= np.float32(1.0 / h)
    return out


def _add_backward_diff_adjoint(
    y: NDArray[np.float32], axis: int, h: float, acc: NDArray[np.float32]
) -> None:
    """``acc += G_aᵀ y`` with ``G_a`` the periodic forward difference: ``(y[i−1] − y[i]) / h``."""
    n = y.shape[axis]
    sl = [slice(None)] * 3

    def at(s: slice) -> tuple[slice, ...]:
        sl[axis] = s
        return tuple(sl)

    inv_h = np.float32(1.0 / h)
    y *= inv_h
    acc -= y
    acc[at(slice(1, n))] += y[at(slice(0, n - 1))]
    acc[at(slice(0, 1))] += y[at(slice(n - 1, n))]


def tv_admm(
    local_field_ppm: NDArray[np.floating],
    mask: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    *,
    lam: float = 1e-4,
    rho: float | None = None,
    max_iter: int = 100,
    tol: float = 3e-3,
    pad_mm: float = 24.0,
) -> tuple[NDArray[np.float32], Info]:
    """TV-regularised dipole inversion by ADMM with a closed-form χ update (Bilgic 2014).

    Solves ``min_χ ½‖F⁻¹DFχ − f‖² + λ Σ_a ‖G_a χ‖₁`` (anisotropic TV, gradients in ppm/mm)
    with the splitting ``z = Gχ``, penalty ``ρ`` (default ``100·λ``). Per iteration: one rfft
    and one irfft for ``χ = F⁻¹[(D·F f + ρ E^H F(z − u)) / (D² + ρ|E|²)]`` (denominator
    precomputed), then the shrinkage ``z = soft(Gχ + u, λ/ρ)`` in image space. Stops when
    ``‖Δχ‖/‖χ‖ < tol`` or after ``max_iter`` iterations. float32 throughout; memory is about
    nine arrays of the padded box.
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    rho_ = 100.0 * lam if rho is None else rho
    box, grid, f, m = _setup(local_field_ppm, mask, vs, pad_mm)
    d = dipole_kernel(grid.shape, vs, b0_direction)
    denom = d * d
    denom += np.float32(rho_) * _grad_sq_eigenvalues(grid, vs)
    inv_denom = np.zeros_like(denom)
    np.divide(np.float32(1.0), denom, out=inv_denom, where=denom > 0)
    del denom
    dtf = grid.forward(grid.embed(f))
    dtf *= d
    del d
    kappa = np.float32(lam / rho_)
    rho32 = np.float32(rho_)
    u = [np.zeros(grid.shape, np.float32) for _ in range(3)]
    rhs = np.zeros(grid.shape, np.float32)  # Gᵀ(z − u), zero at the start
    tmp = np.empty(grid.shape, np.float32)
    chi = np.zeros(grid.shape, np.float32)
    change = np.inf
    it = 0
    while it < max_iter:
        spec = grid.forward(rhs)
        spec *= rho32
        spec += dtf
        spec *= inv_denom
        new = grid.inverse(spec)
        np.subtract(new, chi, out=tmp)
        change = float(np.linalg.norm(tmp) / max(float(np.linalg.norm(new)), 1e-30))
        chi = new
        it += 1
        if change < tol and it > 1:
            break
        rhs.fill(0.0)
        for axis in range(3):
            _forward_diff(chi, axis, vs[axis], tmp)
            tmp += u[axis]  # v = Gχ + u
            np.clip(tmp, -kappa, kappa, out=u[axis])  # u ← v − soft(v) = clip(v)
            tmp -= u[axis]
            tmp -= u[axis]  # z − u = soft(v) − clip(v) = v − 2 clip(v)
            _add_backward_diff_adjoint(tmp, axis, vs[axis], rhs)
    info = {
        "n_fft": grid.n_fft,
        "fft_shape": grid.shape,
        "iterations": it,
        "last_change": change,
        "lam": lam,
        "rho": rho_,
    }
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
    box = bounding_box(mask)
    m = np.ascontiguousarray(mask[box], dtype=bool)
    grid = FftGrid(fast_shape(m.shape, np.ceil(pad_mm / vs).astype(int) + 1))
    m_full = grid.embed(m, bool).astype(bool)
    inner = ndimage.binary_erosion(m_full, structure=ndimage.generate_binary_structure(3, 1))
    f_full = grid.embed(np.asarray(total_field_ppm[box], np.float32) * m)
    g = laplacian_7pt(f_full, vs)
    g *= inner
    del f_full
    a = _laplacian_eigenvalues(grid, vs)
    a *= dipole_kernel(grid.shape, vs, b0_direction)
    r1 = np.float32(rho_data)
    r2 = np.float32(rho2)
    denom = a * a
    denom *= r1
    denom += r2 * _grad_sq_eigenvalues(grid, vs)
    inv_denom = np.zeros_like(denom)
    np.divide(np.float32(1.0), denom, out=inv_denom, where=denom > 0)
    del denom
    # v-update constants: v = (M g + ρ1(Aχ + u1)) / (M + ρ1)
    v_scale = np.where(inner, r1 / (1 + r1), np.float32(1.0)).astype(np.float32)
    g /= 1 + r1
    kappa = np.float32(lam / rho2)
    chi = np.zeros(grid.shape, np.float32)
    v = g * (1 + r1)  # start from the data
    u1 = np.zeros(grid.shape, np.float32)
    u = [np.zeros(grid.shape, np.float32) for _ in range(3)]
    rhs_tv = np.zeros(grid.shape, np.float32)  # Gᵀ(z − u)
    tmp = np.empty(grid.shape, np.float32)
    change = np.inf
    it = 0
    while it < max_iter:
        np.subtract(v, u1, out=tmp)
        spec = grid.forward(tmp)
        spec *= a
        spec *= r1
        spec_tv = grid.forward(rhs_tv)
        spec_tv *= r2
        spec += spec_tv
        spec *= inv_denom
        np.multiply(spec, a, out=spec_tv)
        a_chi = grid.inverse(spec_tv)
        new = grid.inverse(spec)
        np.subtract(new, chi, out=tmp)
        change = float(np.linalg.norm(tmp) / max(float(np.linalg.norm(new)), 1e-30))
        chi = new
        it += 1
        # data split: v = (M g + ρ1 (h + u1)) / (M + ρ1); u1 += h − v, with the
        # over-relaxed h = αAχ + (1 − α)v (Boyd et al. 2011, §3.4.3)
        if relax != 1.0:
            a_chi *= np.float32(relax)
            a_chi += np.float32(1.0 - relax) * v
        np.add(a_chi, u1, out=v)
        v *= v_scale
        v += g
        u1 += a_chi
        u1 -= v
        if change < tol and it > 1:
            break
        # TV split, as in tv_admm
        rhs_tv.fill(0.0)
        for axis in range(3):
            _forward_diff(chi, axis, vs[axis], tmp)
            tmp += u[axis]
            np.clip(tmp, -kappa, kappa, out=u[axis])
            tmp -= u[axis]
            tmp -= u[axis]
            _add_backward_diff_adjoint(tmp, axis, vs[axis], rhs_tv)
    out = _paste(total_field_ppm.shape, box, chi, m)
    mask_out = np.zeros(total_field_ppm.shape, bool)
    keep = inner
    if edge_voxels > 0:
        face = ndimage.generate_binary_structure(3, 1)
        keep = ndimage.binary_erosion(inner, structure=face, iterations=edge_voxels)
    mask_out[box] = keep[: m.shape[0], : m.shape[1], : m.shape[2]]
    out[~mask_out] = 0.0
    spec = grid.forward(chi)
    spec *= dipole_kernel(grid.shape, vs, b0_direction)
    model = _paste(total_field_ppm.shape, box, grid.inverse(spec), m)
    model[~mask_out] = 0.0
    info = {
        "n_fft": grid.n_fft,
        "fft_shape": grid.shape,
        "iterations": it,
        "last_change": change,
        "lam": lam,
        "rho_data": rho_data,
        "rho_tv": rho2,
    }
    return out, mask_out, model, info
