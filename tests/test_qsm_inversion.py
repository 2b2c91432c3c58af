"""Dipole inversion from a noise-free local field of a small phantom (oblique B0)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmnode.qsm.dipole import forward_field
from qsmnode.qsm.inversion import single_step_tv, tkd, tv_admm
from qsmnode.qsm.synthetic import ellipsoid

SHAPE = (48, 48, 40)
VOX = (1.0, 1.0, 1.25)
B0 = np.array([0.15, np.sin(0.3), np.cos(0.3)])
B0 = B0 / np.linalg.norm(B0)


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = ellipsoid(SHAPE, VOX, (20, 21, 20))
    chi = np.zeros(SHAPE, np.float32)
    chi[ellipsoid(SHAPE, VOX, (17, 18, 17))] = -0.03  # "white matter" inside a "cortex" shell
    chi[mask & ~ellipsoid(SHAPE, VOX, (17, 18, 17))] = 0.02
    for centre, axes, value in [
        ((-7, 4, 0), (3, 5, 4), 0.15),
        ((7, 4, 0), (3, 5, 4), 0.15),
        ((0, -8, 5), (4, 3, 3), 0.08),
        ((0, 7, -8), (2, 2, 6), -0.1),
        ((-5, -5, -8), (2, 2, 2), 0.3),
    ]:
        chi[ellipsoid(SHAPE, VOX, axes, centre)] = value
    chi *= mask
    field = forward_field(chi, VOX, B0, pad_factor=2.0) * mask
    return chi, field.astype(np.float32), mask


def _nrmse(est: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    a = est[mask] - est[mask].mean()
    b = truth[mask] - truth[mask].mean()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_tkd_nrmse(phantom: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    chi, field, mask = phantom
    est, info = tkd(field, mask, VOX, B0)
    assert est.dtype == np.float32 and info["n_fft"] == 2
    nrmse = _nrmse(est, chi, mask)
    print(f"TKD NRMSE {nrmse:.3f}")
    assert nrmse < 0.35  # measured 0.26


def test_tv_admm_nrmse_and_fft_count(phantom: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    chi, field, mask = phantom
    est, info = tv_admm(field, mask, VOX, B0, lam=1e-4, max_iter=60, tol=1e-3)
    nrmse = _nrmse(est, chi, mask)
    print(f"TV-ADMM NRMSE {nrmse:.3f}, {info['iterations']} iterations, {info['n_fft']} FFTs")
    assert nrmse < 0.15  # measured 0.09
    assert info["n_fft"] == 2 * info["iterations"] + 1
    # TV beats TKD on piecewise-constant truth
    assert nrmse < _nrmse(tkd(field, mask, VOX, B0)[0], chi, mask)


def test_wrong_b0_direction_is_much_worse(
    phantom: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """The kernel must follow the oblique B0 (a DOMAIN lesson); assuming z costs accuracy."""
    chi, field, mask = phantom
    right = _nrmse(tkd(field, mask, VOX, B0)[0], chi, mask)
    wrong = _nrmse(tkd(field, mask, VOX, (0.0, 0.0, 1.0))[0], chi, mask)
    assert wrong > right + 0.1


def test_single_step_tv_from_total_field_with_background(
    phantom: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Single-step TV needs no background removal: an air sphere outside adds only a harmonic
    field inside the mask, which the Laplacian data term ignores."""
    chi, _, mask = phantom

    air = ellipsoid(SHAPE, VOX, (4.0, 4.0, 4.0), centre_mm=(0, 0, 22.5))
    air_chi = ndimage.gaussian_filter((9.0 * air).astype(np.float32), 1.0)
    air_chi[ndimage.binary_dilation(mask)] = 0.0
    total = (forward_field(chi + air_chi, VOX, B0, pad_factor=2.0) * mask).astype(np.float32)
    est, out_mask, model, info = single_step_tv(total, mask, VOX, B0, max_iter=60, tol=1e-3)
    assert est.dtype == np.float32 and model.dtype == np.float32
    assert not (out_mask & ~mask).any()
    assert out_mask.sum() > 0.7 * mask.sum()  # only two voxel layers are given up
    assert info["n_fft"] == 4 * info["iterations"] + 2
    nrmse = _nrmse(est, chi, out_mask)
    print(f"single-step TV NRMSE {nrmse:.3f} (with an outside air sphere)")
    assert nrmse < 0.3
    # TKD after no background removal at all would be far off
    naive = _nrmse(tkd(total, mask, VOX, B0)[0], chi, out_mask)
    assert naive > 2 * nrmse
