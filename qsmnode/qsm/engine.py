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
6. ``tfi`` (default): preconditioned total field inversion (Liu 2017): the brain's and the
   background's χ fitted together to the total field, so no separate background removal;
   the brain's χ then from ``inversion.tv_admm`` of the local field it leaves, with MEDI's
   magnitude-edge weights on the TV (Liu T 2012). Alternatives: ``inversion.single_step_tv``
   (Laplacian single-step TV, Chatnuntawech 2017, Langkammer 2015) with source-layer peeling;
   ``background`` (RESHARP+LBV, RESHARP, LBV, iSMV, V-SHARP, PDF; Liu 2011) followed by
   ``inversion.tv_admm`` (Bilgic 2014) or ``inversion.tkd`` (Wharton 2010). PDF and TV-ADMM
   (``pdf-tv-admm``) take the combined magnitude as inverse-noise weights; the default TFI does
   not (``noise_weighting``).
7. ``reference``: χ relative to the mean over the QSM mask (or CSF).

:data:`METHODS` names the measured pipelines (``qsmnode qsm --method``): ``tfi`` (the
default, ``QSMParams()``), ``single-step-tv`` and ``pdf-tv-admm``. Measured (issue 11,
numbers in ``benchmarks/RESULTS.md``) on an independent forward model
(``qsmnode.sim.forward_head``: MNI152 head, qsm-forward's field, shim, offsets and noise;
qsm-ci scores, dropped voxels as 0; M1: error of the deep-layer left−right change, truth
+0.02 ppm), and on the project's anatomy phantom (field by a box-voxel kernel the
reconstruction does not use; deep-layer left-hand change of a true +0.030 ppm):

- 7T head, 1 mm, seeds 0 / 1 / 2, NRMSE % and XSIM: tfi 36.2 / 36.9 / 39.6 and 0.69 / 0.66 /
  0.70; single-step-tv 90.3 / 87.4 / 87.4 and 0.19 / 0.26 / 0.27; pdf-tv-admm 45.3 / 45.6 /
  44.6 and 0.58 / 0.57 / 0.62.
- 7T 60 mm slab over M1, seeds 0 / 1 / 2, deep-M1 change error (ppm): tfi −0.005 / −0.004 /
  −0.005; single-step-tv −0.004 / −0.001 / −0.006; pdf-tv-admm −0.006 (seed 0).
- Anatomy phantom (small slab), deep-layer change found, poses 0-4 (ppm): tfi 0.024 / 0.032 /
  0.022 / 0.025 / 0.027; single-step-tv 0.027 / 0.026 / 0.022 / 0.022 / 0.026; pdf-tv-admm
  0.003 / 0.016 (poses 0 / 1). ``run_qsm`` there: tfi 36-38 s, single-step-tv 6-7 s (2 cores
  shared by three jobs).

TFI keeps the grey/white and deep-grey contrast that single-step TV loses (tissue NRMSE
59-64 % against 168-395 %), finds the deep-layer M1 change as well as single-step TV on the
slabs and through the node's own M1 analysis, and is the only pipeline within the 3T targets;
it is the slowest. (On 2026-12-07 it first failed the demo's follow-up through the M1
analysis, +0.003 of a true +0.02 ppm: the segmentation called the raised deep layer of its
smooth χ CSF, fixed in ``qsmnode.m1.segment``; now +0.0096, single-step TV +0.0107.) The
TFI figures above are with its earlier 20 mm source shell; with 14 mm (its default now,
``qsmnode.qsm.tfi``) the heads score 36.2 / 37.1 / 39.7 % and the slabs' M1 errors are
−0.005 / −0.003 / −0.005 ppm; with the polish's border weight and no noise weight (session
16, RESULTS.md) the heads score 33.0 / 34.3 / 36.6 %, 3T SNR 50 / 30 / 35° tilt 32.4 / 37.0
/ 37.1 %, the slabs' M1 errors −0.003 / −0.002 / −0.004 ppm, and the anatomy phantom's
deep-layer change reads 0.023 / 0.030 / 0.021 / 0.023 / 0.028 ppm. Single-step TV: λ = 1e-4,
ρ_data = 0.01, 30 iterations; PDF: tolerance 3e-3, at most 200 iterations, 20 mm padding;
TV-ADMM: λ = 1e-4, 50 iterations; TFI: ``qsmnode.qsm.tfi.TFI``'s defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from qsmnode.qsm import background as bg
from qsmnode.qsm import inversion as inv
from qsmnode.qsm.fieldfit import FieldFit, fit_field
from qsmnode.qsm.mask import MaskParams, brain_mask, covers_whole_head, restrict_to_prior
from qsmnode.qsm.offsets import MCPC3DS, echo_difference, mcpc3ds_offset, remove_offset
from qsmnode.qsm.quality import (
    PeelParams,
    RepairParams,
    peel_source_layers,
    phase_jumps,
    repair_field,
    residual_outliers,
)
from qsmnode.qsm.reference import reference_chi
from qsmnode.qsm.relaxometry import R2STAR_MAX_PER_S, combine_magnitude, r2star_map
from qsmnode.qsm.tfi import TFI
from qsmnode.qsm.unwrap import BestPath, SpatialUnwrap, unwrap_spatial, unwrap_temporal, wrap


