"""The QSM engine: multi-echo magnitude and wrapped phase in, χ, R2* and QC out.

Steps (each a module of this package; methods cited there):

1. ``relaxometry``: R2*/T2* (ARLO, Pei 2015) and the combined magnitude (root sum of squares).
2. ``mask``: brain mask robust to 7T receive bias, without eroding the cortex; on a whole
   head, restricted to a template's brain registered to the first echo (``brain_prior``).
3. ``offsets``: MCPC-3D-S phase offset removal (Eckstein 2018), with the echo-2/echo-1 phase
   difference unwrapped once by ``unwrap.unwrap_spatial`` (best-path, Herráez 2002).
4. ``unwrap.unwrap_temporal``: exact, 2π-congruent unwrapping of every echo against it.
5. ``fieldfit``: magnitude²-weighted least-squares field through the origin (ppm), then
   ``quality``: voxels with π-jumps in the unwrapped template or a large fit residual are
   dropped (edge islands) or filled from their neighbours (enclosed holes), and outer mask
   layers holding strong sources (bone/air partial volume, seen as a high ``|∇²f|``) are
   peeled (``peel_sources``).
6. ``inversion.single_step_tv`` (default): TV-regularised inversion of the total field through
   its Laplacian (Chatnuntawech 2017, Langkammer 2015), so no separate background removal
   erodes the cortex. Alternatives: ``background`` (RESHARP+LBV, RESHARP, LBV, iSMV, V-SHARP,
   PDF; Liu 2011) followed by ``inversion.tv_admm`` (Bilgic 2014) or ``inversion.tkd``
   (Wharton 2010); PDF and TV-ADMM take the combined magnitude as inverse-noise weights.
7. ``reference``: χ relative to the mean over the QSM mask (or CSF).

:data:`METHODS` names the two measured pipelines (``qsmnode qsm --method``):
``single-step-tv`` (the default) and ``pdf-tv-admm``. Measured (issue 11, numbers in
``benchmarks/RESULTS.md``) on an independent forward model (``qsmnode.sim.forward_head``: MNI152
head, qsm-forward's field, shim, offsets and noise; qsm-ci scores, dropped voxels as 0):

==========================================  =======================  ======================
                                            single-step-tv           pdf-tv-admm
==========================================  =======================  ======================
7T head 1 mm: NRMSE, XSIM, deep-M1 error    90.3 %, 0.19, +0.039     45.3 %, 0.58, −0.002
7T 60 mm slab over M1: NRMSE, XSIM, M1 err  99.6 %, 0.17, −0.004     50.5 %, 0.48, −0.006
3T SNR 30: NRMSE, XSIM                      95.8 %, 0.15             45.6 %, 0.48
anatomy phantom small-slab: deep-M1 found   0.0265 of 0.030 ppm      0.0164 of 0.030 ppm
same: seconds on 2 busy cores               5                        30
==========================================  =======================  ======================

PDF + TV-ADMM restores the grey/white and deep-grey contrast the single-step TV loses, but on
the slabs the node is for it finds less of the deep-layer M1 change (the clinical measure) and
is six times slower, so it is not the default yet: no pipeline wins in every condition.
Single-step TV: λ = 1e-4, ρ_data = 0.01, 30 iterations; PDF: tolerance 3e-3, at most 200
iterations, 20 mm padding; TV-ADMM: λ = 1e-4, 50 iterations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from qsmnode.qsm import background as bg
from qsmnode.qsm import inversion as inv
from qsmnode.qsm.fieldfit import fit_field
from qsmnode.qsm.mask import brain_mask, covers_whole_head, restrict_to_prior
from qsmnode.qsm.offsets import echo_difference, mcpc3ds_offset, remove_offset
from qsmnode.qsm.quality import (
    peel_source_layers,
    phase_jumps,
    repair_field,
    residual_outliers,
)
from qsmnode.qsm.reference import reference_chi
from qsmnode.qsm.relaxometry import R2STAR_MAX_PER_S, combine_magnitude, r2star_map
from qsmnode.qsm.unwrap import unwrap_spatial, unwrap_temporal, wrap


@dataclass(frozen=True)
class QSMParams:
    """Every choice the QSM engine makes (see the module docstring for the defaults)."""

    # mask (mask.brain_mask)
    mask_threshold: float = 0.35
    mask_use_phase: bool = True
    mask_coherence_threshold: float = 0.5
    mask_bias_sigma_mm: float = 20.0
    mask_separate_mm: float = 3.0
    # whole head: restrict to a template's brain (mask.covers_whole_head, restrict_to_prior;
    # only with run_qsm's brain_prior)
    mask_prior: bool = True
    mask_prior_min_extent_mm: float = 130.0
    mask_prior_min_volume_ml: float = 2200.0
    mask_prior_margin_mm: float = 3.0
    # phase offsets (offsets.mcpc3ds_offset)
    remove_offsets: bool = True
    offset_sigma_mm: float = 4.0
    # unwrapping of the echo-difference template (unwrap.unwrap_spatial)
    unwrap_method: Literal["bestpath", "laplacian"] = "bestpath"
    # unreliable phase (quality.*)
    repair_unreliable: bool = True
    jump_limit_rad: float = float(np.pi)
    residual_floor_rad: float = 1.0
    residual_factor: float = 10.0
    # background removal (background.*)
    background_method: bg.Method = "resharp_lbv"
    background_peel_voxels: int = 0
    peel_sources: bool = True
    peel_factor: float = 1.0
    peel_max_mm: float = 4.0
    background_radius_mm: float = 10.0
    background_tikhonov: float = 1e-3
    vsharp_radii_mm: tuple[float, ...] | None = None
    pdf_tol: float = 3e-3
    pdf_max_iter: int = 200
    pdf_pad_mm: float = 20.0
    noise_weighting: bool = True
    # dipole inversion (inversion.*)
    inversion_method: Literal["single_step_tv", "tv_admm", "tkd"] = "single_step_tv"
    tkd_threshold: float = 0.15
    tv_lambda: float = 1e-4
    tv_rho: float | None = None
    tv_rho_data: float = 0.1
    tv_data_term: Literal["masked", "unmasked"] = "masked"
    tv_max_iter: int = 50
    tv_tol: float = 3e-3
    inversion_pad_mm: float = 24.0
    sstv_lambda: float = 1e-4
    sstv_rho_data: float = 0.01
    sstv_max_iter: int = 30
    sstv_relax: float = 1.0
    sstv_tol: float = 1e-2
    sstv_pad_mm: float = 4.0
    sstv_edge_voxels: int = 1
    # referencing (reference.reference_chi)
    reference: Literal["mask", "csf"] = "mask"
    # relaxometry (relaxometry.*)
    r2star_method: Literal["auto", "arlo", "loglinear"] = "auto"
    r2star_max_per_s: float = R2STAR_MAX_PER_S
    combine_method: Literal["rss", "te_weighted"] = "rss"


@dataclass(frozen=True)
class QSMResult:
    """Outputs of :func:`run_qsm`, all on the input grid.

    Attributes:
        chi_ppm: susceptibility (ppm), referenced, 0 outside ``qsm_mask``; float32.
        r2star_per_s: R2* (1/s), clipped, 0 outside ``mask``; float32.
        t2star_s: T2* (s), 0 where R2* is 0; float32.
        magnitude: combined (T2*-weighted) magnitude, float32.
        mask: brain mask (bool).
        qsm_mask: where χ and the local field are defined: the mask less unreliable edge
            islands, peeled source layers and what the inversion gives up (two voxel layers
            for single-step TV; the SMV erosion for two-step methods).
        total_field_ppm: fitted total field (ppm), 0 outside ``mask``; float32.
        local_field_ppm: field after background removal (ppm); for single-step TV, the
            model field ``Dχ``; float32.
        fit_residual_rad: weighted RMS phase residual of the field fit (rad); float32.
        quality: scalars for QC and logs: fractions, residual statistics, iterations, FFT
            counts and timings per step (s).
    """

    chi_ppm: NDArray[np.float32]
    r2star_per_s: NDArray[np.float32]
    t2star_s: NDArray[np.float32]
    magnitude: NDArray[np.float32]
    mask: NDArray[np.bool_]
    qsm_mask: NDArray[np.bool_]
    total_field_ppm: NDArray[np.float32]
    local_field_ppm: NDArray[np.float32]
    fit_residual_rad: NDArray[np.float32]
    quality: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, QSMParams] = {
    "single-step-tv": QSMParams(),
    "pdf-tv-admm": QSMParams(background_method="pdf", peel_sources=False,
                             inversion_method="tv_admm"),
}
"""The pipelines measured against the independent forward model, by name (module docstring)."""


def _background(
    total: NDArray[np.float32],
    mask: NDArray[np.bool_],
    vs: NDArray[np.float64],
    b0: NDArray[np.float64],
    p: QSMParams,
    weight: NDArray[np.float32] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.bool_], dict[str, Any]]:
    method = p.background_method
    options: dict[str, Any] = {}
    if method in ("resharp", "resharp_lbv"):
        options = {"radius_mm": p.background_radius_mm, "tikhonov": p.background_tikhonov}
    elif method == "ismv":
        options = {"radius_mm": p.background_radius_mm}
    elif method == "vsharp":
        options = {"radii_mm": p.vsharp_radii_mm}
    elif method == "pdf":
        options = {"tol": p.pdf_tol, "max_iter": p.pdf_max_iter, "pad_mm": p.pdf_pad_mm,
                   "weight": weight}
    return bg.remove_background(total, mask, vs, b0, method, **options)


def _noise_weight(combined: NDArray[np.float32], mask: NDArray[np.bool_]) -> NDArray[np.float32]:
    """Inverse-noise weight of the fitted field: its noise SD is ∝ 1 / (magnitude · TE), so the
    weight is the combined magnitude, capped at its 99th percentile in the mask (vessels and
    bright fat must not dominate), scaled to mean 1 in the mask, 0 outside."""
    inside = combined[mask]
    if not inside.size:
        return np.zeros(combined.shape, np.float32)
    cap = float(np.percentile(inside, 99))
    w = np.clip(combined, 0, cap if cap > 0 else None) * mask
    mean = float(w[mask].mean())
    return (w / mean if mean > 0 else mask.astype(np.float32)).astype(np.float32)


BrainPrior = Callable[[NDArray[np.float32], NDArray[np.bool_]], NDArray[np.bool_]]
"""``f(first-echo magnitude, signal mask) -> brain prior`` on the same grid (bool); raises
``ValueError`` or ``RuntimeError`` when it cannot give one. Made at the edge, where the affine
and a template are (:func:`qsmnode.m1.register.brain_prior_function`)."""


def _apply_prior(m: NDArray[np.bool_], first_echo: NDArray[np.float32], vs: NDArray[np.float64],
                 prior: BrainPrior | None, p: QSMParams, quality: dict) -> NDArray[np.bool_]:
    """``m`` restricted to the brain prior (:func:`restrict_to_prior`) when there is one, it is
    enabled and the signal mask spans a whole head (:func:`covers_whole_head`; slabs keep the
    signal mask); ``quality["mask_prior"]`` says what was done and why."""
    record: dict[str, Any] = {"signal_mask_voxels": int(m.sum())}
    quality["mask_prior"] = record
    if not p.mask_prior or prior is None:
        record["applied"] = False
        record["why_not"] = "disabled" if not p.mask_prior else "no template given"
        return m
    if not covers_whole_head(m, vs, p.mask_prior_min_extent_mm, p.mask_prior_min_volume_ml):
        record["applied"] = False
        record["why_not"] = (f"not a whole head (the signal mask is under "
                             f"{p.mask_prior_min_extent_mm:g} mm along an axis or "
                             f"{p.mask_prior_min_volume_ml:g} mL)")
        return m
    t0 = time.perf_counter()
    try:
        brain = np.asarray(prior(first_echo, m), dtype=bool)
    except (ValueError, RuntimeError) as exc:
        record.update(applied=False, why_not=str(exc))
        return m
    restricted = restrict_to_prior(m, brain, vs, p.mask_prior_margin_mm)
    record.update(seconds=round(time.perf_counter() - t0, 2), prior_voxels=int(brain.sum()))
    if not restricted.any():
        record.update(applied=False, why_not="the prior does not overlap the signal mask")
        return m
    record["applied"] = True
    return restricted


def _masked(mag: np.ndarray, vs: np.ndarray, phase: np.ndarray | None,
            mask: np.ndarray | None, finite: np.ndarray, maps: tuple[np.ndarray, ...],
            p: QSMParams, quality: dict, prior: BrainPrior | None = None) -> np.ndarray:
    """The brain mask (``mask`` when given, else :func:`brain_mask` of the magnitude, with the
    phase's coherence when ``phase`` is given, restricted to ``prior`` on a whole head:
    :func:`_apply_prior`), restricted to finite voxels; ``maps`` are set to 0 outside it and
    ``quality`` records its size."""
    if mask is None:
        m = brain_mask(mag, vs, phase=phase, threshold=p.mask_threshold,
                       coherence_threshold=p.mask_coherence_threshold,
                       bias_sigma_mm=p.mask_bias_sigma_mm, separate_mm=p.mask_separate_mm)
        m = _apply_prior(m, mag[..., 0], vs, prior, p, quality)
    else:
        m = np.asarray(mask, dtype=bool).copy()
    m &= finite
    for values in maps:
        values[~m] = 0.0
    quality["mask_fraction"] = float(m.mean())
    quality["mask_voxels"] = int(m.sum())
    return m


def run_qsm(
    magnitude: NDArray[np.floating],
    phase: NDArray[np.floating],
    echo_times_s: ArrayLike,
    voxel_size_mm: ArrayLike,
    b0_direction: ArrayLike,
    field_strength_t: float,
    params: QSMParams = QSMParams(),
    *,
    mask: NDArray[np.bool_] | None = None,
    csf_mask: NDArray[np.bool_] | None = None,
    brain_prior: BrainPrior | None = None,
) -> QSMResult:
    """Run the QSM engine on one multi-echo GRE acquisition.

    Args:
        magnitude: ``[i, j, k, echo]`` magnitude, any scale.
        phase: ``[i, j, k, echo]`` phase in radians (any 2π range; NaNs are treated as
            missing voxels); positive field gives positive phase evolution.
        echo_times_s: echo times (s), one per echo.
        voxel_size_mm: voxel edge lengths along i, j, k.
        b0_direction: unit vector of B0 in voxel-index space.
        field_strength_t: B0 (T).
        params: every method choice and setting.
        mask: brain mask to use instead of computing one.
        csf_mask: CSF mask for ``params.reference == "csf"``.
        brain_prior: a template's brain on this grid (:data:`BrainPrior`; None: none). On a
            whole head the signal mask is restricted to it (``params.mask_prior*``), so
            scalp, skull, orbits and sinuses leave the mask; a slab keeps the signal mask.
    """
    p = params
    te = np.asarray(echo_times_s, dtype=np.float64)
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    b0 = np.asarray(b0_direction, dtype=np.float64)
    mag = np.asarray(magnitude, dtype=np.float32)
    ph = np.asarray(phase, dtype=np.float32)
    if mag.ndim == 3:
        mag, ph = mag[..., None], ph[..., None]
    if mag.shape != ph.shape or mag.shape[-1] != te.size:
        raise ValueError(
            f"magnitude {mag.shape}, phase {ph.shape} and {te.size} echo times disagree"
        )
    order = np.argsort(te)
    if np.any(order != np.arange(te.size)):
        mag, ph, te = mag[..., order], ph[..., order], te[order]
    timings: dict[str, float] = {}
    quality: dict[str, Any] = {"params": asdict(p), "shape": tuple(mag.shape)}

    def tick(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        return now

    t0 = t_start = time.perf_counter()
    finite = np.isfinite(ph).all(axis=-1) & np.isfinite(mag).all(axis=-1)
    if not finite.all():
        ph = np.where(finite[..., None], ph, 0.0).astype(np.float32)
        mag = np.where(finite[..., None], mag, 0.0).astype(np.float32)
    ph = wrap(ph)

    # 1. relaxometry and combined magnitude
    combined = combine_magnitude(mag, te, method=p.combine_method)
    if te.size >= 2:
        r2s, t2s = r2star_map(mag, te, method=p.r2star_method, r2star_max_per_s=p.r2star_max_per_s)
    else:
        r2s = np.zeros(mag.shape[:-1], np.float32)
        t2s = np.zeros_like(r2s)
    t0 = tick("relaxometry", t0)

    # 2. mask
    m = _masked(mag, vs, ph if (p.mask_use_phase and te.size >= 2) else None, mask, finite,
                (r2s, t2s), p, quality, brain_prior)
    t0 = tick("mask", t0)

    # 3-4. offsets and unwrapping
    if te.size >= 2:
        diff = unwrap_spatial(echo_difference(ph), m, method=p.unwrap_method, voxel_size_mm=vs)
        t0 = tick("unwrap_template", t0)
        if p.remove_offsets:
            phi0 = mcpc3ds_offset(
                ph[..., 0],
                diff,
                te[0],
                te[1],
                vs,
                magnitude=mag[..., 0],
                mask=m,
                sigma_mm=p.offset_sigma_mm,
            )
            ph = remove_offset(ph, phi0)
        t0 = tick("offsets", t0)
        unwrapped = unwrap_temporal(ph, te, diff / np.float32(te[1] - te[0]), mag)
        template = diff
    else:
        template = unwrap_spatial(ph[..., 0], m, method=p.unwrap_method, voxel_size_mm=vs)
        unwrapped = template[..., None]
    t0 = tick("unwrap_temporal", t0)

    # 5. field fit
    fit = fit_field(unwrapped, mag, te, field_strength_t, mask=m)
    del unwrapped
    res_in = fit.residual_rad[m]
    quality["fit_residual_rad_median"] = float(np.median(res_in)) if res_in.size else 0.0
    quality["fit_residual_rad_p95"] = float(np.percentile(res_in, 95)) if res_in.size else 0.0
    field_ppm, field_mask = fit.field_ppm, m
    if p.repair_unreliable:
        bad = phase_jumps(template, m, p.jump_limit_rad)
        bad |= residual_outliers(fit.residual_rad, m, p.residual_floor_rad, p.residual_factor)
        field_ppm, field_mask, n_filled = repair_field(fit.field_ppm, m, bad, vs)
        quality["unreliable_voxels"] = int(bad.sum())
        quality["filled_voxels"] = n_filled
        quality["dropped_voxels"] = int(m.sum() - field_mask.sum())
    del template
    t0 = tick("field_fit", t0)

    # 6-7. background removal and inversion (the outermost voxel layers of a magnitude mask
    # can hold partial-volume bone/air sources: peel them first)
    if p.peel_sources:
        field_mask, n_peeled = peel_source_layers(
            field_ppm, field_mask, vs, max_mm=p.peel_max_mm, factor=p.peel_factor
        )
        quality["peeled_voxels"] = n_peeled
        t0 = tick("peel", t0)
    if p.background_peel_voxels > 0:
        field_mask = ndimage.binary_erosion(field_mask, iterations=p.background_peel_voxels)
    if p.inversion_method == "single_step_tv":
        chi, qsm_mask, local, info_inv = inv.single_step_tv(
            field_ppm,
            field_mask,
            vs,
            b0,
            lam=p.sstv_lambda,
            rho_data=p.sstv_rho_data,
            max_iter=p.sstv_max_iter,
            tol=p.sstv_tol,
            pad_mm=p.sstv_pad_mm,
            edge_voxels=p.sstv_edge_voxels,
            relax=p.sstv_relax,
        )
        quality["background"] = {"method": "none (single-step inversion of the total field)"}
    else:
        weight = _noise_weight(combined, field_mask) if p.noise_weighting else None
        local, qsm_mask, info_bg = _background(field_ppm, field_mask, vs, b0, p, weight)
        quality["background"] = info_bg
        t0 = tick("background", t0)
        if p.inversion_method == "tkd":
            chi, info_inv = inv.tkd(
                local, qsm_mask, vs, b0, threshold=p.tkd_threshold, pad_mm=p.inversion_pad_mm
            )
        elif p.inversion_method == "tv_admm":
            chi, info_inv = inv.tv_admm(
                local,
                qsm_mask,
                vs,
                b0,
                lam=p.tv_lambda,
                rho=p.tv_rho,
                rho_data=p.tv_rho_data,
                data_term=p.tv_data_term,
                max_iter=p.tv_max_iter,
                tol=p.tv_tol,
                pad_mm=p.inversion_pad_mm,
                weight=weight,
            )
        else:
            raise ValueError(f"unknown inversion method {p.inversion_method!r}")
    quality["qsm_mask_fraction_of_mask"] = float(qsm_mask.sum() / max(int(m.sum()), 1))
    quality["inversion"] = info_inv
    t0 = tick("inversion", t0)

    # 8. reference
    chi, offset = reference_chi(chi, qsm_mask, csf_mask=csf_mask if p.reference == "csf" else None)
    quality["reference_offset_ppm"] = offset
    tick("reference", t0)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    quality["timings_s"] = timings
    return QSMResult(
        chi_ppm=chi,
        r2star_per_s=r2s,
        t2star_s=t2s,
        magnitude=combined,
        mask=m,
        qsm_mask=qsm_mask,
        total_field_ppm=fit.field_ppm,
        local_field_ppm=local,
        fit_residual_rad=fit.residual_rad,
        quality=quality,
    )


def run_relaxometry(
    magnitude: NDArray[np.floating],
    echo_times_s: ArrayLike,
    voxel_size_mm: ArrayLike,
    params: QSMParams = QSMParams(),
    *,
    mask: NDArray[np.bool_] | None = None,
) -> QSMResult:
    """Steps 1 and 2 of the engine alone (R2*, the combined T2*-weighted magnitude and the
    brain mask), for an acquisition QSM cannot be computed on (e.g. a 2-D protocol whose
    slices have gaps: the dipole model needs contiguous voxels).

    The result is a :class:`QSMResult` without susceptibility: ``chi_ppm``, the fields and the
    fit residual are NaN everywhere and ``qsm_mask`` is empty; ``quality["qsm_computed"]`` is
    False. The mask uses the magnitude only (no phase coherence: on slices with gaps the
    through-plane neighbours of the coherence measure are not neighbours)."""
    p = params
    te = np.asarray(echo_times_s, dtype=np.float64)
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 3:
        mag = mag[..., None]
    if mag.shape[-1] != te.size:
        raise ValueError(f"magnitude {mag.shape} and {te.size} echo times disagree")
    order = np.argsort(te)
    if np.any(order != np.arange(te.size)):
        mag, te = mag[..., order], te[order]
    finite = np.isfinite(mag).all(axis=-1)
    if not finite.all():
        mag = np.where(finite[..., None], mag, 0.0).astype(np.float32)
    timings: dict[str, float] = {}
    quality: dict[str, Any] = {"params": asdict(p), "shape": tuple(mag.shape),
                               "qsm_computed": False}
    t0 = t_start = time.perf_counter()
    combined = combine_magnitude(mag, te, method=p.combine_method)
    if te.size >= 2:
        r2s, t2s = r2star_map(mag, te, method=p.r2star_method, r2star_max_per_s=p.r2star_max_per_s)
    else:
        r2s = np.zeros(mag.shape[:-1], np.float32)
        t2s = np.zeros_like(r2s)
    timings["relaxometry"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    m = _masked(mag, vs, None, mask, finite, (r2s, t2s), p, quality)
    timings["mask"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    quality["timings_s"] = timings
    nan = np.full(m.shape, np.nan, dtype=np.float32)
    return QSMResult(
        chi_ppm=nan,
        r2star_per_s=r2s,
        t2star_s=t2s,
        magnitude=combined,
        mask=m,
        qsm_mask=np.zeros(m.shape, dtype=bool),
        total_field_ppm=nan.copy(),
        local_field_ppm=nan.copy(),
        fit_residual_rad=nan.copy(),
        quality=quality,
    )
