"""Cortical depth and thickness: flat and spherical cortex of known geometry, and the phantom."""

from __future__ import annotations

import numpy as np
import pytest

from qsmnode.m1.layers import DEEP, MIDDLE, SUPERFICIAL, cortical_layers, depth_bins
from qsmnode.sim.phantom import PhantomParams, Tissue, sample_tissue
from qsmnode.sim.scanner import ScanParams


def _flat_slab(h, normal, thickness, shift=0.0, shape=(60, 60, 40)):
    """Cortex between two parallel planes: white matter below, CSF above.

    Returns gm, wm, the true equidistant depth (0 pial, 1 WM) and an interior mask away from
    the array's edges (where the field is cut by the array, not by anatomy)."""
    n = np.asarray(normal, dtype=float)
    n /= np.linalg.norm(n)
    s = np.tensordot(np.moveaxis(np.indices(shape), 0, -1) * np.asarray(h), n, axes=1)
    c0 = s.mean() - thickness / 2 + shift
    wm = s < c0
    gm = (s >= c0) & (s < c0 + thickness)
    depth = 1.0 - (s - c0) / thickness
    interior = gm.copy()
    m = 10
    interior[:m] = interior[-m:] = False
    interior[:, :m] = interior[:, -m:] = False
    return gm, wm, depth, interior


def test_axis_aligned_cortex_is_exact():
    """Along a grid axis the finite-volume Laplace field is linear and the boundary at h/2 is
    the voxel face: thickness and depth are exact."""
    h = (0.7, 0.7, 0.6)
    shape = (12, 12, 20)
    wm = np.zeros(shape, dtype=bool)
    gm = np.zeros(shape, dtype=bool)
    wm[:, :, :6] = True
    gm[:, :, 6:11] = True  # 5 voxels of 0.6 mm: 3.0 mm
    lay = cortical_layers(gm, wm, h)
    assert np.allclose(lay.thickness_mm[gm], 3.0, atol=1e-3)
    expected = 1.0 - (np.arange(5) + 0.5) / 5
    got = lay.depth_equidistant[0, 0, 6:11]
    assert np.allclose(got, expected, atol=2e-3)
    assert np.allclose(lay.depth_equivolume[gm], lay.depth_equidistant[gm], atol=2e-3)
    assert np.isnan(lay.thickness_mm[~gm]).all() and np.isnan(lay.depth[~gm]).all()


@pytest.mark.parametrize(
    ("normal", "shift"), [((0.3, -0.4, 1.0), 0.0), ((0.6, 0.35, 0.7), 0.31)]
)
def test_oblique_flat_slab_anisotropic(normal, shift):
    """Flat cortex 2.7 mm thick, oblique to a 0.5 × 0.5 × 0.9 mm grid."""
    h = (0.5, 0.5, 0.9)
    thickness = 2.7
    gm, wm, depth, interior = _flat_slab(h, normal, thickness, shift)
    lay = cortical_layers(gm, wm, h)
    assert not np.isnan(lay.thickness_mm[interior]).any()
    assert abs(float(np.mean(lay.thickness_mm[interior])) - thickness) < 0.1
    assert float(np.mean(np.abs(lay.thickness_mm[interior] - thickness))) < 0.15
    for d in (lay.depth_equidistant, lay.depth_equivolume):
        assert float(np.mean(np.abs(d[interior] - depth[interior]))) < 0.05
    # Flat: the pial and white areas are equal, so the depths agree and each bin is a third.
    assert np.median(lay.area_ratio[interior]) == pytest.approx(1.0, abs=0.05)
    fractions = [np.mean(lay.bins[interior] == b) for b in (DEEP, MIDDLE, SUPERFICIAL)]
    assert np.allclose(fractions, 1 / 3, atol=0.06)


def _shell(h, r_in, r_out, convex):
    ext = r_out + 2.0
    axes = [np.arange(-ext, ext + 1e-9, step) + 0.13 for step in h]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    gm = (r >= r_in) & (r < r_out)
    wm = (r < r_in) if convex else (r >= r_out)
    return gm, wm, r