@dataclass(frozen=True)
class QSMParams:
    """Every choice the QSM engine makes (see the module docstring for the defaults): one
    parameter type per step, beside the method it configures, and the method of a step chosen
    by its type (:data:`~qsmnode.qsm.background.BackgroundMethod`,
    :data:`~qsmnode.qsm.inversion.InversionMethod`). None skips an optional step.

    Attributes:
        mask: the brain mask and its whole-head restriction to a prior.
        offsets: phase offset removal (None: the offsets stay in the phase).
        unwrap_method: unwrapping of the echo-difference template
            (:func:`~qsmnode.qsm.unwrap.unwrap_spatial`).
        repair: unreliable field voxels dropped or filled (None: all kept).
        peel: outer mask layers holding strong sources peeled (None: none).
        background_peel_voxels: voxel layers eroded from the mask before background removal
            or inversion; default 0.
        background_method: background removal, for a local-field inversion (a single-step
            inversion needs none and does not use it).
        noise_weighting: TFI, PDF and TV-ADMM weight their data terms by the combined magnitude
            (inverse noise); default False: at 7T the field model's error where the
            magnitude is dark (sinuses, the brain's edge) outweighs the noise there, and the
            unweighted TFI scored better in every independent condition measured, 3T SNR 30
            included (RESULTS.md, session 16). ``pdf-tv-admm`` sets it.
        inversion_method: the dipole inversion.
        reference: χ referenced to the mean over the QSM mask or over ``run_qsm``'s CSF mask.
        r2star_method, r2star_max_per_s, combine_method: relaxometry
            (:func:`~qsmnode.qsm.relaxometry.r2star_map`,
            :func:`~qsmnode.qsm.relaxometry.combine_magnitude`).

    Outputs record the parameters flat (:meth:`to_record`: ``quality.json``, the BIDS
    sidecars, the SR's provenance), each step's method by name under ``<step>_method``.
    """

    mask: MaskParams = field(default_factory=MaskParams)
    offsets: MCPC3DS | None = field(default_factory=MCPC3DS)
    unwrap_method: SpatialUnwrap = field(default_factory=BestPath)
    repair: RepairParams | None = field(default_factory=RepairParams)
    peel: PeelParams | None = None
    background_peel_voxels: int = 0
    background_method: bg.BackgroundMethod = field(default_factory=bg.ResharpLBV)
    noise_weighting: bool = False
    inversion_method: inv.InversionMethod | TFI = field(default_factory=TFI)
    reference: Literal["mask", "csf"] = "mask"
    r2star_method: Literal["auto", "arlo", "loglinear"] = "auto"
    r2star_max_per_s: float = R2STAR_MAX_PER_S
    combine_method: Literal["rss", "te_weighted"] = "rss"

    def to_record(self) -> dict[str, Any]:
        """Every parameter, flat, as recorded in ``quality["params"]``: a step's settings as
        ``<step>_<setting>`` (``mask_threshold``, ``peel_max_mm``, ``inversion_lam``), its
        method's name as ``<step>_method`` (``background_method: "pdf"``,
        ``inversion_method: "tv_admm"``), a skipped step as None (``offsets: None``)."""
        record: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not is_dataclass(value):
                record[f.name] = value
                continue
            step = f.name.removesuffix("_method")
            record.update({f"{step}_{key}": v for key, v in asdict(value).items()})
        return record


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
    "tfi": QSMParams(),
    "single-step-tv": QSMParams(peel=PeelParams(), inversion_method=inv.SingleStepTV()),
    "pdf-tv-admm": QSMParams(background_method=bg.PDF(), noise_weighting=True,
                             inversion_method=inv.TVADMM()),
}
"""The pipelines measured against the independent forward model, by name (module docstring);
``qsmnode.qsm.DEFAULT_METHOD`` is ``QSMParams()``, the one the node runs."""


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
                 prior: BrainPrior | None, p: MaskParams, quality: dict) -> NDArray[np.bool_]:
    """``m`` restricted to the brain prior (:func:`restrict_to_prior`) when there is one, it is
    enabled and the signal mask spans a whole head (:func:`covers_whole_head`; slabs keep the
    signal mask); ``quality["mask_prior"]`` says what was done and why."""
    record: dict[str, Any] = {"signal_mask_voxels": int(m.sum())}
    quality["mask_prior"] = record
    if not p.prior or prior is None:
        record["applied"] = False
        record["why_not"] = "disabled" if not p.prior else "no template given"
        return m
    if not covers_whole_head(m, vs, p.prior_min_extent_mm, p.prior_min_volume_ml):
        record["applied"] = False
        record["why_not"] = (f"not a whole head (the signal mask is under "
                             f"{p.prior_min_extent_mm:g} mm along an axis or "
                             f"{p.prior_min_volume_ml:g} mL)")
        return m
    t0 = time.perf_counter()
    try:
        brain = np.asarray(prior(first_echo, m), dtype=bool)
    except (ValueError, RuntimeError) as exc:
        record.update(applied=False, why_not=str(exc))
        return m
    restricted = restrict_to_prior(m, brain, vs, p.prior_margin_mm)
    record.update(seconds=round(time.perf_counter() - t0, 2), prior_voxels=int(brain.sum()))
    if not restricted.any():
        record.update(applied=False, why_not="the prior does not overlap the signal mask")
        return m
    record["applied"] = True
    return restricted


