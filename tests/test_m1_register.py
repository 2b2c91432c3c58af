"""Locating M1 by registration to the MNI template, checked against the anatomy phantom."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from qsmnode.dicom import reference_data
from qsmnode.m1.atlas import area_value, m1_hemispheres, resample_labels, split_areas
from qsmnode.m1.register import (
    Registration,
    RegistrationLost,
    RegistrationParams,
    normalised_mutual_information,
    register,
    warp_labels,
)
from qsmnode.m1.result import AREAS
from qsmnode.sim.anatomy import simulate_anatomy
from qsmnode.sim.phantom import Tissue
from qsmnode.sim.scanner import ScanParams, preset

# The true areas are the phantom's own (qsmnode.sim.m1_areas: Jülich BA4 with hand-knob and
# paracentral boxes), not the atlas split warped here (HCPex area 4, 16 mm balls), so even a
# perfect registration overlaps them only partly. Measured (2026-12-05, poses 1-3): Dice
# hand 0.53-0.58, foot 0.51-0.63; lateral slab left hand 0.61. While the truth was the same
# atlas split the bounds were 0.7 / 0.6.
HAND_DICE = 0.45
FOOT_DICE = 0.4
HAND_PRECISION, FOOT_PRECISION = 0.75, 0.5
"""The share of a warped area (in true GM) that is truly that area. Measured (2026-12-05,
poses 1-3): hand 0.88-0.93, foot 0.61-0.80 (the atlas's foot ball reaches below and lateral
to the phantom's paracentral box)."""


@pytest.fixture(scope="module")
def target():
    """The registration target (2009c asymmetric brain) and the atlas's areas on it."""
    tmpl = reference_data.load_template()
    vol, info = reference_data.load_atlas()
    areas = split_areas(m1_hemispheres(vol.data, vol.affine, info.m1), vol.affine)
    return tmpl, areas, vol.affine


def _rms(magnitude):
    return np.sqrt((magnitude.astype(np.float32) ** 2).mean(axis=-1))


def _dice(a, b):
    n = a.sum() + b.sum()
    return 2 * (a & b).sum() / n if n else float("nan")


def _locate(sim, target, params=None):
    tmpl, areas, areas_affine = target
    reg = register(_rms(sim.gre.magnitude), sim.gre.affine, sim.truth.brain_mask, tmpl.data,
                   tmpl.affine, params)
    t0 = time.perf_counter()
    warped = warp_labels(reg, areas, areas_affine, sim.truth.labels.shape, sim.gre.affine)
    return reg, warped, time.perf_counter() - t0


def _area_dice(sim, warped):
    """Dice of the warped areas within the TRUE grey matter against the true areas."""
    gm = sim.truth.labels == Tissue.GM
    return {a: _dice((warped == area_value(a)) & gm, sim.truth.m1_areas == area_value(a))
            for a in AREAS}


def _area_precision(sim, warped):
    """The share of each warped area's TRUE grey matter that is truly that area."""
    gm = sim.truth.labels == Tissue.GM
    out = {}
    for a in AREAS:
        mine = (warped == area_value(a)) & gm
        out[a] = float((mine & (sim.truth.m1_areas == area_value(a))).sum() / max(mine.sum(), 1))
    return out


def _identity(transform=None) -> Registration:
    return Registration(transform or sitk.Euler3DTransform(), 1.0, 1.0, 0.0, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("pose_seed", [1, 2, 3])
def test_hand_and_foot_areas_found_on_the_oblique_vertex_slab(pose_seed, target):
    # An oblique 0.8 x 0.8 x 1.2 mm vertex slab of the anatomy phantom in a random pose.
    sim = simulate_anatomy(preset("small-slab"), pose_seed=pose_seed, with_field=False)
    reg, warped, warp_s = _locate(sim, target)
    dice = _area_dice(sim, warped)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in reg.stage_seconds)
    print(f"pose {pose_seed}: registration {reg.seconds:.1f} s ({stages}), warp {warp_s:.1f} s,"
          f" NMI {reg.quality_nmi:.3f}, Dice " + ", ".join(f"{a} {d:.2f}"
                                                           for a, d in dice.items()))
    precision = _area_precision(sim, warped)
    print(f"pose {pose_seed}: precision " + ", ".join(f"{a} {v:.2f}"
                                                     for a, v in precision.items()))
    for area, d in dice.items():
        assert d >= (HAND_DICE if "hand" in area else FOOT_DICE), (area, d)
        assert precision[area] >= (HAND_PRECISION if "hand" in area else FOOT_PRECISION), (
            area, precision[area])
    assert reg.acceptable
    assert reg.seconds < 60  # about 5-10 s on 2 cores; generous for a loaded CI machine

    # Without registration (the geometry alone) the areas are misplaced: the check can fail,
    # and so does the quality figure.
    unregistered = warp_labels(_identity(), target[1], target[2], sim.truth.labels.shape,
                               sim.gre.affine)
    misplaced = _area_dice(sim, unregistered)
    print(f"pose {pose_seed} unregistered: Dice " + ", ".join(f"{a} {d:.2f}"
                                                           for a, d in misplaced.items()))
    assert min(misplaced.values()) < HAND_DICE


@pytest.mark.slow
def test_slab_that_misses_the_foot_area_leaves_foot_labels_empty(target):
    # A narrow oblique slab over the left lateral convexity: the hand knob, no midline.
    scan = ScanParams(shape=(60, 160, 48), voxel_size_mm=(0.8, 0.8, 1.2),
                      centre_mm=(-48.0, -20.0, 45.0), rotation_deg=(18.0, 0.0, 0.0))
    sim = simulate_anatomy(scan, pose_seed=7, with_field=False)
    assert not np.isin(sim.truth.m1_areas, [area_value("left_foot"),
                                            area_value("right_foot")]).any()
    reg, warped, _ = _locate(sim, target)
    gm = sim.truth.labels == Tissue.GM
    counts = {a: int(((warped == area_value(a)) & gm).sum()) for a in AREAS}
    print(f"lateral slab: NMI {reg.quality_nmi:.3f}, GM voxels per warped area {counts}")
    # 1 mm³ ≈ 1.3 voxels here: the foot areas get at most a sliver, reported "not covered".
    assert counts["left_foot"] < 20 and counts["right_foot"] == 0 and counts["right_hand"] == 0
    assert _area_dice(sim, warped)["left_hand"] >= HAND_DICE


KNOWN_POSE = sitk.Euler3DTransform((0.0, -20.0, 50.0), np.radians(6.0), np.radians(-4.0),
                                  np.radians(5.0), (4.0, -3.0, 5.0))
POSED_SCAN = ScanParams(shape=(64, 64, 28), voxel_size_mm=(2.0, 2.0, 2.0),
                        centre_mm=(0.0, -20.0, 45.0), rotation_deg=(15.0, 0.0, 0.0))


def _sitk_grid(image: sitk.Image, affine: np.ndarray) -> sitk.Image:
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (affine[:3, :3] / spacing).ravel()))
    return image


