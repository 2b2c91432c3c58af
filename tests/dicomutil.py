"""Helpers for tests of the DICOM edge: the phase step of each simulated vendor style, grid
comparisons, and a small T1w series written as a scanner would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsmnode.sim.scanner import ScanParams
from qsmnode.sim.vendor_dicom import PHILIPS_PHASE_SLOPE, SimStudyInfo, T1wProtocol, write_t1w_dicom

T1W_SEED = 31
"""The study seed of :func:`write_t1w` (the T1w tests' ``SEED``)."""

PHASE_STEP = {
    "siemens": 2 * np.pi / 4096,
    "siemens-xa": 2 * np.pi / 4096,
    "philips": PHILIPS_PHASE_SLOPE / 1000,
    "enhanced": PHILIPS_PHASE_SLOPE / 1000,
}


def voxel_map(a: np.ndarray, b: np.ndarray, shape_b: tuple[int, ...], tol_mm: float = 1e-3):
    """Indices into grid ``a`` of every voxel of grid ``b`` (shape ``shape_b``), asserting the two
    grids put voxels at the same positions (axis flips and permutations allowed)."""
    m = np.linalg.inv(a) @ b
    perm = np.round(m[:3, :3])
    assert np.allclose(np.abs(perm).sum(axis=0), 1) and np.allclose(np.abs(perm).sum(axis=1), 1)
    idx_b = np.indices(shape_b[:3]).reshape(3, -1).astype(np.float64)
    idx_a = perm @ idx_b + np.round(m[:3, 3])[:, None]
    pos_a = a[:3, :3] @ idx_a + a[:3, 3:4]
    pos_b = b[:3, :3] @ idx_b + b[:3, 3:4]
    assert np.abs(pos_a - pos_b).max() < tol_mm
    return tuple(np.rint(idx_a).astype(int)), tuple(np.rint(idx_b).astype(int))


def angle_error(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(np.angle(np.exp(1j * (x.astype(np.float64) - y)))).max())


T1W_SCAN = ScanParams(shape=(32, 36, 20), voxel_size_mm=(1.5, 1.5, 1.5),
                      rotation_deg=(-6.0, 4.0, 0.0), centre_mm=(0.0, -18.0, 30.0))
"""A small axial T1w grid with its own tilt (the grouping and loading tests need no anatomy)."""


def t1w_image(scan: ScanParams = T1W_SCAN, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(scan.shape) * 100 + 5).astype(np.float32)


def write_t1w(out: Path, scan: ScanParams = T1W_SCAN, seed: int = T1W_SEED,
              **protocol: Any) -> list[Path]:
    return write_t1w_dicom(t1w_image(scan), scan.affine, out, SimStudyInfo(seed=seed),
                           T1wProtocol(**protocol))