def _masked(mag: np.ndarray, vs: np.ndarray, phase: np.ndarray | None,
            mask: np.ndarray | None, finite: np.ndarray, maps: tuple[np.ndarray, ...],
            p: MaskParams, quality: dict, prior: BrainPrior | None = None) -> np.ndarray:
    """The brain mask (``mask`` when given, else :func:`brain_mask` of the magnitude, with the
    phase's coherence when ``phase`` is given, restricted to ``prior`` on a whole head:
    :func:`_apply_prior`), restricted to finite voxels; ``maps`` are set to 0 outside it and
    ``quality`` records its size."""
    if mask is None:
        m = brain_mask(mag, vs, phase=phase, threshold=p.threshold,
                       coherence_threshold=p.coherence_threshold,
                       dark_coherence_threshold=p.dark_coherence_threshold,
                       bias_sigma_mm=p.bias_sigma_mm, separate_mm=p.separate_mm)
        m = _apply_prior(m, mag[..., 0], vs, prior, p, quality)
    else:
        m = np.asarray(mask, dtype=bool).copy()
    m &= finite
    for values in maps:
        values[~m] = 0.0
    quality["mask_fraction"] = float(m.mean())
    quality["mask_voxels"] = int(m.sum())
    return m


class _Clock:
    """Wall time of each step (s), for ``quality["timings_s"]``: a step's time runs from the
    previous :meth:`tick` to its own."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.start = self.last = time.perf_counter()

    def tick(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[step] = round(now - self.last, 3)
        self.last = now

    def done(self) -> dict[str, float]:
        """The timings with their ``total``."""
        self.timings["total"] = round(time.perf_counter() - self.start, 3)
        return self.timings


def _by_echo_time(te: NDArray[np.float64], *volumes: NDArray[np.float32]
                  ) -> tuple[NDArray[np.float64], list[NDArray[np.float32]]]:
    """Echo times ascending, and the volumes' echoes (last axis) in the same order."""
    order = np.argsort(te)
    if np.any(order != np.arange(te.size)):
        return te[order], [v[..., order] for v in volumes]
    return te, list(volumes)


