"""The simulator's own forward field model: box-shaped voxels, voxel-averaged field.

The reconstruction (``qsmnode.qsm.dipole``) models χ as band-limited samples and uses the
discrete dipole kernel ``D(k) = 1/3 − (b·k)²/|k|²`` on the FFT grid. A simulator that made its
field with that same kernel would grade the method on its own assumption (an inverse crime).
This module computes the field a scanner would see from a χ that is constant within each
voxel (a box), averaged over each receiving voxel, which is what a voxel's signal integrates:

    f̂(k) = Σₙ D(k + n/v) · B²(k + n/v) · χ̂(k),   B(q) = Πᵢ sinc(qᵢ vᵢ)

with D the continuous Lorentz-corrected dipole kernel (Salomir et al. 2003; Marques & Bowtell
2005), B the Fourier transform of a voxel box (once for the source voxel, once for the
averaging), χ̂ the discrete spectrum of the voxel values and n the aliases of the grid's
spectrum (|nᵢ| ≤ ``aliases``; the weights B² of all aliases sum to 1, so those kept are
renormalised). Near the grid's Nyquist frequency this kernel differs from the reconstruction's
(e.g. at k = ½v it averages D over k and its mirror k − 1/v).

This module imports nothing from ``qsmnode.qsm``: the simulator's truth must not come from the
code it grades.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, NDArray

_WORKERS = os.cpu_count() or 1


def voxel_kernel(
    shape: tuple[int, int, int],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    aliases: int = 1,
) -> NDArray[np.float32]:
    """The box-voxel, voxel-averaged dipole kernel on an rfft grid (half spectrum), float32.

    Args:
        shape: real-space grid shape (voxels).
        voxel_size_mm: voxel edge lengths (mm) along i, j, k.
        b0_direction: unit vector of B0 in voxel-index space.
        aliases: aliases summed per axis on each side (1: 27 terms).

    Returns:
        ``[n0, n1, n2 // 2 + 1]`` kernel, 0 at k = 0 (the mean field is not defined).
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    b = np.asarray(b0_direction, dtype=np.float64)
    b = (b / np.linalg.norm(b)).astype(np.float32)
    freqs = [np.fft.fftfreq(shape[0], vs[0]), np.fft.fftfreq(shape[1], vs[1]),
             np.fft.rfftfreq(shape[2], vs[2])]
    out_shape = (len(freqs[0]), len(freqs[1]), len(freqs[2]))
    shifts = range(-aliases, aliases + 1)

    def axis(a: int, n: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        q = (freqs[a] + n / vs[a]).astype(np.float32)
        return q, (np.sinc(q * vs[a]) ** 2).astype(np.float32)

    def one_plane_of_aliases(n0: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        total = np.zeros(out_shape, np.float32)
        weights = np.zeros(out_shape, np.float32)
        q0, w0 = axis(0, n0)
        for n1 in shifts:
            q1, w1 = axis(1, n1)
            qb01 = (q0[:, None] * b[0] + q1[None, :] * b[1])[:, :, None]
            q01 = (q0[:, None] ** 2 + q1[None, :] ** 2)[:, :, None]
            w01 = (w0[:, None] * w1[None, :])[:, :, None]
            for n2 in shifts:
                q2, w2 = axis(2, n2)
                qb = qb01 + q2 * b[2]
                qb *= qb
                norm = q01 + q2 * q2
                np.divide(qb, norm, out=qb, where=norm > 0)
                qb[np.broadcast_to(norm, qb.shape) == 0] = np.float32(1.0 / 3.0)
                np.subtract(np.float32(1.0 / 3.0), qb, out=qb)
                w = w01 * w2
                qb *= w
                total += qb
                weights += w
        return total, weights

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        parts = list(pool.map(one_plane_of_aliases, shifts))
    total = parts[0][0]
    weights = parts[0][1]
    for t, w in parts[1:]:
        total += t
        weights += w
    np.divide(total, weights, out=total, where=weights > 0)
    total[0, 0, 0] = 0.0
    return total


def voxel_field(
    chi_ppm: NDArray[np.floating],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    *,
    pad_factor: float = 1.5,
    aliases: int = 1,
) -> NDArray[np.float32]:
    """Voxel-averaged field (ppm of B0) of box-voxel χ (ppm), zero-padded (linear convolution
    over the padded box), float32 on the input grid."""
    shape = chi_ppm.shape
    fshape = tuple(sfft.next_fast_len(int(np.ceil(n * pad_factor)), real=True) for n in shape)
    spectrum = sfft.rfftn(np.asarray(chi_ppm, dtype=np.float32), s=fshape, workers=_WORKERS)
    spectrum *= voxel_kernel(fshape, voxel_size_mm, b0_direction, aliases)
    field = sfft.irfftn(spectrum, s=fshape, workers=_WORKERS)
    return np.ascontiguousarray(field[: shape[0], : shape[1], : shape[2]], dtype=np.float32)
