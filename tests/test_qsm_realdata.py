"""Real 3-echo GRE (ROMEO.jl test data, 3T, TE 4/8/12 ms): unwrapping and field fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qsmnode.qsm.engine import run_qsm
from qsmnode.qsm.fieldfit import fit_field
from qsmnode.qsm.mask import brain_mask
from qsmnode.qsm.offsets import echo_difference, mcpc3ds_offset, remove_offset
from qsmnode.qsm.quality import phase_jumps, repair_field, residual_outliers
from qsmnode.qsm.unwrap import unwrap_spatial, unwrap_temporal

nib = pytest.importorskip("nibabel")

TE = np.array([0.004, 0.008, 0.012])  # ROMEO.jl tests: TEs = 4:4:12 ms
B0_T = 3.0


@pytest.fixture(scope="module")
def romeo_small(shared_data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = shared_data / "romeo-3echo-nifti" / "small"
    mag_img = nib.load(folder / "Mag.nii")
    mag = np.asarray(mag_img.get_fdata(dtype=np.float32))
    raw = np.asarray(nib.load(folder / "Phase.nii").get_fdata(dtype=np.float32))
    # stored as arbitrary floats spanning ±0.00367: rescale the range to ±π (as ROMEO does)
    phase = (raw / np.abs(raw).max() * np.pi).astype(np.float32)
    vox = np.asarray(mag_img.header.get_zooms()[:3], dtype=np.float64)
    return mag, phase, vox


def _congruent(a: np.ndarray, b: np.ndarray) -> bool:
    k = (a.astype(np.float64) - b) / (2 * np.pi)
    return bool(np.abs(k - np.rint(k)).max() < 1e-4)


def test_unwrapping_and_field_on_real_data(
    romeo_small: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    mag, phase, vox = romeo_small
    mask = brain_mask(mag, vox, phase=phase)
    assert mask.mean() > 0.9  # the crop lies inside the brain
    diff = unwrap_spatial(echo_difference(phase), mask)
    phi0 = mcpc3ds_offset(phase[..., 0], diff, TE[0], TE[1], vox, magnitude=mag[..., 0], mask=mask)
    clean = remove_offset(phase, phi0)
    unwrapped = unwrap_temporal(clean, TE, diff / np.float32(TE[1] - TE[0]), mag)

    # exact: 2π-congruent to the offset-corrected input, and (with φ0) to the raw input
    assert _congruent(unwrapped, clean)
    assert _congruent(unwrapped + phi0[..., None], phase)

    # no 2π jumps between neighbours in the early echoes (one noisy voxel at the slab face is
    # allowed: it is isolated, its 6 neighbours are flagged) ...
    n = int(mask.sum())
    for echo in range(2):
        assert phase_jumps(unwrapped[..., echo], mask).sum() <= 1e-4 * n
    # ... while naive wrapped phase jumps everywhere the field crosses ±π
    assert phase_jumps(phase[..., 2], mask).sum() > 100 * max(
        phase_jumps(unwrapped[..., 0], mask).sum(), 1
    )

    fit = fit_field(unwrapped, mag, TE, B0_T, mask=mask)
    assert np.median(fit.residual_rad[mask]) < 0.1
    bad = phase_jumps(diff, mask) | residual_outliers(fit.residual_rad, mask)
    field, good, _ = repair_field(fit.field_ppm, mask, bad, vox)
    assert good.sum() > 0.99 * n
    two_pi_at_te1 = 1e6 / (42.577478e6 * B0_T * TE[0])  # ≈ 2 ppm: the size of a 2π error
    for axis in range(3):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        step = np.abs(field[hi] - field[lo])[good[hi] & good[lo]]
        assert np.percentile(step, 99) < 0.1  # ppm per voxel
        assert step.max() < 0.25 * two_pi_at_te1


def test_pipeline_runs_on_real_data(romeo_small: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    mag, phase, vox = romeo_small
    res = run_qsm(mag, phase, TE, vox, (0.0, 0.0, 1.0), B0_T)
    chi = res.chi_ppm[res.qsm_mask]
    assert np.isfinite(chi).all()
    assert 0.5 < res.qsm_mask.sum() / res.mask.sum() <= 1.0
    assert -0.5 < np.percentile(chi, 1) and np.percentile(chi, 99) < 0.5  # ppm, brain range
    r2s = res.r2star_per_s[res.mask]
    assert 15 < np.median(r2s) < 60  # 3T brain