def _zero_missing(*volumes: NDArray[np.float32]
                  ) -> tuple[NDArray[np.bool_], list[NDArray[np.float32]]]:
    """Voxels finite in every echo of every volume, and the volumes with the others set to 0."""
    finite = np.logical_and.reduce([np.isfinite(v).all(axis=-1) for v in volumes])
    if finite.all():
        return finite, list(volumes)
    return finite, [np.where(finite[..., None], v, 0.0).astype(np.float32) for v in volumes]


def _relaxometry(mag: NDArray[np.float32], te: NDArray[np.float64], p: QSMParams
                 ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Step 1: the combined magnitude, R2* and T2* (both 0 with a single echo)."""
    combined = combine_magnitude(mag, te, method=p.combine_method)
    if te.size >= 2:
        r2s, t2s = r2star_map(mag, te, method=p.r2star_method, r2star_max_per_s=p.r2star_max_per_s)
    else:
        r2s = np.zeros(mag.shape[:-1], np.float32)
        t2s = np.zeros_like(r2s)
    return combined, r2s, t2s


def _unwrapped(ph: NDArray[np.float32], mag: NDArray[np.float32], te: NDArray[np.float64],
               m: NDArray[np.bool_], vs: NDArray[np.float64], p: QSMParams, clock: _Clock
               ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Steps 3-4: the unwrapped phase of every echo (offsets removed, :attr:`QSMParams.offsets`)
    and the spatially unwrapped template it was made congruent to (the echo-2/echo-1 phase
    difference; with one echo, the echo itself)."""
    if te.size < 2:
        template = unwrap_spatial(ph[..., 0], m, method=p.unwrap_method, voxel_size_mm=vs)
        clock.tick("unwrap_temporal")
        return template[..., None], template
    diff = unwrap_spatial(echo_difference(ph), m, method=p.unwrap_method, voxel_size_mm=vs)
    clock.tick("unwrap_template")
    if p.offsets is not None:
        phi0 = mcpc3ds_offset(ph[..., 0], diff, te[0], te[1], vs, magnitude=mag[..., 0], mask=m,
                              sigma_mm=p.offsets.sigma_mm)
        ph = remove_offset(ph, phi0)
    clock.tick("offsets")
    unwrapped = unwrap_temporal(ph, te, diff / np.float32(te[1] - te[0]), mag)
    clock.tick("unwrap_temporal")
    return unwrapped, diff


def _reliable_field(fit: FieldFit, template: NDArray[np.float32], m: NDArray[np.bool_],
                    vs: NDArray[np.float64], repair: RepairParams | None, quality: dict
                    ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Step 5 after the fit: the field and its mask with unreliable voxels (π-jumps in the
    template, large fit residuals) dropped or filled; ``quality`` records the residual and
    the counts."""
    res_in = fit.residual_rad[m]
    quality["fit_residual_rad_median"] = float(np.median(res_in)) if res_in.size else 0.0
    quality["fit_residual_rad_p95"] = float(np.percentile(res_in, 95)) if res_in.size else 0.0
    if repair is None:
        return fit.field_ppm, m
    bad = phase_jumps(template, m, repair.jump_limit_rad)
    bad |= residual_outliers(fit.residual_rad, m, repair.residual_floor_rad,
                             repair.residual_factor)
    field_ppm, field_mask, n_filled = repair_field(fit.field_ppm, m, bad, vs)
    quality["unreliable_voxels"] = int(bad.sum())
    quality["filled_voxels"] = n_filled
    quality["dropped_voxels"] = int(m.sum() - field_mask.sum())
    return field_ppm, field_mask


def _peeled(field_ppm: NDArray[np.float32], field_mask: NDArray[np.bool_],
            vs: NDArray[np.float64], p: QSMParams, quality: dict, clock: _Clock
            ) -> NDArray[np.bool_]:
    """The mask the inversion gets: the outermost voxel layers of a magnitude mask can hold
    partial-volume bone/air sources, peeled first (:attr:`QSMParams.peel`), then
    ``background_peel_voxels`` layers eroded."""
    if p.peel is not None:
        field_mask, n_peeled = peel_source_layers(field_ppm, field_mask, vs, max_mm=p.peel.max_mm,
                                                  factor=p.peel.factor)
        quality["peeled_voxels"] = n_peeled
        clock.tick("peel")
    if p.background_peel_voxels > 0:
        field_mask = ndimage.binary_erosion(field_mask, iterations=p.background_peel_voxels)
    return field_mask


def _chi(field_ppm: NDArray[np.float32], field_mask: NDArray[np.bool_],
         combined: NDArray[np.float32], vs: NDArray[np.float64], b0: NDArray[np.float64],
         p: QSMParams, quality: dict, clock: _Clock
         ) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.float32], inv.Info]:
    """Steps 6-7, chosen by the inversion's type: a single-step inversion of the total field,
    or the background removal then the local-field inversion. χ (unreferenced), the QSM mask,
    the local field and the inversion's info; ``quality["background"]`` says what removed the
    background."""
    match p.inversion_method:
        case inv.SingleStepTV() as single_step:
            quality["background"] = {"method": "none (single-step inversion of the total field)"}
            return single_step.invert_total(field_ppm, field_mask, vs, b0)
        case TFI() as total_field:
            quality["background"] = {"method": "none (total field inversion)"}
            weight = _noise_weight(combined, field_mask) if p.noise_weighting else None
            return total_field.invert_total(field_ppm, field_mask, vs, b0, weight, combined)
        case inversion:
            weight = _noise_weight(combined, field_mask) if p.noise_weighting else None
            local, qsm_mask, quality["background"] = p.background_method.remove(
                field_ppm, field_mask, vs, b0, weight)
            clock.tick("background")
            chi, info = inversion.invert(local, qsm_mask, vs, b0, weight)
            return chi, qsm_mask, local, info


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
            whole head the signal mask is restricted to it (``params.mask.prior*``), so
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
    te, (mag, ph) = _by_echo_time(te, mag, ph)
    quality: dict[str, Any] = {"params": p.to_record(), "shape": tuple(mag.shape)}
    clock = _Clock()
    finite, (ph, mag) = _zero_missing(ph, mag)
    ph = wrap(ph)
    combined, r2s, t2s = _relaxometry(mag, te, p)
    clock.tick("relaxometry")
    m = _masked(mag, vs, ph if (p.mask.use_phase and te.size >= 2) else None, mask, finite,
                (r2s, t2s), p.mask, quality, brain_prior)
    clock.tick("mask")
    unwrapped, template = _unwrapped(ph, mag, te, m, vs, p, clock)
    fit = fit_field(unwrapped, mag, te, field_strength_t, mask=m)
    del unwrapped
    field_ppm, field_mask = _reliable_field(fit, template, m, vs, p.repair, quality)
    del template
    clock.tick("field_fit")
    field_mask = _peeled(field_ppm, field_mask, vs, p, quality, clock)
    chi, qsm_mask, local, quality_inv = _chi(field_ppm, field_mask, combined, vs, b0, p, quality,
                                             clock)
    quality["qsm_mask_fraction_of_mask"] = float(qsm_mask.sum() / max(int(m.sum()), 1))
    quality["inversion"] = quality_inv
    clock.tick("inversion")
    chi, quality["reference_offset_ppm"] = reference_chi(
        chi, qsm_mask, csf_mask=csf_mask if p.reference == "csf" else None)
    clock.tick("reference")
    quality["timings_s"] = clock.done()
    return QSMResult(chi_ppm=chi, r2star_per_s=r2s, t2star_s=t2s, magnitude=combined, mask=m,
                     qsm_mask=qsm_mask, total_field_ppm=fit.field_ppm, local_field_ppm=local,
                     fit_residual_rad=fit.residual_rad, quality=quality)


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
    te, (mag,) = _by_echo_time(te, mag)
    finite, (mag,) = _zero_missing(mag)
    quality: dict[str, Any] = {"params": p.to_record(), "shape": tuple(mag.shape),
                               "qsm_computed": False}
    clock = _Clock()
    combined, r2s, t2s = _relaxometry(mag, te, p)
    clock.tick("relaxometry")
    m = _masked(mag, vs, None, mask, finite, (r2s, t2s), p.mask, quality)
    clock.tick("mask")
    quality["timings_s"] = clock.done()
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
