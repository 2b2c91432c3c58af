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
