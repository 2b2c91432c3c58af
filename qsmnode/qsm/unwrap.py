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
from qsmnode.qsm.util import bounding_box, cg, plane_blocks

TWO_PI = np.float32(2.0 * np.pi)


_PI = np.float32(np.pi)


def wrap(phase: NDArray[np.floating], *, out: NDArray[np.float32] | None = None
         ) -> NDArray[np.float32]:
    """Phase wrapped to [−π, π), float32: ``(phase + π) mod 2π − π``, into ``out`` when given
    (float32, of the phase's shape; it may be ``phase`` itself).

    Bit for bit the float32 ``np.remainder`` form, in two or three passes instead of a slow
    ``remainder``: after adding π, values already in [0, 2π) keep theirs, and values in
    [−2π, 0) or [2π, 4π) get ± 2π, which is exact there (Sterbenz), as the remainder's own
    correction step is; wider ranges take ``np.remainder``.
    """
    t = np.add(np.asarray(phase, dtype=np.float32), _PI, out=out, dtype=np.float32)
    lo, hi = float(t.min(initial=0.0)), float(t.max(initial=0.0))
    if not lo >= 0.0 or not hi < TWO_PI:  # also NaN
        if lo >= -TWO_PI and hi < 2 * TWO_PI:
            np.add(t, TWO_PI, out=t, where=t < 0)
            np.subtract(t, TWO_PI, out=t, where=t >= TWO_PI)
        else:
            np.remainder(t, TWO_PI, out=t)
    t -= _PI
    return t


def congruent(wrapped: NDArray[np.floating], estimate: NDArray[np.floating]) -> NDArray[np.float32]:
    """The value 2π-congruent to ``wrapped`` that is nearest to ``estimate``, float32."""
    w = np.asarray(wrapped, dtype=np.float32)
    k = np.subtract(np.asarray(estimate, dtype=np.float32), w, dtype=np.float32)
    return _congruent_into(w, k, k, subtracted=True)


def _congruent_into(wrapped: NDArray[np.float32], estimate: NDArray[np.float32],
                    out: NDArray[np.float32], *, subtracted: bool = False
                    ) -> NDArray[np.float32]:
    """:func:`congruent` into ``out``, with ``estimate`` as scratch (overwritten; it may be
    ``out``, ``wrapped`` may not). ``subtracted``: ``estimate`` already holds
    ``estimate − wrapped``."""
    k = estimate if subtracted else np.subtract(estimate, wrapped, out=estimate)
    k /= TWO_PI
    np.rint(k, out=k)
    k *= TWO_PI
    return np.add(wrapped, k, out=out)


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
        d = np.sin(d, out=d) if formula == "sincos" else wrap(d, out=d)
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

        # on the mask's box, one voxel wider (the same result: voxels outside the mask take
        # no part), and without length-1 axes, which skimage prefers
        box = bounding_box(mask, margin=1) if phase.ndim == 3 else (slice(None),) * phase.ndim
        pb, mb = phase[box], mask[box]
        flat = tuple(n for n in pb.shape if n > 1)
        ps, ms = np.ascontiguousarray(pb).reshape(flat), mb.reshape(flat)
        if ms.all():
            res = unwrap_phase(ps)
        else:
            res = np.ma.getdata(unwrap_phase(np.ma.array(ps, mask=~ms)))
        out = np.array(phase, dtype=np.float32)
        out[box] = np.where(mb, np.asarray(res).reshape(pb.shape), pb)
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
    scale = np.float32(1.0)
    mag = None
    if magnitude is not None:
        scale = np.float32(1.0 / max(float(np.max(magnitude)), 1e-30))
        mag = np.asarray(magnitude, dtype=np.float32)
    for b in plane_blocks(p.shape[0], p[0].nbytes):
        _temporal_block(p[b], te, omega[b], None if mag is None else mag[b], scale, out[b])
    return out


def _temporal_block(p: NDArray[np.float32], te: NDArray[np.float64],
                    omega: NDArray[np.float32], magnitude: NDArray[np.float32] | None,
                    scale: np.float32, out: NDArray[np.float32]) -> None:
    """:func:`unwrap_temporal` on one block of planes, into ``out`` (a view of the output)."""
    t_mid = float(te.mean())
    shape = p.shape[:-1]
    sw, swt, swtt, swy, swty = (np.zeros(shape, dtype=np.float32) for _ in range(5))
    # scratch, reused echo after echo (the sums are updated in place)
    pred, y, tmp, tmp2, w = (np.empty(shape, dtype=np.float32) for _ in range(5))
    order = np.argsort(te)
    for count, n in enumerate(order):
        t = np.float32(te[n] - t_mid)
        if count == 0:
            np.multiply(omega, np.float32(te[n]), out=pred)
        elif count == 1:
            np.multiply(omega, np.float32(te[n] - te[order[0]]), out=pred)
            pred += y  # y: the first echo, unwrapped
        else:
            det = np.multiply(sw, swtt, out=tmp)
            det -= np.multiply(swt, swt, out=pred)
            num = np.multiply(sw, swty, out=tmp2)
            num -= np.multiply(swt, swy, out=pred)
            slope = y  # the previous echo, already in out
            slope.fill(0.0)
            np.divide(num, det, out=slope, where=det > 0)
            np.subtract(swy, np.multiply(slope, swt, out=tmp2), out=tmp2)
            pred.fill(0.0)
            np.divide(tmp2, sw, out=pred, where=sw > 0)  # the intercept
            slope *= t
            pred += slope
        _congruent_into(p[..., n], pred, y)
        out[..., n] = y
        if count < len(order) - 1:
            if magnitude is None:
                w.fill(1.0)
            else:
                np.multiply(magnitude[..., n], scale, out=w)
                w *= w
            sw += w
            swy += np.multiply(w, y, out=tmp)
            w *= t
            swt += w
            swty += np.multiply(w, y, out=tmp)
            w *= t
            swtt += w
