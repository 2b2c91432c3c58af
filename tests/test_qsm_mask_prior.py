"""Brain mask on whole heads (issue 11 item 4): a template's brain restricts the signal mask.

The real Philips 3T 3 mm whole head: the magnitude-only mask held scalp, skull, orbits and
sinuses (3481 mL); with the template's brain registered to the first echo it is brain-sized.
Synthetic cases check the restriction itself and that slabs keep their signal mask; a whole
head made here from the MNI152 2009a tissue maps checks that the prior's registration finds
the brain where the one-level registration of 2026-12-06 did not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qsmnode.qsm.engine import QSMParams, run_qsm
from qsmnode.qsm.mask import MaskParams, brain_mask, covers_whole_head, restrict_to_prior
from qsmnode.qsm.synthetic import centred_coordinates, ellipsoid, multi_echo_signal

VOX = (3.0, 3.0, 3.0)
SHAPE = (64, 72, 64)
TE = np.array([0.0023, 0.0046])
BRAIN_ML = (1000.0, 1700.0)
"""An adult brain mask without scalp, skull, orbits or sinuses (the issue's target)."""


def _ml(mask: np.ndarray, vox: tuple[float, ...] | np.ndarray = VOX) -> float:
    return float(mask.sum() * np.prod(vox) / 1000.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def head() -> dict[str, np.ndarray]:
    """A 3 mm whole head: brain (1.4 L), skull thinned to one partial-volume voxel that
    touches the brain at the vertex, bright scalp (its signal mask is the whole head)."""
    scalp = ellipsoid(SHAPE, VOX, (82, 98, 84))
    skull = ellipsoid(SHAPE, VOX, (74, 90, 76))
    brain = ellipsoid(SHAPE, VOX, (66, 82, 62))
    m0 = np.zeros(SHAPE, np.float32)
    r2s = np.full(SHAPE, 20.0, np.float32)
    m0[scalp] = 1.4
    m0[skull] = 0.35  # partial-volume bone, at the threshold
    m0[brain] = 1.0
    _, _, z = centred_coordinates(SHAPE, VOX)
    m0[skull & ~brain & (z > 55)] = 1.0  # a bridge of bright tissue through the skull
    mag, phase = multi_echo_signal(m0, r2s, np.zeros(SHAPE, np.float32), TE, 3.0, noise=0.02)
    return {"mag": mag, "phase": phase, "brain": brain, "scalp": scalp & ~skull}


def test_a_whole_head_and_a_slab_are_told_apart(head: dict[str, np.ndarray]) -> None:
    """The signal mask of the synthetic head is a whole head (and holds its scalp); a 60 mm
    slab of it, or the brain alone, is not."""
    signal = brain_mask(head["mag"], VOX)
    assert _ml(signal) > 2200 and (signal & head["scalp"]).sum() > 0
    assert covers_whole_head(signal, VOX)
    assert not covers_whole_head(signal[:, :, 30:50], VOX)
    assert not covers_whole_head(head["brain"], VOX)  # 1.4 L: no prior needed


@pytest.mark.parametrize("size", ["slab", "small-slab"])
def test_the_simulated_7t_slabs_are_never_whole_heads(size: str) -> None:
    """The simulator's 7T slabs keep their signal mask whatever they hold: even a mask filling
    the whole field of view is not a whole head (they are under 130 mm along an axis)."""
    from qsmnode.sim.scanner import preset

    scan = preset(size)
    assert not covers_whole_head(np.ones(scan.shape, bool), scan.voxel_size_mm,
                                 min_volume_ml=0.0)


def test_restriction_to_a_misplaced_prior_keeps_the_brain_and_drops_the_scalp(
    head: dict[str, np.ndarray],
) -> None:
    """A prior 3 mm off (a registration's misfit) and 3 mm smaller than the brain: the
    restricted mask is the brain (Dice > 0.95) with no scalp."""
    signal = brain_mask(head["mag"], VOX)
    prior = np.roll(ellipsoid(SHAPE, VOX, (63, 79, 59)), 1, axis=0)
    out = restrict_to_prior(signal, prior, VOX, margin_mm=3.0)
    assert _dice(out, head["brain"]) > 0.95
    assert (out & head["scalp"]).sum() == 0
    assert not restrict_to_prior(signal, np.zeros(SHAPE, bool), VOX).any()


def test_run_qsm_uses_the_prior_on_a_whole_head_only(head: dict[str, np.ndarray]) -> None:
    """run_qsm hands the first echo and the signal mask to ``brain_prior`` on the whole head
    and restricts the mask to it; on a slab the prior is never asked for and the mask is the
    signal mask; a prior that fails leaves the signal mask, and the record says why."""
    calls: list[tuple[tuple[int, ...], int]] = []

    def prior(first_echo: np.ndarray, signal: np.ndarray) -> np.ndarray:
        calls.append((first_echo.shape, int(signal.sum())))
        return head["brain"]

    args = (TE, VOX, (0.0, 0.0, 1.0), 3.0)
    whole = run_qsm(head["mag"], head["phase"], *args, brain_prior=prior)
    assert calls and calls[0][0] == SHAPE
    assert whole.quality["mask_prior"]["applied"] is True
    assert _dice(whole.mask, head["brain"]) > 0.93 and not (whole.mask & head["scalp"]).any()
    plain = run_qsm(head["mag"], head["phase"], *args)
    assert plain.quality["mask_prior"] == {"signal_mask_voxels": int(plain.mask.sum()),
                                           "applied": False, "why_not": "no template given"}
    assert (plain.mask & head["scalp"]).sum() > 0

    slab = (slice(None), slice(None), slice(30, 50))
    calls.clear()
    slab_mag = np.ascontiguousarray(head["mag"][slab])
    slab_phase = np.ascontiguousarray(head["phase"][slab])
    with_prior = run_qsm(slab_mag, slab_phase, *args, brain_prior=prior)
    without = run_qsm(slab_mag, slab_phase, *args)
    assert not calls
    assert np.array_equal(with_prior.mask, without.mask)
    assert with_prior.quality["mask_prior"]["why_not"].startswith("not a whole head")

    def failing(first_echo: np.ndarray, signal: np.ndarray) -> np.ndarray:
        raise ValueError("registration to the template for the brain prior: no good")

    failed = run_qsm(head["mag"], head["phase"], *args, brain_prior=failing)
    assert np.array_equal(failed.mask, plain.mask)
    assert failed.quality["mask_prior"]["why_not"].endswith("no good")
    off = run_qsm(head["mag"], head["phase"], *args, QSMParams(mask=MaskParams(prior=False)),
                  brain_prior=prior)
    assert np.array_equal(off.mask, plain.mask)


@pytest.fixture(scope="module")
def mni_head() -> dict[str, np.ndarray]:
    """A 3 mm whole head made here from the MNI152 2009a GM/WM maps (not the registration's
    2009c template): brain (filled GM+WM with a voxel of CSF), a 3 mm partial-volume skull
    whose signal bridges brain and scalp, and 12 mm of bright scalp. The truth brain is made
    by this fixture, not by the code under test."""
    from scipy import ndimage

    from qsmnode.dicom.reference_data import load_tissue_template

    tissue = load_tissue_template()

    def block(a: np.ndarray, f: int = 3) -> np.ndarray:
        n = [s // f * f for s in a.shape]
        a = a[: n[0], : n[1], : n[2]]
        return a.reshape(n[0] // f, f, n[1] // f, f, n[2] // f, f).mean(axis=(1, 3, 5))

    gm, wm = block(tissue.gm), block(tissue.wm)
    affine = tissue.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.ones(3)  # the centre of the first 3-voxel block
    affine[:3, :3] *= 3.0
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.5, iterations=2))
    brain = ndimage.binary_dilation(brain)
    outside_mm = ndimage.distance_transform_edt(~brain, sampling=VOX)
    skull = (outside_mm > 0) & (outside_mm <= 3.0)
    scalp = (outside_mm > 3.0) & (outside_mm <= 15.0)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    mag = np.where(brain, 0.8 * gm + 0.6 * wm + csf, 0.0)
    mag[skull], mag[scalp] = 0.45, 1.3
    mag = np.abs(mag + np.random.default_rng(0).normal(0.0, 0.02, mag.shape))
    return {"first_echo": mag.astype(np.float32), "affine": affine, "brain": brain,
            "head": brain | skull | scalp, "outer_scalp": (outside_mm > 9.0) & scalp}


@pytest.mark.parametrize("pose_deg", [(0.0, 0.0, 0.0), (20.0, 0.0, 0.0)])
def test_the_prior_registration_finds_a_brain_the_one_level_one_missed(
    mni_head: dict[str, np.ndarray], pose_deg: tuple[float, float, float],
) -> None:
    """The template prior on a whole head whose scalp touches the brain (``mni_head``), as
    the MNI grid and with the head nodded 20 degrees: the searched registration
    (``BRAIN_PRIOR_PARAMS``) passes the NMI gate, its prior is the brain (measured
    2026-12-07: NMI 1.145, Dice 0.914, 1.19 times the brain's volume) and the restricted mask
    drops the outer scalp (0.6 % of the scalp beyond 9 mm kept). The one-level registration
    of 2026-12-06 (rigid + affine at 4 mm from the geometry, in bench_brain_prior.py)
    failed every check: NMI 1.015 and 1.012, the template grown over the whole head (3.96 and
    3.78 times the brain, Dice 0.40 and 0.42, 97 % of the outer scalp kept)."""
    from scipy.spatial.transform import Rotation

    from qsmnode.dicom.reference_data import load_template
    from qsmnode.m1.register import MIN_QUALITY_NMI, template_brain_prior

    head = mni_head
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler("xyz", pose_deg, degrees=True).as_matrix()
    template = load_template()
    prior, registration = template_brain_prior(head["first_echo"], turn @ head["affine"],
                                               head["head"], template.data, template.affine)
    assert registration.quality_nmi >= MIN_QUALITY_NMI, registration.quality_nmi
    assert _dice(prior, head["brain"]) > 0.88
    assert 0.8 * _ml(head["brain"]) < _ml(prior) < 1.3 * _ml(head["brain"])
    restricted = restrict_to_prior(head["head"], prior, VOX)
    assert (restricted & head["outer_scalp"]).sum() < 0.03 * head["outer_scalp"].sum()


@pytest.mark.slow
def test_real_philips_whole_head_gets_a_brain_sized_mask(shared_data: Path) -> None:
    """Philips 3T 2-echo FFE, 3 mm, whole head: with the MNI template's brain (registered to
    the first echo) the mask is 1.0-1.7 L and χ in it is tissue-like; the magnitude-only mask
    held the head (3481 mL) with a saturated rim (χ 1st/99th percentiles −1.65/+1.28 ppm).
    Measured 2026-12-06: 1574 mL, QSM mask 1132 mL, χ −0.077/+0.094 ppm; with the searched
    registration (2026-12-07) 1571 mL, QSM mask 1128 mL, χ −0.075/+0.094 ppm, NMI 1.120."""
    from qsmnode.dicom.load import load_folder
    from qsmnode.dicom.reference_data import load_m1_atlas
    from qsmnode.m1.register import brain_prior_function

    (loaded,) = load_folder(shared_data / "philips-3t-2echo" / "classic")
    gre = loaded.gre
    atlas = load_m1_atlas()
    prior = brain_prior_function(np.asarray(gre.affine, np.float64), atlas.template,
                                 atlas.template_affine)
    args = (gre.magnitude, gre.phase, gre.echo_times_s, gre.voxel_size_mm, gre.b0_direction,
            gre.field_strength_t)
    result = run_qsm(*args, brain_prior=prior)
    assert result.quality["mask_prior"]["applied"] is True, result.quality["mask_prior"]
    volume = _ml(result.mask, gre.voxel_size_mm)
    assert BRAIN_ML[0] <= volume <= BRAIN_ML[1], volume
    p1, p99 = np.percentile(result.chi_ppm[result.qsm_mask], [1, 99])
    assert -0.3 < p1 < 0 < p99 < 0.3, (p1, p99)
    # the magnitude-only mask, which this test would have failed on, is the whole head
    assert _ml(run_qsm(*args).mask, gre.voxel_size_mm) > 3000


@pytest.mark.slow
def test_the_pipeline_without_an_m1_atlas_reads_the_template_itself(shared_data: Path) -> None:
    """``run_pipeline`` without the M1 analysis (``qsmnode process`` without an atlas, and the
    same ``brain_prior_for`` in ``qsmnode qsm``) masks the Philips whole head the same way: it
    reads the default template only for a whole head. Measured: 58311 voxels (1574 mL), as
    with the M1 atlas's template (2026-12-06; 1571 mL with the searched registration)."""
    from qsmnode.dicom.load import load_folder
    from qsmnode.pipeline import PipelineParams, run_pipeline

    (loaded,) = load_folder(shared_data / "philips-3t-2echo" / "classic")
    quality = run_pipeline(loaded, PipelineParams()).qsm_quality
    assert quality["mask_prior"]["applied"] is True, quality["mask_prior"]
    volume = quality["mask_voxels"] * float(np.prod(loaded.gre.voxel_size_mm)) / 1000.0
    assert BRAIN_ML[0] <= volume <= BRAIN_ML[1], volume
