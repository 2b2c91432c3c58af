"""Exact phase unwrapping: spatial unwrapping of one template, temporal unwrapping of the echoes.

The default follows the template idea of ROMEO (Dymerska et al., MRM 2021;85:2294) with a
best-path spatial unwrapper:

1. Unwrap one template spatially: the phase difference of echoes 2 and 1 (from their complex
   ratio, so the coil phase offset cancels). :func:`unwrap_spatial` uses the reliability-sorted
   best-path algorithm of Herráez et al. (Appl Opt 2002;41:7437; ``skimage.restoration.
   unwrap_phase``), or a Laplacian/Poisson unwrap (Schofield & Zhu, Opt Lett 2003;28:1194;
   Ghiglia & Romero, JOSA A 1994;11:107) made 2π-congruent by rounding.
2. Unwrap every echo in time (:func:`unwrap_temporal`): each echo's phase gets the multiple of
   2π that brings it closest to the prediction ``ω·TE``, with ω fitted from the template and the
   echoes already unwrapped. The result is exactly 2π-congruent to the input.
3. A global 2π correction per connected part of the mask: the median of the template over the
   mask is brought into [−π, π) (a well-shimmed brain has a mean off-resonance far below one
   cycle per echo spacing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from qsmnode.qsm.dipole import FFT_WORKERS
from qsmnode.qsm.util import cg

TWO_PI = np.float32(2.0 * np.pi)


def wrap(phase: NDArray[np.floating]) -> NDArray[np.float32]:
    """Phase wrapped to [−π, π), float32."""
    p = np.asarray(phase, dtype=np.float32)
    return (p + np.float32(np.pi)) % TWO_PI - np.float32(np.pi)


def congruent(wrapped: NDArray[np.floating], estimate: NDArray[np.floating]) -> NDArray[np.float32]:
    """The value 2π-congruent to ``wrapped`` that is nearest to ``estimate``, float32."""
    w = np.asarray(wrapped, dtype=np.float32)
    k = np.rint((np.asarray(estimate, dtype=np.float32) - w) / TWO_PI)
    return w + TWO_PI * k


def _laplacian_eigenvalues(
    shape: tuple[int, ...], voxel_size_mm: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Eigenvalues of the 7-point Neumann Laplacian in the DCT-II basis (≤ 0, 0 at DC)."""
    lam = np.zeros(shape, dtype=np.float64)
    for axis, (n, h) in enumerate(zip(shape, voxel_size_mm, strict=True)):
        k = np.arange(n, dtype=np.float64)
        ev = (2.0 * np.cos(np.pi * k / n) - 2.0) / (h * h)
        view = [1, 1, 1]
        view[axis] = n
        lam = lam + ev.reshape(view)
    return lam


def _masked_divergence(
    diffs: list[NDArray[np.float32]], out_shape: tuple[int, ...], voxel_size_mm: NDArray[np.float64]
) -> NDArray[np.float32]:
    """``Σ_a (d_a[i] − d_a[i−1]) / h_a²`` from forward differences ``d_a`` (zero flux at edges)."""
    out = np.zeros(out_shape, np.float32)
    for axis, (d, h) in enumerate(zip(diffs, voxel_size_mm, strict=True)):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        dd = d * np.float32(1.0 / (h * h))
        out[tuple(lo)] += dd
        out[tuple(hi)] -= dd
    return out


def _pair_masks(mask: NDArray[np.bool_]) -> list[NDArray[np.bool_]]:
    out = []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        out.append(mask[tuple(lo)] & mask[tuple(hi)])
    return out


def _dct_poisson(src: NDArray[np.float32], lam: NDArray[np.float32]) -> NDArray[np.float32]:
    """Solve the Neumann Poisson problem ``∇²u = src`` on the box (DCT-II), mean-free."""
    spec = sfft.dctn(src, type=2, workers=FFT_WORKERS)
    spec /= lam
    spec[0, 0, 0] = 0.0
    return sfft.idctn(spec, type=2, workers=FFT_WORKERS).astype(np.float32, copy=False)


