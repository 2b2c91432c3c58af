"""Measurements per M1 area and layer, coverage, normative z-scores and quality flags."""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qsmnode.m1.layers import cortical_layers
from qsmnode.m1.measure import (
    SIGNAL_RATIO_REFERENCE,
    AreaCoverage,
    NormativeTable,
    area_core,
    area_coverage,
    measure_m1,
    quality_flags,
    region_labels,
)
from qsmnode.m1.result import AREAS, LAYERS, segment_label, segment_of
from qsmnode.sim.phantom import PhantomParams, Tissue, sample_tissue, tissue_maps
from qsmnode.sim.scanner import ScanParams, preset

REPO = Path(__file__).resolve().parents[1]
TE_S = 0.015
"""Echo time of the stand-in T2*-weighted magnitude PD·exp(−TE·R2*)."""


def _truth(scan: ScanParams, phantom: PhantomParams, pad_i: int = 0):
    """The simulator's truth on a scan grid, optionally extended by ``pad_i`` voxels on each
    side along i, sampled directly (the ``sample_tissue`` call ``simulate`` makes, without the
    field simulation). Returns the tissue sample, χ, R2*, proton density and the mask of
    the scan's own field of view."""
    shape = (scan.shape[0] + 2 * pad_i, scan.shape[1], scan.shape[2])
    ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
    ijk[0] -= pad_i
    a = scan.affine
    pts = (a[:3, :3] @ ijk + a[:3, 3:4]).astype(np.float32)
    t = sample_tissue(phantom, *(p.reshape(shape) for p in pts))
    chi, r2, pd = tissue_maps(phantom, t)
    fov = np.zeros(shape, dtype=bool)
    fov[pad_i:pad_i + scan.shape[0]] = True
    return t, chi, r2, pd, fov


def _areas(t) -> np.ndarray:
    """Truth M1 areas 1..4 are in ``AREAS`` order; 5 (the rest of M1) is not measured."""
    return np.where(t.m1_area <= len(AREAS), t.m1_area, 0).astype(np.uint8)


def _analyse(phantom: PhantomParams, seed: int, **kwargs):
    scan = preset("small-slab")
    h = scan.voxel_size_mm
    t, chi, r2, pd, _ = _truth(scan, phantom)
    gm, wm = t.label == Tissue.GM, t.label == Tissue.WM
    lay = cortical_layers(gm, wm, h)
    rng = np.random.default_rng(seed)
    chi_noisy = chi + rng.normal(0, 0.02, chi.shape).astype(np.float32)
    r2_noisy = r2 + rng.normal(0, 2.0, chi.shape).astype(np.float32)
    mag = (pd * np.exp(-TE_S * r2)).astype(np.float32)
    inputs = (_areas(t), gm, lay.depth, lay.thickness_mm, chi_noisy, r2_noisy, mag, h)
    ms = measure_m1(*inputs, **kwargs)
    return t, chi, inputs, {(m.area, m.layer): m for m in ms}


@pytest.fixture(scope="module")
def healthy():
    return _analyse(PhantomParams(), seed=1)


@pytest.fixture(scope="module")
def als():
    return _analyse(PhantomParams(als_delta_chi_ppm={"left_hand": 0.03}), seed=2)


def test_every_area_and_layer_is_measured(healthy):
    _, _, _, ms = healthy
    assert list(ms) == [(a, layer) for a in AREAS for layer in (*LAYERS, "all")]
    for m in ms.values():
        assert m.covered and m.voxel_count > 300
        assert m.chi_z is None and m.t2star_signal_ratio_z is None
        assert m.chi_median_ppm == pytest.approx(0.015, abs=0.003)
        assert m.chi_sd_ppm == pytest.approx(0.02, rel=0.15)
        assert m.r2star_mean_per_s == pytest.approx(31.0, abs=0.5)
        assert m.t2star_signal_ratio == pytest.approx(1.0, abs=0.01)
    for area in AREAS:
        assert ms[(area, "all")].thickness_mean_mm == pytest.approx(2.9, abs=0.45)
        counts = sum(ms[(area, layer)].voxel_count for layer in LAYERS)
        assert counts == ms[(area, "all")].voxel_count


