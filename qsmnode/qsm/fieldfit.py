"""Total field from unwrapped, offset-free multi-echo phase: weighted least squares over echoes.

Model (after MCPC-3D-S offset removal): ``ψ_n = ω·TE_n + ε_n`` with phase noise variance
``var(ε_n) ∝ 1/|S_n|²``. The best linear unbiased estimate through the origin is
``ω = Σ w_n TE_n ψ_n / Σ w_n TE_n²`` with ``w_n = |S_n|²``; equivalently the average of the
per-echo frequencies ``ψ_n/TE_n`` with weights ``|S_n|²·TE_n²``, which is the phase-SNR weighting
of ROMEO's B0 combination (Dymerska 2021) and of the multi-echo fits in MEDI (Liu 2013, Wu
2012). ``field_ppm = ω / (2π·γ̄·B0) · 1e6``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qsmnode.acquisition import GAMMA_BAR_HZ_PER_T
from qsmnode.qsm.util import plane_blocks


@dataclass(frozen=True)
class FieldFit:
    """Result of :func:`fit_field`.

    Attributes:
        field_ppm: total field in ppm of B0, float32.
        residual_rad: weighted RMS phase residual of the fit per voxel (radians), float32.
        noise_ppm: standard deviation of ``field_ppm`` per voxel, from the residual-free noise
            model ``σ_φ = 1/SNR`` with the magnitude as SNR up to a global scale (relative
            weights for weighted inversion), float32.
    """

    field_ppm: NDArray[np.float32]
    residual_rad: NDArray[np.float32]
    noise_ppm: NDArray[np.float32]


def ppm_per_rad_per_s(field_strength_t: float) -> float:
    """ppm of B0 per rad/s of angular frequency offset."""
    return 1e6 / (2.0 * np.pi * GAMMA_BAR_HZ_PER_T * field_strength_t)


def fit_field(
    phase_unwrapped: NDArray[np.floating],
    magnitude: NDArray[np.floating],
    echo_times_s: ArrayLike,
    field_strength_t: float,
    mask: NDArray[np.bool_] | None = None,
) -> FieldFit:
    """Weighted LS field (ppm) through the origin over echoes ``[i, j, k, echo]``.

    Weights are ``magnitude²`` (inverse phase-noise variance). ``residual_rad`` is the
    weighted RMS of ``ψ_n − ω·TE_n``; large values flag non-linear phase (unwrapping errors,
    flow, residual offsets). Outside ``mask`` all outputs are 0.
    """
    te = np.asarray(echo_times_s, dtype=np.float64)
    p = np.asarray(phase_unwrapped, dtype=np.float32)
    mag = np.asarray(magnitude, dtype=np.float32)
    scale = np.float32(1.0 / max(float(mag.max()), 1e-30))
    k = np.float32(ppm_per_rad_per_s(field_strength_t))
    shape = p.shape[:-1]
    field = np.empty(shape, np.float32)
    res = np.empty(shape, np.float32)
    noise = np.empty(shape, np.float32)
    for b in plane_blocks(shape[0], p[0].nbytes):
        _fit_block(p[b], mag[b], te, scale, k, field[b], res[b], noise[b])
    if mask is not None:
        outside = ~np.asarray(mask, bool)
        for out in (field, res, noise):
            np.copyto(out, 0.0, where=outside)
    return FieldFit(field_ppm=field, residual_rad=res, noise_ppm=noise)


def _fit_block(p: NDArray[np.float32], mag: NDArray[np.float32], te: NDArray[np.float64],
               scale: np.float32, k: np.float32, field: NDArray[np.float32],
               res: NDArray[np.float32], noise: NDArray[np.float32]) -> None:
    """:func:`fit_field` without the mask on one block of planes, into ``field``, ``res``
    and ``noise`` (views of the outputs)."""
    shape = p.shape[:-1]
    num = np.zeros(shape, np.float32)
    den = np.zeros(shape, np.float32)
    sw = np.zeros(shape, np.float32)
    w = np.empty(shape, np.float32)
    r = np.empty(shape, np.float32)
    for n, t in enumerate(te):
        np.multiply(mag[..., n], scale, out=w)
        w *= w
        sw += w
        w *= np.float32(t)
        num += np.multiply(w, p[..., n], out=r)
        w *= np.float32(t)
        den += w
    omega = field
    omega.fill(0.0)
    np.divide(num, den, out=omega, where=den > 0)
    res.fill(0.0)
    for n, t in enumerate(te):
        np.multiply(mag[..., n], scale, out=w)
        w *= w
        np.multiply(omega, np.float32(t), out=r)
        np.subtract(p[..., n], r, out=r)
        r *= r
        r *= w
        res += r
    np.divide(res, sw, out=res, where=sw > 0)
    np.sqrt(res, out=res)
    omega *= k  # the field (ppm)
    noise.fill(0.0)
    np.divide(k, np.sqrt(den, out=den), out=noise, where=den > 0)