def laplacian_unwrap(
    phase: NDArray[np.floating],
    voxel_size_mm: ArrayLike = (1.0, 1.0, 1.0),
    mask: NDArray[np.bool_] | None = None,
    *,
    formula: Literal["sincos", "wrapped"] = "sincos",
    tol: float = 1e-4,
    max_iter: int = 200,
) -> NDArray[np.float32]:
    """Laplacian (Poisson) phase unwrapping; a smooth estimate, not 2π-congruent, float32.

    The phase Laplacian is the divergence of per-edge phase differences, taken only between
    neighbours that are both inside ``mask`` (zero flux through its boundary):
    ``sincos`` uses ``sin Δφ`` (Schofield & Zhu 2003: ``cos φ ∇² sin φ − sin φ ∇² cos φ``),
    ``wrapped`` uses ``wrap(Δφ)`` (Ghiglia & Romero 1994), exact where neighbours differ by
    less than π. Without a mask the Neumann problem is solved directly by a DCT-II pair; with
    one, by conjugate gradients preconditioned with that DCT solver.
    """
    p = np.asarray(phase, dtype=np.float32)
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    m = np.ones(p.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    pairs = _pair_masks(m)
    diffs = []
    for axis in range(3):
        d = np.diff(p, axis=axis)
        d = np.sin(d) if formula == "sincos" else wrap(d)
        d *= pairs[axis]
        diffs.append(d)
    src = _masked_divergence(diffs, p.shape, vs)
    del diffs
    lam = _laplacian_eigenvalues(p.shape, vs).astype(np.float32)
    lam[0, 0, 0] = 1.0
    if m.all():
        return _dct_poisson(src, lam)

    def apply(x: NDArray[np.float32]) -> NDArray[np.float32]:
        grads = [np.diff(x, axis=a) * pairs[a] for a in range(3)]
        y = _masked_divergence(grads, x.shape, vs)
        y *= np.float32(-1.0)
        return y

    def precond(r: NDArray[np.float32]) -> NDArray[np.float32]:
        z = _dct_poisson(r, lam)
        z *= np.float32(-1.0)
        return z

    x, _, _ = cg(apply, -src * m, tol=tol, max_iter=max_iter, precond=precond)
    return x


def _global_correction(unwrapped: NDArray[np.float32], mask: NDArray[np.bool_]) -> None:
    """Shift each connected part of ``mask`` by 2πk so its median lies in [−π, π) (in place)."""
    labels, n = ndimage.label(mask)
    for lab in range(1, n + 1):
        part = labels == lab
        k = np.rint(np.median(unwrapped[part]) / TWO_PI)
        if k != 0:
            unwrapped[part] -= TWO_PI * np.float32(k)


@dataclass(frozen=True)
class BestPath:
    """Best-path spatial unwrapping (Herráez et al., Appl Opt 2002;41:7437; scikit-image's
    ``unwrap_phase``), restricted to the mask. No settings."""

    method: str = field(default="bestpath", init=False)

    def unwrap(self, phase: NDArray[np.float32], mask: NDArray[np.bool_],
               voxel_size_mm: ArrayLike) -> NDArray[np.float32]:
        """Unwrapped ``phase`` (wrapped, float32) in ``mask``; the input outside."""
        from skimage.restoration import unwrap_phase

        flat = tuple(n for n in phase.shape if n > 1)  # skimage prefers no length-1 axes
        ps, ms = phase.reshape(flat), mask.reshape(flat)
        if ms.all():
            res = unwrap_phase(ps)
        else:
            res = np.ma.getdata(unwrap_phase(np.ma.array(ps, mask=~ms)))
        out = np.where(mask, np.asarray(res).reshape(phase.shape), phase).astype(np.float32)
        return congruent(phase, out)  # remove float64→float32 drift


@dataclass(frozen=True)
class Laplacian:
    """Laplacian (Poisson, least-squares) unwrapping from wrapped differences (Ghiglia & Romero,
    JOSA A 1994;11:107; the sin/cos form of Schofield & Zhu, Opt Lett 2003;28:1194,
    underestimates gradients above ~1 rad/voxel), then the congruent value nearest to the
    estimate: exact where the estimate is within π of the truth. No settings."""

    method: str = field(default="laplacian", init=False)

    def unwrap(self, phase: NDArray[np.float32], mask: NDArray[np.bool_],
               voxel_size_mm: ArrayLike) -> NDArray[np.float32]:
        """Unwrapped ``phase`` (wrapped, float32) in ``mask``; the input outside."""
        est = laplacian_unwrap(phase, voxel_size_mm, mask, formula="wrapped")
        return np.where(mask, congruent(phase, est), phase)


SpatialUnwrap = BestPath | Laplacian
"""A spatial unwrapping method; ``method`` is its name in records."""


def unwrap_spatial(
    phase: NDArray[np.floating],
    mask: NDArray[np.bool_] | None = None,
    *,
    method: SpatialUnwrap = BestPath(),
    voxel_size_mm: ArrayLike = (1.0, 1.0, 1.0),
) -> NDArray[np.float32]:
    """Exactly 2π-congruent spatial unwrapping of one wrapped 3-D phase image, float32, by
    ``method`` (:class:`BestPath`, default, or :class:`Laplacian`), restricted to ``mask``
    (None: the whole grid). Every connected part of the mask is then shifted by a multiple of
    2π so its median lies in [−π, π). Outside the mask the input phase is returned unchanged.
    """
    p = wrap(phase)
    m = np.ones(p.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    out = method.unwrap(p, m, voxel_size_mm)
    _global_correction(out, m)
    return out


def unwrap_temporal(
    phase: NDArray[np.floating],
    echo_times_s: ArrayLike,
    template_rad_per_s: NDArray[np.floating],
    magnitude: NDArray[np.floating] | None = None,
) -> NDArray[np.float32]:
    """Unwrap each echo of offset-free phase ``[i, j, k, echo]`` in time, 2π-congruently.

    ``template_rad_per_s`` is an unwrapped frequency map ω (the echo-2/echo-1 phase difference
    over ΔTE). Echo by echo in order of TE, the phase gets the multiple of 2π nearest to a
    prediction: ``ω·TE`` for the first echo (offsets removed), the first echo plus
    ``ω·(TE₂ − TE₁)`` for the second, and beyond that a straight line (with intercept, so a
    residual offset does no harm) fitted to the echoes already unwrapped with weights
    ``magnitude²``. Noise in the template is thus never scaled up to the late echoes.
    """
    te = np.asarray(echo_times_s, dtype=np.float64)
    p = np.asarray(phase, dtype=np.float32)
    out = np.empty(p.shape, dtype=np.float32)
    omega = np.asarray(template_rad_per_s, dtype=np.float32)
    t_mid = float(te.mean())
    shape = p.shape[:-1]
    sw, swt, swtt, swy, swty = (np.zeros(shape, dtype=np.float32) for _ in range(5))
    order = np.argsort(te)
    scale = np.float32(1.0)
    if magnitude is not None:
        scale = np.float32(1.0 / max(float(np.max(magnitude)), 1e-30))
    for count, n in enumerate(order):
        t = np.float32(te[n] - t_mid)
        if count == 0:
            pred = omega * np.float32(te[n])
        elif count == 1:
            first = order[0]
            pred = out[..., first] + omega * np.float32(te[n] - te[first])
        else:
            det = sw * swtt - swt * swt
            slope = np.zeros(shape, dtype=np.float32)
            np.divide(sw * swty - swt * swy, det, out=slope, where=det > 0)
            icpt = np.zeros(shape, dtype=np.float32)
            np.divide(swy - slope * swt, sw, out=icpt, where=sw > 0)
            pred = icpt + slope * t
        out[..., n] = congruent(p[..., n], pred)
        if count < len(order) - 1:
            if magnitude is None:
                w = np.ones(shape, dtype=np.float32)
            else:
                w = np.asarray(magnitude[..., n], dtype=np.float32) * scale
                w *= w
            y = out[..., n]
            sw += w
            swy += w * y
            w *= t
            swt += w
            swty += w * y
            w *= t
            swtt += w
    return out