def test_deep_layer_chi_within_001_ppm_of_truth(als):
    """True labels, true χ plus 0.02 ppm noise: the deep-layer mean is within ±0.01 ppm of the
    true mean over the true deep third, in every area (left hand raised to 0.045 ppm)."""
    t, chi, _, ms = als
    for i, area in enumerate(AREAS, start=1):
        true_deep = (t.m1_area == i) & (t.label == Tissue.GM) & (t.depth >= 2 / 3)
        truth = float(np.mean(chi[true_deep]))
        assert abs(ms[(area, "deep")].chi_mean_ppm - truth) <= 0.01, area
    assert float(np.mean(chi[(t.m1_area == 1) & (t.depth >= 2 / 3)])) == pytest.approx(0.045)


def test_als_raise_is_found_in_left_hand_deep_only(healthy, als):
    """+0.03 ppm in the left hand's deep third: found there, and nowhere else beyond noise,
    as a raw difference and as a z-score against a table built from the healthy phantom."""
    _, _, _, base = healthy
    _, _, _, ill = als
    for (area, layer), m in ill.items():
        delta = m.chi_mean_ppm - base[(area, layer)].chi_mean_ppm
        if (area, layer) == ("left_hand", "deep"):
            assert delta > 0.02
        elif area == "left_hand":
            # "all" holds the deep layer; the middle layer a few misbinned deep voxels.
            assert delta > 0.005 if layer == "all" else abs(delta) < 0.005
        else:
            assert abs(delta) < 0.003, (area, layer)
    deep = ill[("left_hand", "deep")]
    assert deep.t2star_signal_ratio < 0.9  # the hypointense deep layer (Cosottini 2016)
    assert deep.r2star_mean_per_s > 45.0

    table = NormativeTable.from_mapping({
        "schema": 1,
        "areas": {
            area: {layer: {"chi_mean_ppm": base[(area, layer)].chi_mean_ppm,
                           "chi_sd_ppm": 0.005,
                           "t2star_signal_ratio_mean": base[(area, layer)].t2star_signal_ratio,
                           "t2star_signal_ratio_sd": 0.03}
                   for layer in (*LAYERS, "all")}
            for area in AREAS
        },
    })
    _, _, inputs, _ = als
    ms = measure_m1(*inputs, normative=table)
    z = {(m.area, m.layer): m for m in ms}
    assert z[("left_hand", "deep")].chi_z > 4
    assert z[("left_hand", "deep")].t2star_signal_ratio_z < -3
    for area in AREAS[1:]:
        for layer in (*LAYERS, "all"):
            assert abs(z[(area, layer)].chi_z) < 1, (area, layer)


def _foot_missing_slab():
    """The small slab's geometry shifted to the left, 48 mm wide along i: it covers the left
    hand area (x −50 to −24 mm) but not the foot areas (|x| < 14 mm) nor the right hand."""
    return ScanParams(shape=(60, 160, 48), voxel_size_mm=(0.8, 0.8, 1.2),
                      centre_mm=(-40.0, -20.0, 52.0), rotation_deg=(18.0, 0.0, 0.0))


def test_slab_that_misses_the_foot_reports_not_covered():
    """The atlas areas, warped onto a grid reaching beyond the slab, with the slab's field of
    view: the foot areas are outside it, and are "not covered" with no numbers."""
    scan = _foot_missing_slab()
    t, chi, r2, pd, fov = _truth(scan, PhantomParams(), pad_i=50)
    h = scan.voxel_size_mm
    areas = _areas(t)
    assert np.count_nonzero(areas == AREAS.index("left_foot") + 1) > 1000
    gm, wm = t.label == Tissue.GM, t.label == Tissue.WM
    # Only the acquired slab has data: the layers see its outside as neutral.
    lay = cortical_layers(gm & fov, wm & fov, h, neutral=~fov)
    mag = (pd * np.exp(-TE_S * r2)).astype(np.float32)
    ms = {(m.area, m.layer): m for m in measure_m1(
        areas, gm, lay.depth, lay.thickness_mm, chi, r2, mag, h, fov=fov)}
    for layer in (*LAYERS, "all"):
        assert ms[("left_hand", layer)].covered
        for area in ("left_foot", "right_foot", "right_hand"):
            m = ms[(area, layer)]
            assert not m.covered
            assert math.isnan(m.chi_mean_ppm) and math.isnan(m.t2star_signal_ratio)
            assert math.isnan(m.thickness_mean_mm) and m.chi_z is None
    assert ms[("left_hand", "deep")].chi_mean_ppm == pytest.approx(0.015, abs=0.003)

    cov = area_coverage(areas, gm, lay.depth, h, fov=fov)
    assert cov["left_hand"].covered and cov["left_hand"].fov_fraction > 0.9
    assert cov["left_foot"].fov_fraction == 0.0 and "slab covers 0%" in cov["left_foot"].reason

    # The same from the areas' expected volumes, with arrays on the slab's grid only.
    vox = float(np.prod(h))
    expected = {a: float(np.count_nonzero(areas == i)) * vox
                for i, a in enumerate(AREAS, start=1)}
    crop = (slice(50, 50 + scan.shape[0]),)
    cov2 = area_coverage(areas[crop], gm[crop], lay.depth[crop], h,
                         expected_volume_mm3=expected)
    assert {a: c.covered for a, c in cov2.items()} == {a: c.covered for a, c in cov.items()}