@pytest.mark.parametrize("convex", [True, False])
def test_spherical_shell_equivolume(convex):
    """A spherical shell of cortex, 6 → 9 mm: white matter inside (a gyral crown, convex) or
    outside (a sulcal fundus, concave).

    Field lines are radial, so the thickness is 3 mm and the pial/white area ratio is
    (9/6)² (convex) or (6/9)² (concave). Equivolume layers hold equal volumes: on the convex
    side the deep layer, where the area is smallest, is the thickest in millimetres and holds
    a third of the volume, where the equidistant deep layer holds only (7³ − 6³)/(9³ − 6³) =
    25%. Waehnert's α = (2ρ + (r − 1)ρ²)/(1 + r) agrees with the exact spherical volume
    fraction to < 0.01 here."""
    h = (0.5, 0.5, 0.8)
    r_in, r_out = 6.0, 9.0
    gm, wm, r = _shell(h, r_in, r_out, convex)
    lay = cortical_layers(gm, wm, h)
    assert float(np.mean(np.abs(lay.thickness_mm[gm] - 3.0))) < 0.12
    ratio = (r_out / r_in) ** 2 if convex else (r_in / r_out) ** 2
    assert float(np.median(lay.area_ratio[gm])) == pytest.approx(ratio, rel=0.05)

    rr = r[gm]
    if convex:
        exact_eqv = 1 - (rr**3 - r_in**3) / (r_out**3 - r_in**3)
        eqd_deep_fraction = (7.0**3 - 6.0**3) / (9.0**3 - 6.0**3)
    else:
        exact_eqv = 1 - (r_out**3 - rr**3) / (r_out**3 - r_in**3)
        eqd_deep_fraction = (9.0**3 - 8.0**3) / (9.0**3 - 6.0**3)
    assert float(np.mean(np.abs(lay.depth_equivolume[gm] - exact_eqv))) < 0.035
    # The two depths differ the way the geometry says: equivolume deeper on the convex side.
    shift = float(np.mean(lay.depth_equivolume[gm] - lay.depth_equidistant[gm]))
    assert shift > 0.04 if convex else shift < -0.04

    eqv_deep = float(np.mean(lay.bins[gm] == DEEP))
    eqd_deep = float(np.mean(depth_bins(lay.depth_equidistant)[gm] == DEEP))
    assert eqv_deep == pytest.approx(1 / 3, abs=0.04)
    assert eqd_deep == pytest.approx(eqd_deep_fraction, abs=0.04)
    for b in (MIDDLE, SUPERFICIAL):
        assert float(np.mean(lay.bins[gm] == b)) == pytest.approx(1 / 3, abs=0.05)


def test_neutral_region_is_no_boundary():
    """Cortex cut by the field of view: marking the outside neutral keeps the thickness of
    the part inside, where treating it as CSF would thin it."""
    h = (0.5, 0.5, 0.9)
    gm, wm, _, interior = _flat_slab(h, (0.3, -0.4, 1.0), 2.7)
    outside = np.zeros_like(gm)
    outside[:30] = True
    near = interior & ~outside
    near[33:] = False  # the three planes next to the cut
    cut = cortical_layers(gm & ~outside, wm & ~outside, h, neutral=outside)
    assert abs(float(np.mean(cut.thickness_mm[near])) - 2.7) < 0.1
    assert np.isnan(cut.thickness_mm[outside]).all()
    wrong = cortical_layers(gm & ~outside, wm & ~outside, h)
    assert float(np.mean(wrong.thickness_mm[near])) < float(np.mean(cut.thickness_mm[near])) - 0.2


def test_depth_bins_thirds():
    d = np.array([0.0, 0.2, 1 / 3, 0.5, 2 / 3, 0.9, 1.0, np.nan], dtype=np.float32)
    assert depth_bins(d).tolist() == [3, 3, 2, 2, 1, 1, 1, 0]


def test_rejects_bad_input_and_handles_empty():
    with pytest.raises(ValueError, match="shapes"):
        cortical_layers(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="method"):
        cortical_layers(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 1, 1),
                        method="laplace")
    empty = cortical_layers(np.zeros((4, 4, 4), bool), np.ones((4, 4, 4), bool), (1, 1, 1))
    assert np.isnan(empty.thickness_mm).all() and not empty.bins.any()


def _phantom_truth(scan: ScanParams, phantom: PhantomParams):
    """The simulator's truth on a scan grid, sampled directly (no field simulation): the same
    ``sample_tissue`` call ``simulate`` makes for ``Simulation.truth``."""
    a = scan.affine
    ijk = np.indices(scan.shape).reshape(3, -1).astype(np.float64)
    pts = (a[:3, :3] @ ijk + a[:3, 3:4]).astype(np.float32)
    return sample_tissue(phantom, *(p.reshape(scan.shape) for p in pts))


def test_phantom_thickness_in_m1_from_true_labels():
    """Left M1 (hand and foot) of the phantom at the realistic slab's 0.4 × 0.4 × 0.8 mm,
    18° oblique, from the true GM/WM/CSF labels: thickness MAE ≤ 0.3 mm against the truth
    (2.9 mm) and equidistant depth close to the truth's.

    Part of the remaining error is the phantom's: its truth is the thickness parameter, but
    on the walls of the hand knob the sulcal sheet's distance is computed with the sheet's
    mean slope, so the grey matter there is geometrically thinner than 2.9 mm."""
    scan = ScanParams(shape=(140, 120, 64), voxel_size_mm=(0.4, 0.4, 0.8),
                      centre_mm=(-24.0, -30.0, 62.0), rotation_deg=(18.0, 0.0, 0.0))
    t = _phantom_truth(scan, PhantomParams())
    lay = cortical_layers(t.label == Tissue.GM, t.label == Tissue.WM, scan.voxel_size_mm)
    m1 = (t.m1_area > 0) & (t.label == Tissue.GM)
    assert m1.sum() > 50_000
    err = lay.thickness_mm[m1] - t.thickness_mm[m1]
    assert not np.isnan(err).any()
    assert float(np.mean(np.abs(err))) <= 0.3
    assert abs(float(np.median(err))) < 0.1
    assert float(np.mean(np.abs(lay.depth_equidistant[m1] - t.depth[m1]))) < 0.05
