"""Small synthetic inputs for tests and quick checks of the QSM engine (not the phantom).

The signal model is the one the engine inverts: ``S_n = M0·exp(−R2*·TE_n)·exp(i(2πγ̄B0·TE_n·
field·1e-6 + φ0))`` plus complex Gaussian noise, with the field from ``dipole.forward_field``
(Salomir 2003, Marques & Bowtell 2005).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qsmnode.acquisition import GAMMA_BAR_HZ_PER_T


def centred_coordinates(
    shape: tuple[int, int, int], voxel_size_mm: ArrayLike
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Voxel-centre coordinates (mm) with the origin at the grid centre, as open meshes."""
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    axes = [
        ((np.arange(n) - (n - 1) / 2.0) * h).astype(np.float32)
        for n, h in zip(shape, vs, strict=True)
    ]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def ellipsoid(
    shape: tuple[int, int, int],
    voxel_size_mm: ArrayLike,
    semi_axes_mm: ArrayLike,
    centre_mm: ArrayLike = (0.0, 0.0, 0.0),
) -> NDArray[np.bool_]:
    """Boolean ellipsoid (axis-aligned) in a grid, sizes in mm."""
    x, y, z = centred_coordinates(shape, voxel_size_mm)
    a = np.asarray(semi_axes_mm, dtype=np.float32)
    c = np.asarray(centre_mm, dtype=np.float32)
    return ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2 <= 1.0


def multi_echo_signal(
    m0: NDArray[np.floating],
    r2star_per_s: NDArray[np.floating] | float,
    field_ppm: NDArray[np.floating],
    echo_times_s: ArrayLike,
    field_strength_t: float,
    *,
    phase_offset: NDArray[np.floating] | float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Magnitude and wrapped phase ``[i, j, k, echo]`` (float32) of the GRE signal model."""
    rng = np.random.default_rng(seed)
    te = np.asarray(echo_times_s, dtype=np.float64)
    omega = (
        2.0
        * np.pi
        * GAMMA_BAR_HZ_PER_T
        * field_strength_t
        * 1e-6
        * np.asarray(field_ppm, np.float64)
    )
    shape = np.shape(m0)
    mag = np.empty((*shape, te.size), np.float32)
    phase = np.empty_like(mag)
    for n, t in enumerate(te):
        s = (
            np.asarray(m0)
            * np.exp(-np.asarray(r2star_per_s) * t)
            * np.exp(1j * (omega * t + phase_offset))
        )
        if noise > 0:
            s = s + noise * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        mag[..., n] = np.abs(s)
        phase[..., n] = np.angle(s)
    return mag, phase
