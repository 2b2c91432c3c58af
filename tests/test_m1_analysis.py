"""The whole M1 analysis on the anatomy phantom: areas, layers, measurements and flags."""

from __future__ import annotations

import numpy as np
import pytest

from qsmnode.dicom.templates import load_m1_atlas
from qsmnode.m1.analysis import analyse_m1
from qsmnode.m1.layers import cortical_layers
from qsmnode.m1.result import AREAS, segment_of
from qsmnode.sim.anatomy import simulate_anatomy
from qsmnode.sim.phantom import Tissue
from qsmnode.sim.scanner import preset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def analysed():
    sim = simulate_anatomy(preset("small-slab"), pose_seed=3, als={"left_hand": 0.04},
                           with_field=False)
    rng = np.random.default_rng(0)
    t = sim.truth
    chi = (t.chi_ppm + rng.normal(0, 0.01, t.chi_ppm.shape)).astype(np.float32)
    r2star = (t.r2star_per_s + rng.normal(0, 2.0, t.chi_ppm.shape)).astype(np.float32)
    magnitude = np.sqrt((sim.gre.magnitude**2).mean(axis=-1)).astype(np.float32)
    mask = t.brain_mask & (t.labels != Tissue.BONE)
    result, seconds = analyse_m1(chi, r2star, magnitude, mask, sim.gre.affine, load_m1_atlas())
    return sim, result, seconds


def test_areas_land_on_the_true_areas(analysed) -> None:
    sim, result, _ = analysed
    found = np.zeros(result.labels.shape, dtype=np.uint8)
    for label in np.unique(result.labels[result.labels > 0]):
        area, _ = segment_of(label)
        found[result.labels == label] = AREAS.index(area) + 1
    gm = sim.truth.labels == Tissue.GM
    for i, area in enumerate(AREAS, start=1):
        true = gm & (sim.truth.m1_areas == i)
        mine = found == i
        dice = 2 * (true & mine).sum() / max(true.sum() + mine.sum(), 1)
        assert dice > 0.5, f"{area}: Dice {dice:.2f}"


def test_deep_layer_change_is_found_in_the_left_hand_only(analysed) -> None:
    _, result, _ = analysed
    deep = {a: result.measurement(a, "deep") for a in AREAS}
    assert all(m.covered for m in deep.values())
    others = [deep[a].chi_mean_ppm for a in AREAS if a != "left_hand"]
    assert deep["left_hand"].chi_mean_ppm - max(others) > 0.02


def test_thickness_from_the_segmentation_agrees_with_the_true_labels(analysed) -> None:
    """Own segmentation and registration against Laplace thickness on the phantom's true
    labels, per area. (The anatomy phantom's distance-based thickness truth disagrees with
    the Laplace thickness of its own labels by 1-2 mm: an open issue of the phantom.)"""
    sim, result, _ = analysed
    t = sim.truth
    gm, wm = t.labels == Tissue.GM, t.labels == Tissue.WM
    reference = cortical_layers(gm, wm, sim.gre.voxel_size_mm).thickness_mm
    for i, area in enumerate(AREAS, start=1):
        expected = float(np.nanmean(reference[gm & (t.m1_areas == i)]))
        measured = result.measurement(area, "all").thickness_mean_mm
        assert abs(measured - expected) < 0.5, f"{area}: {measured:.2f} vs {expected:.2f} mm"


def test_flags_and_timings(analysed) -> None:
    _, result, seconds = analysed
    names = {f.name for f in result.flags}
    assert "registration_nmi" in names and {f"coverage_{a}" for a in AREAS} <= names
    assert next(f for f in result.flags if f.name == "registration_nmi").passed
    assert set(seconds) == {"segmentation", "registration", "layers", "measurements"}