def _posed_template_slab(tmpl) -> tuple[np.ndarray, np.ndarray]:
    """The template moved by ``KNOWN_POSE`` and cut to an oblique slab: the subject at subject
    point x shows the template at KNOWN_POSE(x). Returns the image and its brain mask."""
    src = _sitk_grid(sitk.GetImageFromArray(np.ascontiguousarray(
        np.transpose(tmpl.data, (2, 1, 0)))), tmpl.affine)
    ref = _sitk_grid(sitk.Image(list(POSED_SCAN.shape), sitk.sitkFloat32), POSED_SCAN.affine)
    subject = np.transpose(sitk.GetArrayFromImage(
        sitk.Resample(src, ref, KNOWN_POSE, sitk.sitkLinear, 0.0)), (2, 1, 0))
    return subject, subject > 0.05 * subject.max()


def test_rigid_registration_recovers_a_known_pose_of_the_template(target):
    """The rigid stage alone finds ``KNOWN_POSE`` to within a voxel."""
    tmpl = target[0]
    subject, mask = _posed_template_slab(tmpl)
    known, s = KNOWN_POSE, POSED_SCAN.affine
    params = RegistrationParams(affine=False, bspline_mesh_mm=0.0, flatten_bias_mm=0.0)
    reg = register(subject, s, mask, tmpl.data, tmpl.affine, params)
    pts = np.argwhere(mask)[:: 97].astype(np.float64) @ s[:3, :3].T + s[:3, 3]
    truth = np.array([known.TransformPoint(tuple(p)) for p in pts])
    err = np.linalg.norm(reg.to_template(pts) - truth, axis=1)
    assert err.mean() < 1.0 and err.max() < 2.0, err.mean()
    assert reg.acceptable and reg.quality_nmi > 1.2


