"""Brain mask from multi-echo GRE magnitude (and, optionally, phase quality).

The steps:

1. Combine the echoes (root sum of squares) and find the signal/noise threshold with Otsu's
   method (Otsu 1979) on the *logarithm* of the magnitude, where noise and tissue are two
   well-separated modes whatever the receive bias.
2. Divide out the receive bias, estimated by normalised convolution (Knutsson & Westin 1993):
   ``B = G_σ * (m·f) / G_σ * f`` over the coarse foreground ``f``. At 7T the bias spans a factor
   of several across the head; after the division tissue sits near 1 everywhere.
3. Threshold the bias-normalised image (and a phase-coherence quality map, if phase is given:
   local coherence of the echo-difference phasor, the idea behind ROMEO's and QSMxT's
   quality-map masks, Dymerska 2021). Voxels darker than tissue may be less coherent: at
   7 T a large vein is dark and its field jumps at its wall (:func:`brain_mask`).
4. Separate the brain from scalp: erode by a few mm, keep the largest component, then grow it
   back by geodesic dilation inside the thresholded mask. Thin cortex next to the mask edge is
   restored exactly, so the superficial cortex is not eroded away.
5. Fill holes in 3-D, treating the faces that the mask crosses (a slab that cuts the brain) as
   closed, so ventricles opening onto a cut face are filled too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from skimage.filters import threshold_otsu

from qsmnode.qsm.util import (
    FftGrid,
    block_mean,
    bounding_box,
    erode_sphere,
    fast_shape,
    sphere_kernel,
    upsample_linear,
)


def otsu_log_threshold(image: NDArray[np.floating]) -> float:
    """Signal/noise threshold: Otsu's method (Otsu 1979) on ``log(image)`` of positive voxels."""
    pos = image[image > 0]
    if pos.size == 0:
        return 0.0
    sample = pos if pos.size <= 2_000_000 else pos[:: pos.size // 2_000_000 + 1]
    return float(np.exp(threshold_otsu(np.log(sample.astype(np.float64)))))


def bias_field(
    image: NDArray[np.floating],
    foreground: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    sigma_mm: float = 20.0,
) -> NDArray[np.float32]:
    """Smooth receive-bias estimate by normalised convolution (Knutsson & Westin 1993).

    ``B = G_σ * (image·fg) / G_σ * fg``: a Gaussian average of the foreground only, so the
    background does not pull the estimate down near the edge of the head.
    """
    sigma = sigma_mm / np.asarray(voxel_size_mm, dtype=np.float64)
    # the bias is smooth: work on a grid decimated by about σ/4 voxels, then interpolate
    factors = tuple(max(1, int(np.floor(s / 4.0))) for s in sigma)
    fg = block_mean(foreground.astype(np.float32), factors)  # type: ignore[arg-type]
    num = block_mean(image.astype(np.float32) * foreground, factors)  # type: ignore[arg-type]
    sig_d = sigma / np.asarray(factors)
    num = ndimage.gaussian_filter(num, sig_d, mode="nearest")
    den = ndimage.gaussian_filter(fg, sig_d, mode="nearest")
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 1e-3)
    return upsample_linear(out, factors, image.shape)  # type: ignore[arg-type]


def phase_coherence(
    phase: NDArray[np.floating],
    magnitude: NDArray[np.floating] | None = None,
    size: int = 3,
) -> NDArray[np.float32]:
    """Local phase coherence in [0, 1] from multi-echo phase ``[i, j, k, echo]``.

    ``|Σ w·exp(i·Δφ)| / Σ w`` over a size³ neighbourhood, with ``Δφ`` the phase of echo 2
    relative to echo 1 (or echo 1 itself with one echo) and ``w`` the magnitude (uniform if
    None), so dark noise voxels next to the brain do not pull its edge down. Smooth field gives
    ≈1, pure noise ≈ size^-1.5.
    """
    if phase.ndim == 4 and phase.shape[-1] >= 2:
        d = (phase[..., 1] - phase[..., 0]).astype(np.float32)
    else:
        d = (phase[..., 0] if phase.ndim == 4 else phase).astype(np.float32)
    if magnitude is None:
        w = np.ones(d.shape, np.float32)
    else:
        w = np.asarray(magnitude[..., 0] if magnitude.ndim == 4 else magnitude, np.float32)
    re = ndimage.uniform_filter(w * np.cos(d), size, mode="nearest")
    im = ndimage.uniform_filter(w * np.sin(d), size, mode="nearest")
    den = ndimage.uniform_filter(w, size, mode="nearest")
    out = np.zeros_like(den)
    np.divide(np.sqrt(re * re + im * im), den, out=out, where=den > 0)
    return out


def _ball_erode(
    mask: NDArray[np.bool_], voxel_size_mm: ArrayLike, radius_mm: float
) -> NDArray[np.bool_]:
    """Erosion by a ball of ``radius_mm`` (FFT convolution; outside the array is background)."""
    vs = np.asarray(voxel_size_mm, float)
    grid = FftGrid(fast_shape(mask.shape, np.ceil(radius_mm / vs).astype(int) + 1))
    kernel = sphere_kernel(grid, vs, radius_mm)
    eroded = erode_sphere(grid, grid.embed(mask, bool).astype(bool), kernel)
    return eroded[: mask.shape[0], : mask.shape[1], : mask.shape[2]]


