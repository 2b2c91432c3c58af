"""Phase offset (φ0, the phase at TE = 0) estimation and removal: MCPC-3D-S.

Eckstein et al., "Computationally efficient combination of multi-channel phase data from
multi-echo acquisitions (ASPIRE)", MRM 2018;79:2996, method MCPC-3D-S: with the phase
difference of echoes 2 and 1 unwrapped spatially, ``Δ = φ₂ − φ₁ = ω·(TE₂ − TE₁)``, the offset
is ``φ0 = φ₁ − TE₁·Δ/(TE₂ − TE₁)``. It holds for unequal echo spacing, since only the two
first echoes enter. φ0 is smoothed as a magnitude-weighted complex image (so wraps in φ0 do no
harm) and removed from every echo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from qsmnode.qsm.unwrap import wrap
from qsmnode.qsm.util import block_mean, plane_blocks, upsample_linear


def echo_difference(
    phase: NDArray[np.floating], first: int = 0, second: int = 1
) -> NDArray[np.float32]:
    """Wrapped phase of echo ``second`` relative to echo ``first`` (the Hermitian product)."""
    d = np.subtract(np.asarray(phase[..., second], np.float32),
                    np.asarray(phase[..., first], np.float32))
    return wrap(d, out=d)


def local_linear_smooth(
    values: NDArray[np.floating],
    weights: NDArray[np.floating],
    sigma_vox: ArrayLike,
    ridge: float = 1e-3,
) -> NDArray[np.float32]:
    """Weighted local linear regression with a Gaussian window, evaluated at each voxel.

    First-order normalised convolution (Knutsson & Westin 1993; LOESS, Cleveland 1979): unlike
    a plain weighted Gaussian average, it reproduces linear trends exactly, also next to the
    edge of the weights, so a smoothed phase offset is not biased at the brain surface. The
    Gaussian moments come from Gaussian-derivative filters (``g(u)·u = −σ²∇g``).
    """
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    w = np.asarray(weights, np.float32)
    wv = w * np.asarray(values, np.float32)

    def gf(x: NDArray[np.float32], order: tuple[int, int, int]) -> NDArray[np.float32]:
        return ndimage.gaussian_filter(x, sig, order=order, mode="constant", truncate=3.0)

    unit = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    m0 = gf(w, (0, 0, 0))
    m1 = [sig[i] ** 2 * gf(w, unit[i]) for i in range(3)]
    m2 = {}
    for i in range(3):
        for j in range(i, 3):
            order = tuple(int(unit[i][a] + unit[j][a]) for a in range(3))
            m2[i, j] = sig[i] ** 2 * sig[j] ** 2 * gf(w, order)  # type: ignore[arg-type]
            if i == j:
                m2[i, j] += sig[i] ** 2 * m0
    b0 = gf(wv, (0, 0, 0))
    b1 = [sig[i] ** 2 * gf(wv, unit[i]) for i in range(3)]
    # the 4×4 systems, one per voxel, held entry-major (each entry a contiguous volume, written
    # in one pass) and handed to the solver as a [..., 4, 4] view
    a = np.empty((4, 4, *w.shape), np.float64)
    a[0, 0] = m0
    for i in range(3):
        a[0, i + 1] = a[i + 1, 0] = m1[i]
        for j in range(i, 3):
            a[i + 1, j + 1] = a[j + 1, i + 1] = m2[i, j]
    scale = np.maximum(m0, 1e-12)
    a[0, 0] += ridge * scale
    for i in range(3):
        a[i + 1, i + 1] += ridge * scale * sig[i] ** 2
    rhs = np.stack([b0, *b1]).astype(np.float64)
    theta = np.linalg.solve(np.moveaxis(a, (0, 1), (-2, -1)),
                            np.moveaxis(rhs, 0, -1)[..., None])[..., 0, 0]
    return np.where(m0 > 1e-6, theta, 0.0).astype(np.float32)


@dataclass(frozen=True)
class MCPC3DS:
    """MCPC-3D-S phase offset removal (:func:`mcpc3ds_offset`; Eckstein et al., MRM
    2018;79:2996).

    Attributes:
        sigma_mm: Gaussian width of the complex smoothing of φ0 (mm); default 4.
    """

    sigma_mm: float = 4.0
    method: str = field(default="mcpc3ds", init=False)


def mcpc3ds_offset(
    phase_first: NDArray[np.floating],
    difference_unwrapped: NDArray[np.floating],
    te_first_s: float,
    te_second_s: float,
    voxel_size_mm: ArrayLike,
    *,
    magnitude: NDArray[np.floating] | None = None,
    mask: NDArray[np.bool_] | None = None,
    sigma_mm: float = 4.0,
) -> NDArray[np.float32]:
    """Smoothed phase offset φ0 (wrapped, float32) by MCPC-3D-S (Eckstein 2018).

    The raw offset is smoothed as a weighted complex image (Gaussian, ``sigma_mm``), then the
    small wrapped residual is fitted by a local linear regression (:func:`local_linear_smooth`),
    which removes the bias that plain smoothing leaves at the mask edge. Both run on a grid
    decimated by about ``σ/1.5`` voxels per axis (φ0 is smooth) and are interpolated back.

    Args:
        phase_first: wrapped phase of the earliest echo.
        difference_unwrapped: spatially unwrapped phase of echo 2 relative to echo 1.
        te_first_s, te_second_s: echo times of those echoes.
        voxel_size_mm: voxel edge lengths (for the smoothing width).
        magnitude: weights for the smoothing (first-echo magnitude); uniform if None.
        mask: voxels that take part in the smoothing; the result is extrapolated outside.
        sigma_mm: Gaussian smoothing width; 0 disables smoothing.
    """
    ratio = np.float32(te_first_s / (te_second_s - te_first_s))
    raw = np.multiply(np.asarray(difference_unwrapped, np.float32), ratio)
    np.subtract(np.asarray(phase_first, np.float32), raw, out=raw)
    if sigma_mm <= 0:
        return wrap(raw, out=raw)
    if magnitude is None:
        w = np.ones(raw.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
    elif mask is None:
        w = np.array(magnitude, np.float32)
    else:
        w = np.multiply(np.asarray(magnitude, np.float32), mask, dtype=np.float32)
    w /= np.float32(max(float(w.max()), 1e-30))
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    sigma_vox = sigma_mm / vs
    factors = tuple(max(1, int(np.floor(s / 1.5))) for s in sigma_vox)
    shape = raw.shape
    z = np.multiply(raw, 1j, dtype=np.complex64)
    del raw
    np.exp(z, out=z)
    z *= w
    del w
    z = block_mean(z, factors)  # type: ignore[arg-type]
    sig_d = sigma_vox / np.asarray(factors)
    smooth = ndimage.gaussian_filter(z.real, sig_d, mode="constant", truncate=3.0) + 1j * (
        ndimage.gaussian_filter(z.imag, sig_d, mode="constant", truncate=3.0)
    )
    base = np.angle(smooth).astype(np.float32)
    resid = np.angle(z * np.exp(-1j * base)).astype(np.float32)
    base += local_linear_smooth(resid, np.abs(z), sig_d)
    re = upsample_linear(np.cos(base), factors, shape)  # type: ignore[arg-type]
    im = upsample_linear(np.sin(base), factors, shape)  # type: ignore[arg-type]
    return np.arctan2(im, re, out=im)


def remove_offset(phase: NDArray[np.floating], offset: NDArray[np.floating]) -> NDArray[np.float32]:
    """Every echo of ``phase [i, j, k, echo]`` minus ``offset [i, j, k]``, wrapped, float32."""
    ph = np.asarray(phase, np.float32)
    off = np.asarray(offset, np.float32)
    out = np.empty(ph.shape, np.float32)
    for b in plane_blocks(ph.shape[0], ph[0].nbytes):
        np.subtract(ph[b], off[b][..., None], out=out[b])
        wrap(out[b], out=out[b])
    return out