def test_the_same_input_registers_to_the_same_transform(target):
    """Reproducible measurements need a reproducible registration: the rigid and affine
    stages, twice, map the subject to identical template points (with two ITK threads they
    differed by 1e-13 mm, the B-spline stage's by 1e-7 mm: amplified on a poor image, they
    changed which areas were covered). The thread setting is global: the B-spline stage,
    left out for time, runs under the same."""
    tmpl = target[0]
    subject, mask = _posed_template_slab(tmpl)
    pts = np.argwhere(mask)[:: 53].astype(np.float64) @ POSED_SCAN.affine[:3, :3].T \
        + POSED_SCAN.affine[:3, 3]
    params = RegistrationParams(bspline_mesh_mm=0.0)
    first, second = (register(subject, POSED_SCAN.affine, mask, tmpl.data, tmpl.affine, params)
                     for _ in range(2))
    assert first.transform.GetName() == "AffineTransform"
    np.testing.assert_array_equal(first.to_template(pts), second.to_template(pts))
    assert first.quality_nmi == second.quality_nmi


def test_warp_labels_with_identity_is_nearest_neighbour_resampling(target):
    _, areas, areas_affine = target
    scan = preset("small-slab")
    shape = (40, 40, 12)
    affine = scan.affine @ np.diag([4.0, 4.0, 4.0, 1.0])
    warped = warp_labels(_identity(), areas, areas_affine, shape, affine)
    expected = resample_labels(areas, areas_affine, shape, affine)
    assert warped.dtype == areas.dtype
    assert (warped != expected).mean() < 0.002  # ties at exact half-voxels may differ
    # A B-spline transform goes through a displacement field: same answer for a zero one.
    bs = sitk.BSplineTransform(3, 3)
    bs.SetTransformDomainOrigin((-100.0, -140.0, -80.0))
    bs.SetTransformDomainPhysicalDimensions((200.0, 240.0, 200.0))
    bs.SetTransformDomainMeshSize((2, 2, 2))
    composite = sitk.CompositeTransform([sitk.Euler3DTransform(), bs])
    via_field = warp_labels(_identity(composite), areas, areas_affine, shape, affine)
    assert (via_field != expected).mean() < 0.002


def test_normalised_mutual_information():
    rng = np.random.default_rng(0)
    a = rng.normal(size=20000).astype(np.float32)
    assert normalised_mutual_information(a, a) > 1.9
    assert normalised_mutual_information(a, -a) > 1.9  # contrast inversion is information
    assert normalised_mutual_information(a, rng.normal(size=20000).astype(np.float32)) < 1.05


def test_empty_mask_is_refused(target):
    tmpl = target[0]
    scan = replace(preset("tiny"), shape=(10, 10, 10))
    with pytest.raises(ValueError, match="nothing to register"):
        register(np.ones(scan.shape, np.float32), scan.affine, np.zeros(scan.shape, bool),
                 tmpl.data, tmpl.affine)


