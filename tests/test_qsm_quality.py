"""Phase reliability and mask repair: jumps, residual outliers, field filling, source peeling."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qsmnode.qsm.dipole import forward_field
from qsmnode.qsm.quality import peel_source_layers, phase_jumps, repair_field, residual_outliers
from qsmnode.qsm.synthetic import centred_coordinates, ellipsoid

SHAPE = (48, 48, 44)
VOX = (1.0, 1.0, 1.0)
B0 = np.array([0.0, 0.3, 0.95]) / np.linalg.norm([0.0, 0.3, 0.95])


def test_wrong_island_is_dropped_and_interior_outlier_filled() -> None:
    x, y, z = centred_coordinates(SHAPE, VOX)
    mask = ellipsoid(SHAPE, VOX, (20, 20, 18))
    phase = np.broadcast_to(0.05 * x + 0.03 * y + 0 * z, SHAPE).astype(np.float32)
    field = (0.01 * x + 0 * y + 0 * z).astype(np.float32) * mask
    island = ellipsoid(SHAPE, VOX, (3, 3, 3), centre_mm=(18, 0, 0)) & mask  # at the edge
    phase[island] += 2 * np.pi  # unwrapped with the wrong multiple
    field[island] += 2.0
    field[24, 24, 22] += 3.0  # an interior outlier flagged by its fit residual
    residual = np.zeros(SHAPE, np.float32)
    residual[24, 24, 22] = 3.0
    residual[mask] += 0.01
    bad = phase_jumps(phase, mask) | residual_outliers(residual, mask)
    assert bad[24, 24, 22]
    fixed, new_mask, n_filled = repair_field(field, mask, bad, VOX)
    assert not (new_mask & island).any()  # cut off by its jumps, not enclosed: dropped
    assert abs(fixed[24, 24, 22] - field[23, 24, 22]) < 0.05
    assert n_filled >= 1
    assert new_mask.sum() > 0.95 * mask.sum()


def test_peel_removes_a_rim_of_strong_sources_but_not_clean_edges() -> None:
    brain = ellipsoid(SHAPE, VOX, (17, 18, 15))
    chi = np.zeros(SHAPE, np.float32)
    chi[brain] = 0.02
    chi[ellipsoid(SHAPE, VOX, (12, 13, 10))] = -0.03
    chi[ellipsoid(SHAPE, VOX, (2, 2, 2), (4, 0, 0))] = 0.06
    head = ellipsoid(SHAPE, VOX, (20, 21, 18))
    bone = head & ~ellipsoid(SHAPE, VOX, (19, 20, 17))  # 1 mm from the brain edge
    outside = ndimage.gaussian_filter(np.where(bone, -2.0, 0.0).astype(np.float32), 1.0)
    outside[brain] = 0.0
    total = forward_field(chi + outside, VOX, B0, pad_factor=2.0)
    # a magnitude mask that reaches the bone, and the clean brain mask
    wide = ellipsoid(SHAPE, VOX, (19, 20, 17)) & ~bone
    peeled, n = peel_source_layers(total, wide, VOX)
    assert n > 0.3 * (wide & ~brain).sum()
    assert (peeled & brain).sum() > 0.85 * brain.sum()
    _, n_clean = peel_source_layers(total, brain, VOX)
    assert n_clean < 0.02 * brain.sum()


def test_map_ranges_tell_a_flat_result_from_a_normal_one() -> None:
    """The plausibility gate: χ and fields that span their normal range pass; a map with no
    contrast (constant, or noise far below the floors) and an empty mask are flat."""
    from qsmnode.qsm.quality import (
        CHI_RANGE_FLOOR_PPM,
        FIELD_RANGE_FLOOR_PPM,
        map_range,
        map_ranges,
    )

    rng = np.random.default_rng(0)
    mask = ellipsoid(SHAPE, VOX, (20, 20, 18))
    chi = (rng.normal(0.0, 0.08, SHAPE) * mask).astype(np.float32)  # about ±0.2 ppm
    local = forward_field(chi, VOX, B0) * mask
    total = local + (0.5 * centred_coordinates(SHAPE, VOX)[0] / 20.0) * mask
    normal = map_ranges(chi, mask, local, total, mask)
    assert not any(r.flat for r in normal), normal
    assert normal[0].span_ppm > 10 * CHI_RANGE_FLOOR_PPM
    assert normal[0].voxels == int(mask.sum())

    flat = map_ranges(np.full(SHAPE, 0.01, np.float32) * mask, mask,
                      np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32), mask)
    assert all(r.flat for r in flat)
    assert flat[0].span_ppm == 0.0 and flat[0].floor_ppm == CHI_RANGE_FLOOR_PPM
    assert flat[2].floor_ppm == FIELD_RANGE_FLOOR_PPM
    text = flat[0].text()
    assert "susceptibility (χ) map inside the χ mask spans 0 ppm" in text
    assert f"plausibility floor of {CHI_RANGE_FLOOR_PPM:g} ppm" in text

    # noise a tenth of the floor is still flat; 1 % outliers do not make it plausible
    faint = (rng.normal(0.0, CHI_RANGE_FLOOR_PPM / 40, SHAPE) * mask).astype(np.float32)
    faint[mask & (rng.random(SHAPE) < 0.005)] = 1.0
    assert map_range(faint, mask, "χ", "the mask", CHI_RANGE_FLOOR_PPM).flat
    # only the field flat: still implausible
    assert [r.flat for r in map_ranges(chi, mask, local * 0, total, mask)] == [
        False, True, False]
    # nothing inside the mask, or only NaN
    empty = map_range(chi, np.zeros(SHAPE, bool), "χ", "the χ mask", CHI_RANGE_FLOOR_PPM)
    assert empty.flat and empty.voxels == 0 and "no voxels" in empty.text()
    assert map_range(np.full(SHAPE, np.nan), mask, "χ", "the mask", 0.02).flat