def _largest_component(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes_open_faces(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """3-D hole filling, plus 2-D filling within every slice along each axis.

    The 2-D pass fills cavities that open onto a face of the volume (a slab cutting through a
    ventricle): in the slices parallel to that face they are enclosed. Background that reaches
    the edge of its slice (air around the head) stays background.
    """
    filled = ndimage.binary_fill_holes(mask)
    for axis in range(3):
        structure = np.zeros((3, 3, 3), dtype=bool)
        plane = [slice(None)] * 3
        plane[axis] = 1  # type: ignore[call-overload]
        structure[tuple(plane)] = ndimage.generate_binary_structure(2, 1)
        pad = [(0, 0)] * 3
        pad[axis] = (1, 1)  # padded planes keep the face slices' interiors off the border
        padded = np.pad(filled, pad, constant_values=False)
        out = ndimage.binary_fill_holes(padded, structure=structure)
        crop = [slice(None)] * 3
        crop[axis] = slice(1, -1)
        filled = out[tuple(crop)]
    return filled | mask


@dataclass(frozen=True)
class MaskParams:
    """How the engine makes its brain mask: :func:`brain_mask`'s settings, and on a whole head
    (:func:`covers_whole_head`) the restriction to a template's brain (:func:`restrict_to_prior`).

    Attributes:
        threshold: fraction of the local tissue level kept (:func:`brain_mask`); default 0.35.
        use_phase: add the phase-coherence criterion (needs two echoes or more); default True.
        coherence_threshold: phase coherence kept; default 0.5 (:func:`brain_mask`).
        dark_coherence_threshold: phase coherence kept where the magnitude is below the
            local tissue level; default 0.3 (:func:`brain_mask`; None: as elsewhere).
        bias_sigma_mm: Gaussian width of the receive-bias estimate (mm); default 20.
        separate_mm: erosion that separates brain from scalp before regrowing (mm); default 3.
        prior: restrict a whole head's mask to the brain prior when one is given; default True.
        prior_min_extent_mm: a whole head spans at least this along every axis (mm); default 130.
        prior_min_volume_ml: and holds at least this volume (mL); default 2200.
        prior_margin_mm: the prior is grown by this before restricting (mm); default 3.
    """

    threshold: float = 0.35
    use_phase: bool = True
    coherence_threshold: float = 0.5
    dark_coherence_threshold: float | None = 0.3
    bias_sigma_mm: float = 20.0
    separate_mm: float = 3.0
    prior: bool = True
    prior_min_extent_mm: float = 130.0
    prior_min_volume_ml: float = 2200.0
    prior_margin_mm: float = 3.0


def brain_mask(
    magnitude: NDArray[np.floating],
    voxel_size_mm: ArrayLike,
    *,
    phase: NDArray[np.floating] | None = None,
    threshold: float = 0.35,
    coherence_threshold: float = 0.5,
    dark_coherence_threshold: float | None = 0.3,
    bias_sigma_mm: float = 20.0,
    separate_mm: float = 3.0,
) -> NDArray[np.bool_]:
    """Brain mask from magnitude ``[i, j, k]`` or ``[i, j, k, echo]`` (bool).

    Args:
        magnitude: magnitude image(s); echoes are combined by root sum of squares.
        voxel_size_mm: voxel edge lengths.
        phase: optional wrapped phase ``[i, j, k, echo]``; adds a phase-coherence criterion
            that drops noise voxels with high magnitude (ghosts, flow artefacts).
        threshold: keep voxels above this fraction of the local (bias-field) tissue level.
        coherence_threshold: minimum local phase coherence (see :func:`phase_coherence`);
            default 0.5. Pure noise gives 0.2 (0.7 % of noise voxels above 0.5).
        dark_coherence_threshold: the minimum where the voxel is darker than the local
            tissue level (bias-normalised magnitude below 1); default 0.3 (17 % of noise
            voxels above it); None: ``coherence_threshold`` everywhere. A large vein at 7 T
            is dark (short T2*), and its field jumps by about 0.2 ppm at its wall: 2 rad of
            the echo-2 minus echo-1 phase 5 ms apart, so the coherence across the wall is
            0.3-0.5. With 0.5 everywhere, 5 % of the 1 mm qsm-forward heads' sinus (where it
            meets the brain's surface) left the mask, χ 0 there: a fifth of their squared χ
            error. 0.3 everywhere also let in bright extracerebral CSF against bone, whose
            field jumps too, and lost the anatomy phantom's deep-M1 change (RESULTS.md).
        bias_sigma_mm: Gaussian width of the bias-field estimate.
        separate_mm: erosion radius used only to cut scalp/brain bridges; the edge is
            restored afterwards (geodesic dilation), so the mask is not eroded.
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4:
        img = np.sqrt(np.einsum("...e,...e->...", mag, mag, dtype=np.float32))
    else:
        img = mag
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    coarse = img > otsu_log_threshold(img)
    coarse = ndimage.binary_opening(coarse, iterations=1)
    if not coarse.any():
        return coarse
    bias = bias_field(img, coarse, vs, bias_sigma_mm)
    norm = np.zeros_like(img)
    np.divide(img, bias, out=norm, where=bias > 0)
    candidate = norm > threshold
    candidate &= img > 0.5 * otsu_log_threshold(img)
    if phase is not None:
        coherence = phase_coherence(np.asarray(phase), mag)
        coherent = coherence > coherence_threshold
        if dark_coherence_threshold is not None:
            coherent |= (coherence > dark_coherence_threshold) & (norm < 1.0)
        candidate &= coherent
    out = np.zeros(candidate.shape, dtype=bool)
    if not candidate.any():
        return out
    box = bounding_box(candidate, margin=1)
    out[box] = _separate_and_fill(np.ascontiguousarray(candidate[box]), vs, separate_mm)
    return out


def _separate_and_fill(
    candidate: NDArray[np.bool_], vs: NDArray[np.float64], separate_mm: float
) -> NDArray[np.bool_]:
    """Cut scalp bridges (erode, largest component, geodesic dilation), then fill holes."""
    core = _ball_erode(candidate, vs, separate_mm) if separate_mm > 0 else candidate
    if not core.any():
        core = candidate
    core = _largest_component(core)
    if separate_mm > 0:
        steps = int(np.ceil(separate_mm / vs.min())) + 1  # chessboard steps ≥ Euclidean radius
        full = np.ones((3, 3, 3), dtype=bool)
        core = ndimage.binary_dilation(core, structure=full, iterations=steps, mask=candidate)
    core = _largest_component(core)
    return fill_holes_open_faces(core)


def head_extent_mm(mask: NDArray[np.bool_], voxel_size_mm: ArrayLike) -> NDArray[np.float64]:
    """Extent (mm) of ``mask`` along each voxel axis: its bounding box times the voxel size."""
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    if not mask.any():
        return np.zeros(3)
    box = bounding_box(mask)
    return np.array([(s.stop - s.start) for s in box], dtype=np.float64) * vs


def covers_whole_head(
    mask: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    min_extent_mm: float = 130.0,
    min_volume_ml: float = 2200.0,
) -> bool:
    """Whether a signal mask is a whole head, scalp and skull included: at least
    ``min_extent_mm`` (default 130 mm) along every voxel axis, and more than ``min_volume_ml``
    (default 2200 mL).

    An adult brain is about 140 × 170 × 120 mm (left–right, front–back, top–bottom) and the
    head with scalp 20–30 mm more; a slab over M1 (the node's usual 7T acquisition, 40–80 mm
    thick) or a partial field of view does not reach it, and keeps the magnitude-only mask.
    The intracranial volume of adults is 1.2–1.8 L (about 1.5 ± 0.15 L); a mask above 2.2 L
    holds what is not brain, one below it (the brain alone, e.g. the simulator's heads) needs
    no prior. The MNI152 brain of the qsm-forward head, a large brain, gives a signal mask of
    1964 mL at 1 mm (1926 at 2 mm): 2.2 L keeps a margin above it.
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    volume_ml = float(mask.sum()) * float(np.prod(vs)) / 1000.0
    return bool(np.all(head_extent_mm(mask, vs) >= min_extent_mm)
                and volume_ml > min_volume_ml)


def restrict_to_prior(
    mask: NDArray[np.bool_],
    prior: NDArray[np.bool_],
    voxel_size_mm: ArrayLike,
    margin_mm: float = 3.0,
) -> NDArray[np.bool_]:
    """The part of a signal mask inside a brain prior grown by ``margin_mm``.

    Used on whole-head images, where scalp, skull marrow, orbits and sinus walls are bright
    and touch the brain through partial-volume skull, so no threshold or morphological cut
    separates them (3 mm Philips 3T: 3.5 L of "brain"). ``prior`` is a template's brain
    mask carried onto the subject by registration (atlas-based brain extraction, as in
    ANTs' ``antsBrainExtraction`` and ROBEX: Iglesias 2011, IEEE TMI 30:1617; here affine
    only, so the margin takes up the remaining misfit). Inside the grown prior the signal
    mask keeps the edge (dark CSF, skull and air stay out); the result is its largest
    component with holes filled (:func:`fill_holes_open_faces`).

    Args:
        mask: the signal mask (:func:`brain_mask`), bool ``[i, j, k]``.
        prior: the brain prior on the same grid, bool.
        voxel_size_mm: voxel edge lengths.
        margin_mm: growth of the prior (default 3 mm: about the registration's residual
            misfit at the brain's surface on the Philips 3 mm brain).

    Returns:
        The restricted mask (bool); empty when the two do not overlap.
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    grown = np.asarray(prior, dtype=bool)
    if margin_mm > 0:
        outside = ~grown
        # distance from the prior, in mm, on the anisotropic grid
        grown = ndimage.distance_transform_edt(outside, sampling=vs) <= margin_mm
    out = mask & grown
    if not out.any():
        return out
    return fill_holes_open_faces(_largest_component(out))
