"""The unit dipole kernel and the forward field model.

The field perturbation (ppm of B0) of a susceptibility distribution χ (ppm) is the convolution
of χ with the unit dipole, written in k-space as ``D(k) = 1/3 - (b·k)²/|k|²`` with ``D(0) = 0``
(Salomir et al. 2003, Marques & Bowtell 2005). This form already carries the Lorentz-sphere
correction, so a uniform sphere has zero field shift inside it.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, NDArray

FFT_WORKERS = int(os.environ.get("QSMNODE_FFT_WORKERS", "0")) or (os.cpu_count() or 1)
"""Threads for scipy.fft; QSMNODE_FFT_WORKERS overrides the core count."""


def kspace_coordinates(
    shape: tuple[int, int, int], voxel_size_mm: ArrayLike, *, real: bool = True
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Open-mesh k-space coordinates (cycles/mm) of an FFT grid, the last axis halved if real."""
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    ki = sfft.fftfreq(shape[0], d=vs[0]).astype(np.float32)
    kj = sfft.fftfreq(shape[1], d=vs[1]).astype(np.float32)
    kk_fn = sfft.rfftfreq if real else sfft.fftfreq
    kk = kk_fn(shape[2], d=vs[2]).astype(np.float32)
    return ki[:, None, None], kj[None, :, None], kk[None, None, :]


def dipole_kernel(
    shape: tuple[int, int, int],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    *,
    real: bool = True,
) -> NDArray[np.float32]:
    """The dipole kernel D(k) on an FFT grid, float32.

    Args:
        shape: grid shape (voxels).
        voxel_size_mm: voxel edge lengths along i, j, k.
        b0_direction: unit vector of B0 in voxel-index space (see ``acquisition.b0_direction``).
        real: return the half spectrum that ``scipy.fft.rfftn`` produces.
    """
    b = np.asarray(b0_direction, dtype=np.float64)
    b = (b / np.linalg.norm(b)).astype(np.float32)
    ki, kj, kk = kspace_coordinates(shape, voxel_size_mm, real=real)
    kb = ki * b[0] + kj * b[1] + kk * b[2]
    k2 = ki * ki + kj * kj + kk * kk
    k2[0, 0, 0] = 1.0
    d = np.float32(1.0 / 3.0) - kb * kb / k2
    d[0, 0, 0] = 0.0
    return d.astype(np.float32, copy=False)


def padded_shape(shape: tuple[int, ...], pad_factor: float = 1.5) -> tuple[int, int, int]:
    """A fast FFT size at least ``pad_factor`` times each dimension (linear convolution)."""
    return tuple(sfft.next_fast_len(int(np.ceil(n * pad_factor)), real=True) for n in shape)


def forward_field(
    chi_ppm: NDArray[np.floating],
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    *,
    pad_factor: float = 1.5,
) -> NDArray[np.float32]:
    """Field perturbation (ppm of B0) of a susceptibility map (ppm), zero-padded."""
    shape = chi_ppm.shape
    fshape = padded_shape(shape, pad_factor)
    spectrum = sfft.rfftn(np.asarray(chi_ppm, dtype=np.float32), s=fshape, workers=FFT_WORKERS)
    spectrum *= dipole_kernel(fshape, voxel_size_mm, b0_direction)
    field = sfft.irfftn(spectrum, s=fshape, workers=FFT_WORKERS)
    return np.ascontiguousarray(field[: shape[0], : shape[1], : shape[2]], dtype=np.float32)
