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
    shape = p.shape[:-1]
    num = np.zeros(shape, np.float32)
    den = np.zeros(shape, np.float32)
    sw = np.zeros(shape, np.float32)
    for n, t in enumerate(te):
        w = mag[..., n] * scale
        w *= w
        sw += w
        w *= np.float32(t)
        num += w * p[..., n]
        w *= np.float32(t)
        den += w
    omega = np.zeros(shape, np.float32)
    np.divide(num, den, out=omega, where=den > 0)
    res = np.zeros(shape, np.float32)
    for n, t in enumerate(te):
        w = mag[..., n] * scale
        w *= w
        r = p[..., n] - omega * np.float32(t)
        r *= r
        r *= w
        res += r
    np.divide(res, sw, out=res, where=sw > 0)
    np.sqrt(res, out=res)
    k = np.float32(ppm_per_rad_per_s(field_strength_t))
    field = omega * k
    noise = np.zeros(shape, np.float32)
    np.divide(k, np.sqrt(den), out=noise, where=den > 0)
    if mask is not None:
        outside = ~np.asarray(mask, bool)
        field[outside] = 0.0
        res[outside] = 0.0
        noise[outside] = 0.0
    return FieldFit(field_ppm=field, residual_rad=res, noise_ppm=noise)