@pytest.mark.parametrize(("nmi", "mask", "failing"), [
    (1.081, 0.85, "mask_in_template 0.850 < 0.9"),
    (1.050, 0.95, "normalised mutual information 1.050 < 1.07"),
    (1.050, 0.50, "normalised mutual information 1.050 < 1.07; mask_in_template 0.500 < 0.9"),
    (1.100, 0.95, ""),
])
def test_a_rejection_names_the_failing_criterion_and_its_threshold(
    nmi: float, mask: float, failing: str
) -> None:
    from qsmnode.m1.register import Registration

    reg = Registration(sitk.Euler3DTransform(), nmi, mask, -0.5, 0.0)
    assert reg.rejection() == failing
    assert reg.acceptable == (failing == "")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "not detectable: a mirrored near-symmetric brain registers as well as the original "
    "(a proper transform cannot undo the mirror, but it need not: the mirror image is as "
    "good a brain); only mirrored slabs off the midline are rejected, by the NMI check"))
def test_a_vertex_slab_mirrored_left_right_is_rejected(target):
    """The vertex small slab (pose 1) with its pixel data mirrored left-right (voxel axis i
    is the scanner's x) and its header unchanged. Measured (2026-12-06): NMI 1.125,
    mask_in_template 1.000, accepted, as the unmirrored slab (1.124, 1.000).

    Why no check catches it: the phantom's brain is the symmetric ICBM 2009a template, so
    its mirror image is as good a brain as itself. Registering also to the left-right
    mirrored 2009c (asymmetric) template and comparing (rigid + affine, NMI with the
    template minus NMI with its mirror) gave +0.0036 / -0.0038 / -0.0002 on the unmirrored
    poses 1-3 and -0.0036 / +0.0038 mirrored: noise, no margin. On real whole-head images
    the same difference was, unmirrored / mirrored, +0.0016 / -0.0012 (Philips 3T GRE
    sample) and -0.0009 / -0.0004 (Siemens XA30 T1w, 2 mm), with crude brain masks. A real
    brain's left-right asymmetries are small
    beside the registration's residual misfit at 2 mm; a threshold on them would reject
    real brains. Mirrored slabs off the midline are caught (``test_m1_analysis``:
    ``test_a_slab_mirrored_left_right_is_not_reliable``), and so is this slab when a
    same-session T1w is given: the T1w is this head, not a template, and the GRE mirrored fits
    it worse by 0.08 NMI (``test_m1_laterality``, ``qsmnode.m1.laterality``). Without a T1w, as
    here, nothing does. If a detector is added, this test starts to pass and strict xfail
    fails it: drop the marker then."""
    tmpl = target[0]
    sim = simulate_anatomy(preset("small-slab"), pose_seed=1, with_field=False)
    assert np.argmax(np.abs(sim.gre.affine[0, :3])) == 0  # i runs left-right
    mirrored = np.ascontiguousarray(_rms(sim.gre.magnitude)[::-1])
    mask = np.ascontiguousarray(sim.truth.brain_mask[::-1])
    reg = register(mirrored, sim.gre.affine, mask, tmpl.data, tmpl.affine)
    print(f"mirrored vertex slab: NMI {reg.quality_nmi:.3f}, mask {reg.mask_in_template:.3f}")
    assert not reg.acceptable


def test_a_subject_far_off_the_template_fails_with_a_plain_reason(target) -> None:
    """A header that puts the brain 400 mm from where it is: the optimiser finds no overlap
    with the template (ITK: "All samples map outside moving image buffer"), reported in plain
    words that name the likely cause, not ITK's text."""
    tmpl = target[0]
    shifted = tmpl.affine.copy()
    shifted[0, 3] += 400.0
    with pytest.raises(RegistrationLost, match="no longer overlapped the template") as caught:
        register(tmpl.data, shifted, tmpl.data > 0, tmpl.data, tmpl.affine,
                 RegistrationParams(bspline_mesh_mm=0.0, affine=False))
    assert "ITK" not in str(caught.value) and "patient position" in str(caught.value)
    assert isinstance(caught.value, ValueError)