def test_a_few_voxels_are_not_a_measurement():
    """Three voxels of an area inside the field of view: below the minimum volume."""
    shape = (20, 20, 20)
    areas = np.zeros(shape, np.uint8)
    cortex = np.zeros(shape, bool)
    areas[5, 5, 5:8] = 1
    cortex[5, 5, 5:8] = True
    depth = np.where(cortex, 0.8, np.nan).astype(np.float32)
    ones = np.ones(shape, np.float32)
    ms = measure_m1(areas, cortex, depth, ones, ones, ones, ones, (1.0, 1.0, 1.0))
    m = ms[0]
    assert (m.area, m.layer, m.voxel_count, m.covered) == ("left_hand", "deep", 3, False)
    cov = area_coverage(areas, cortex, depth, (1.0, 1.0, 1.0))
    assert not cov["left_hand"].covered and "3 mm³" in cov["left_hand"].reason
    assert cov["left_foot"].reason == "the area is not in the label map"


def test_region_labels_match_segment_label():
    areas = np.array([[[0, 1, 1, 2, 4, 4, 3]]], dtype=np.uint8)
    depth = np.array([[[0.9, 0.9, 0.1, 0.5, 0.7, np.nan, 0.2]]], dtype=np.float32)
    cortex = np.ones(areas.shape, bool)
    lab = region_labels(areas, cortex, depth)
    assert lab.tolist() == [[[
        0,
        segment_label("left_hand", "deep"),
        segment_label("left_hand", "superficial"),
        segment_label("right_hand", "middle"),
        segment_label("right_foot", "deep"),
        0,
        segment_label("left_foot", "superficial"),
    ]]]
    assert segment_of(int(lab[0, 0, 4])) == ("right_foot", "deep")


def test_example_normative_table_parses_and_is_marked_placeholder():
    data = tomllib.loads((REPO / "config" / "m1_normative.example.toml").read_text())
    table = NormativeTable.from_mapping(data)
    assert table.placeholder
    assert table.t2star_signal_ratio_reference == SIGNAL_RATIO_REFERENCE
    assert table.get("left_hand", "deep") is not None
    assert table.get("right_hand", "all").t2star_signal_ratio_sd is None
    assert table.get("left_foot", "middle") is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": 2}, "schema"),
        ({"areas": {"left_knee": {}}}, "unknown area"),
        ({"areas": {"left_hand": {"layer4": {}}}}, "unknown layer"),
        ({"areas": {"left_hand": {"deep": {"chi_mean_ppm": 0.0, "chi_sd_ppm": 0.0}}}},
         "positive"),
        ({"areas": {"left_hand": {"deep": {"chi_mean_ppm": "x", "chi_sd_ppm": 1.0}}}},
         "finite number"),
        ({"areas": {"left_hand": {"deep": {"chi_sd_ppm": 1.0}}}}, "chi_mean_ppm"),
        ({"areas": {"left_hand": {"deep": {"chi_mean_ppm": 0.0, "chi_sd_ppm": 1.0,
                                           "t2star_signal_ratio_mean": 1.0}}}}, "both"),
        ({"t2star_signal_ratio_reference": "superficial-layer"}, "reference"),
        ({"depth_method": "laplace"}, "depth_method"),
        ({"colour": "blue"}, "unknown keys"),
    ],
)
def test_normative_table_validation(change, message):
    data = {"schema": 1, "areas": {}}
    data.update(change)
    with pytest.raises(ValueError, match=message):
        NormativeTable.from_mapping(data)


def test_normative_depth_method_must_match():
    table = NormativeTable.from_mapping({"schema": 1, "depth_method": "equidistant"})
    shape = (4, 4, 4)
    z = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="equidistant"):
        measure_m1(np.zeros(shape, np.uint8), z > 0, z, z, z, z, z, (1, 1, 1),
                   normative=table)


