"""R2*/T2* mapping and echo combination from multi-echo magnitude.

Two mono-exponential estimators, both closed-form and vectorised over voxels:

- ARLO, auto-regression on linear operations (Pei et al., MRM 2015;73:843): for equally spaced
  echoes, Simpson's rule over each pair of intervals gives ``∫S dt = T2*·(S_i − S_{i+2})``; a
  least-squares fit of the integrals against the differences gives R2*. No logarithms, so it
  is unbiased where the late echoes sit in the noise.
- Weighted log-linear least squares of ``ln S = ln S0 − R2*·TE`` with weights ``S²`` (the
  inverse variance of ``ln S``), for any echo spacing and for two echoes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qsmnode.qsm.util import plane_blocks

R2STAR_MAX_PER_S = 500.0
"""Upper clip of R2* (1/s); veins at 7T reach ~150–300 s⁻¹, anything above is noise."""


def _echoes_equally_spaced(te: NDArray[np.float64], rtol: float = 1e-3) -> bool:
    d = np.diff(te)
    return bool(te.size >= 3 and np.allclose(d, d[0], rtol=rtol, atol=0.0))


def r2star_arlo(magnitude: NDArray[np.floating], echo_times_s: ArrayLike) -> NDArray[np.float32]:
    """R2* (1/s, unclipped) by ARLO (Pei 2015) for ≥3 equally spaced echoes, float32.

    Per voxel ``R2* = Σ s_i d_i / Σ s_i²`` with ``s_i = ΔTE/3·(S_i + 4S_{i+1} + S_{i+2})`` and
    ``d_i = S_i − S_{i+2}``.
    """
    te = np.asarray(echo_times_s, dtype=np.float64)
    if not _echoes_equally_spaced(te):
        raise ValueError("ARLO needs at least 3 equally spaced echoes")
    mag = np.asarray(magnitude, dtype=np.float32)
    third = np.float32((te[1] - te[0]) / 3.0)
    out = np.zeros(mag.shape[:-1], dtype=np.float32)
    if mag.ndim < 2:
        _arlo_block(mag, te.size, third, out)
        return out
    for b in plane_blocks(mag.shape[0], mag[0].nbytes):
        _arlo_block(mag[b], te.size, third, out[b])
    return out


def _arlo_block(mag: NDArray[np.float32], n_echoes: int, third: np.float32,
                out: NDArray[np.float32]) -> None:
    """:func:`r2star_arlo` on one block of planes, into ``out`` (zeros; a view of the output)."""
    num = np.zeros(mag.shape[:-1], dtype=np.float32)
    den = np.zeros(mag.shape[:-1], dtype=np.float32)
    s = np.empty(mag.shape[:-1], dtype=np.float32)
    d = np.empty(mag.shape[:-1], dtype=np.float32)
    for i in range(n_echoes - 2):
        np.multiply(mag[..., i + 1], 4.0, out=s)
        np.add(mag[..., i], s, out=s)
        s += mag[..., i + 2]
        s *= third
        np.subtract(mag[..., i], mag[..., i + 2], out=d)
        d *= s
        num += d
        s *= s
        den += s
    np.divide(num, den, out=out, where=den > 0)


def r2star_loglinear(
    magnitude: NDArray[np.floating], echo_times_s: ArrayLike
) -> NDArray[np.float32]:
    """R2* (1/s, unclipped) by log-linear least squares weighted by ``S²``, float32.

    Weighted regression of ``ln S`` on TE; works for two echoes and for unequal spacing.
    """
    te = np.asarray(echo_times_s, dtype=np.float64)
    mag = np.asarray(magnitude, dtype=np.float32)
    tiny = np.float32(np.finfo(np.float32).tiny)
    sw = np.zeros(mag.shape[:-1], dtype=np.float64)
    swt = np.zeros_like(sw)
    swtt = np.zeros_like(sw)
    swy = np.zeros_like(sw)
    swty = np.zeros_like(sw)
    for n, t in enumerate(te):
        s = mag[..., n]
        w = (s * s).astype(np.float64)
        y = np.log(np.maximum(s, tiny), dtype=np.float64)
        sw += w
        swt += w * t
        swtt += w * t * t
        swy += w * y
        swty += w * t * y
    det = sw * swtt - swt * swt
    slope = np.zeros_like(sw)
    np.divide(sw * swty - swt * swy, det, out=slope, where=det > 0)
    return (-slope).astype(np.float32)


def r2star_map(
    magnitude: NDArray[np.floating],
    echo_times_s: ArrayLike,
    *,
    method: Literal["auto", "arlo", "loglinear"] = "auto",
    mask: NDArray[np.bool_] | None = None,
    r2star_max_per_s: float = R2STAR_MAX_PER_S,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """R2* (1/s) and T2* (s) maps from magnitude ``[i, j, k, echo]``, float32.

    ``auto`` uses ARLO (Pei 2015) for ≥3 equally spaced echoes and the weighted log-linear fit
    otherwise. R2* is clipped to ``[0, r2star_max_per_s]``; T2* is ``1/R2*`` with 0 where
    R2* is 0. Voxels outside ``mask`` are 0 in both maps.
    """
    te = np.asarray(echo_times_s, dtype=np.float64)
    if te.size < 2:
        raise ValueError("R2* needs at least two echoes")
    if method == "auto":
        method = "arlo" if _echoes_equally_spaced(te) else "loglinear"
    r2s = r2star_arlo(magnitude, te) if method == "arlo" else r2star_loglinear(magnitude, te)
    np.nan_to_num(r2s, copy=False, nan=0.0, posinf=r2star_max_per_s, neginf=0.0)
    np.clip(r2s, 0.0, r2star_max_per_s, out=r2s)
    if mask is not None:
        r2s[~mask] = 0.0
    t2s = np.zeros_like(r2s)
    np.divide(1.0, r2s, out=t2s, where=r2s > 0)
    return r2s, t2s


def combine_magnitude(
    magnitude: NDArray[np.floating],
    echo_times_s: ArrayLike,
    *,
    method: Literal["rss", "te_weighted"] = "rss",
) -> NDArray[np.float32]:
    """One T2*-weighted magnitude image from all echoes, float32.

    ``rss``: root sum of squares over echoes (SNR-optimal for matched filtering of a decay whose
    echo amplitudes are the weights). ``te_weighted``: ``Σ TE_n S_n / Σ TE_n``, which leans on
    the late echoes for more T2* contrast (as in SWI/T2* echo combination, Posse 1999).
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    if method == "rss":
        out = np.zeros(mag.shape[:-1], dtype=np.float32)
        blocks = plane_blocks(mag.shape[0], mag[0].nbytes) if mag.ndim > 1 else [...]
        for b in blocks:
            mb, ob = mag[b], out[b]
            sq = np.empty(ob.shape, dtype=np.float32)
            for n in range(mag.shape[-1]):
                ob += np.multiply(mb[..., n], mb[..., n], out=sq)
        return np.sqrt(out, out=out)
    te = np.asarray(echo_times_s, dtype=np.float64)
    out = np.zeros(mag.shape[:-1], dtype=np.float32)
    for n, t in enumerate(te):
        out += np.float32(t) * mag[..., n]
    out /= np.float32(te.sum())
    return out
