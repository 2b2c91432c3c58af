"""Brain mask: robust to strong receive bias, no scalp, keeps the cortex surface, slabs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmnode.qsm.mask import brain_mask, fill_holes_open_faces
from qsmnode.qsm.synthetic import centred_coordinates, ellipsoid, multi_echo_signal

SHAPE = (56, 64, 52)
VOX = (1.0, 1.0, 1.0)
TE = np.array([0.004, 0.009, 0.014, 0.019])


@pytest.fixture(scope="module")
def head() -> dict[str, np.ndarray]:
    """Brain (with a bright CSF rim), dark skull, bright scalp, air; a ×6 receive bias."""
    x, _, z = centred_coordinates(SHAPE, VOX)
    scalp = ellipsoid(SHAPE, VOX, (26, 30, 24))
    skull = ellipsoid(SHAPE, VOX, (23, 27, 21))
    brain = ellipsoid(SHAPE, VOX, (20, 24, 18))  # includes the CSF rim below
    wm = ellipsoid(SHAPE, VOX, (16, 20, 14))
    m0 = np.zeros(SHAPE, np.float32)
    r2s = np.zeros(SHAPE, np.float32)
    m0[scalp] = 0.9
    r2s[scalp] = 40
    m0[skull] = 0.03  # bone: almost no signal
    r2s[skull] = 300
    m0[brain] = 0.9  # grey matter / CSF
    r2s[brain] = 30
    m0[wm] = 0.7
    r2s[wm] = 45
    vein = ellipsoid(SHAPE, VOX, (1.5, 20, 1.5), centre_mm=(3, 0, 5))
    m0[vein] = 0.2  # dark vein inside: a hole to be filled
    r2s[vein] = 150
    bias = np.exp(0.9 * x / 26 + 0.6 * z / 24).astype(np.float32)  # ≈ ×6 across the head
    mag, phase = multi_echo_signal(m0 * bias, r2s, 0.01 * x * np.ones(SHAPE), TE, 7.0, noise=0.02)
    return {"mag": mag, "phase": phase, "brain": brain, "scalp": scalp & ~skull}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("use_phase", [False, True])
def test_mask_under_strong_bias(head: dict[str, np.ndarray], use_phase: bool) -> None:
    m = brain_mask(head["mag"], VOX, phase=head["phase"] if use_phase else None)
    assert m.dtype == bool
    assert _dice(m, head["brain"]) > 0.97
    assert (m & head["scalp"]).sum() == 0
    # the outermost voxel layer of the brain (the cortex surface) is kept
    surface = head["brain"] & ~ndimage.binary_erosion(head["brain"])
    assert (m & surface).sum() > 0.9 * surface.sum()
    assert ndimage.label(m)[1] == 1


def test_mask_of_a_slab_cutting_through_the_brain(head: dict[str, np.ndarray]) -> None:
    sl = (slice(None), slice(None), slice(30, 44))  # top of the brain, cut at both faces
    mag = np.ascontiguousarray(head["mag"][sl])
    brain = head["brain"][sl]
    m = brain_mask(mag, VOX)
    assert _dice(m, brain) > 0.95
    assert (m & head["scalp"][sl]).sum() == 0


def test_hole_open_to_a_cut_face_is_filled() -> None:
    m = np.zeros((20, 20, 10), bool)
    m[3:17, 3:17, :] = True
    m[8:12, 8:12, 5:] = False  # cavity reaching the top face only
    filled = fill_holes_open_faces(m)
    assert filled[8:12, 8:12, 5:].all()
    assert not filled[0:3].any()


@pytest.mark.slow
def test_dark_veins_stay_in_and_bright_rim_stays_out_at_7t() -> None:
    """The anatomy phantom's 7T slab (``small-slab``, pose 2): its veins are dark (short
    T2*) and the field jumps at their walls, so a uniform coherence threshold of 0.5 left
    267 vein voxels out; 0.3 everywhere kept them but also let in 3784 more voxels of bright
    extracerebral CSF against bone (field jumps there too), which cost the deep-M1 change
    (RESULTS.md). The darker-than-tissue threshold keeps the veins (36 left out) and adds
    234 voxels outside the brain. Measured 2026-12-08: outside the true brain 3.62 % (0.5),
    3.65 % (this rule), 4.04 % (0.3) of its volume."""
    from qsmnode.sim.anatomy import simulate_anatomy
    from qsmnode.sim.phantom import Tissue
    from qsmnode.sim.scanner import preset

    sim = simulate_anatomy(preset("small-slab"), pose_seed=2)
    gre, truth = sim.gre, sim.truth
    m = brain_mask(gre.magnitude, gre.voxel_size_mm, phase=gre.phase)
    veins = truth.labels == Tissue.VEIN
    assert (veins & ~m).sum() < 0.05 * veins.sum(), (veins & ~m).sum()  # 267 of 1858 at 0.5
    outside = (m & ~truth.brain_mask).sum() / truth.brain_mask.sum()
    assert outside < 0.038, outside  # 0.0404 with 0.3 everywhere