def test_quality_flags():
    cov = {a: AreaCoverage(a, 100.0, 1.0, True, "ok") for a in AREAS}
    cov["left_foot"] = replace(cov["left_foot"], covered=False, fov_fraction=0.1,
                               reason="the slab covers 10% of the area (< 50%)")
    gm = np.zeros((10, 10, 10), bool)
    wm = np.zeros_like(gm)
    gm[:5] = True
    wm[5:] = True
    thick = np.full(gm.shape, 2.6, np.float32)
    flags = {f.name: f for f in quality_flags(cov, gm, wm, thick)}
    assert [n for n in flags if n.startswith("coverage_")] == [f"coverage_{a}" for a in AREAS]
    assert not flags["coverage_left_foot"].passed
    assert flags["coverage_left_foot"].value == 0.1
    assert flags["coverage_left_hand"].passed
    assert flags["segmentation_gm_wm_ratio"].passed
    assert flags["segmentation_gm_wm_ratio"].value == pytest.approx(1.0)
    assert flags["cortical_thickness"].passed
    assert flags["cortical_thickness"].value == pytest.approx(2.6)

    thin = {f.name: f for f in quality_flags(cov, gm, wm, thick * 0.3)}
    assert not thin["cortical_thickness"].passed and "outside" in thin["cortical_thickness"].text
    all_gm = {f.name: f for f in quality_flags(cov, gm | wm, wm & False, thick)}
    assert not all_gm["segmentation_gm_wm_ratio"].passed
    assert all_gm["segmentation_gm_wm_ratio"].value is None


def test_area_core_leaves_out_the_edges_along_the_cortex_not_across_a_sulcus():
    """Two parallel cortical sheets (two banks of a sulcus, 1 mm apart); the area is one half
    of the lower sheet. The core drops the 1.5 mm next to the rest of its own sheet, and
    nothing next to the other bank, which is only reached through cortex far away."""
    h = (0.5, 0.5, 1.0)
    cortex = np.zeros((40, 20, 10), dtype=bool)
    cortex[:, :, 2:4] = True  # lower bank
    cortex[:, :, 5:7] = True  # upper bank, across a 1 mm sheet
    area = cortex.copy()
    area[20:] = False
    area[:, :, 5:] = False
    core = area_core(area, cortex, h, 1.5)
    assert not (core & ~area).any()
    assert np.array_equal(core[:17], area[:17])
    assert not core[17:20].any()  # within 1.5 mm of x index 20
    assert np.array_equal(area_core(area, cortex, h, 0.0), area)
    # A thin strip of an area (2 voxels wide) has no core; measure_m1 then uses it whole.
    strip = np.zeros_like(area)
    strip[10:12, :, 2:4] = True
    assert not area_core(strip, cortex, h, 1.5).any()


def test_statistics_come_from_the_core_when_an_edge_band_is_different():
    """A band of another value at the area's edge (a misplaced edge) stays out of the mean."""
    h = (0.5, 0.5, 1.0)
    shape = (60, 40, 10)
    cortex = np.zeros(shape, dtype=bool)
    cortex[:, :, 2:6] = True
    areas = np.zeros(shape, dtype=np.uint8)
    areas[:30][cortex[:30]] = 1
    chi = np.where(cortex, 0.05, 0.0).astype(np.float32)
    chi[27:30] = 0.0  # the area's last 1.5 mm is the neighbour's cortex
    depth = np.where(cortex, 0.5, np.nan).astype(np.float32)
    ones = np.ones(shape, dtype=np.float32)
    kw = {"min_volume_mm3": 5.0, "min_fov_fraction": 0.0}
    whole = measure_m1(areas, cortex, depth, ones, chi, ones, ones, h,
                       boundary_margin_mm=0.0, **kw)
    cored = measure_m1(areas, cortex, depth, ones, chi, ones, ones, h, **kw)
    m0 = next(m for m in whole if m.area == "left_hand" and m.layer == "all")
    m1 = next(m for m in cored if m.area == "left_hand" and m.layer == "all")
    assert m0.chi_mean_ppm == pytest.approx(0.05 * 27 / 30, abs=1e-6)
    assert m1.chi_mean_ppm == pytest.approx(0.05, abs=1e-6)
    assert m1.voxel_count == m0.voxel_count == 30 * 40 * 4
    assert m1.core_voxel_count == 27 * 40 * 4 and m0.core_voxel_count == m0.voxel_count
