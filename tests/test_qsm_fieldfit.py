"""Phase offsets (MCPC-3D-S) and the weighted least-squares field fit."""

from __future__ import annotations

import numpy as np

from qsmnode.qsm.fieldfit import fit_field, ppm_per_rad_per_s
from qsmnode.qsm.offsets import echo_difference, mcpc3ds_offset, remove_offset
from qsmnode.qsm.synthetic import centred_coordinates, ellipsoid, multi_echo_signal
from qsmnode.qsm.unwrap import unwrap_spatial, unwrap_temporal

SHAPE = (40, 44, 36)
VOX = (1.0, 1.0, 1.5)
B0_T = 7.0


def _field() -> np.ndarray:
    x, y, z = centred_coordinates(SHAPE, VOX)
    f = 0.4 * np.exp(-((x - 5) ** 2 + y**2 + z**2) / 150.0) - 0.002 * y + 0.001 * z
    return f.astype(np.float32)


def test_fit_recovers_known_field_with_noise() -> None:
    te = np.array([0.004, 0.008, 0.012, 0.016])
    field = _field()
    mask = ellipsoid(SHAPE, VOX, (18, 20, 24))
    mag, phase = multi_echo_signal(np.ones(SHAPE), 30.0, field, te, B0_T, noise=0.02, seed=3)
    # unwrapped, offset-free phase: add the known 2π multiples back
    omega_te = 2 * np.pi * 42.577478e6 * B0_T * 1e-6 * field[..., None] * te
    unwrapped = phase + 2 * np.pi * np.rint((omega_te - phase) / (2 * np.pi))
    fit = fit_field(unwrapped, mag, te, B0_T, mask=mask)
    assert fit.field_ppm.dtype == np.float32
    err = fit.field_ppm[mask] - field[mask]
    # expected noise: σ_φ = 0.02/|S|; per-voxel field sd a few 1e-4 ppm at 7T
    assert np.sqrt(np.mean(err**2)) < 2e-3
    assert abs(np.mean(err)) < 2e-4
    assert np.median(fit.residual_rad[mask]) < 0.05
    assert np.all(fit.field_ppm[~mask] == 0)


def test_residual_flags_a_temporal_unwrapping_error() -> None:
    te = np.array([0.004, 0.008, 0.012, 0.016])
    field = _field()
    mag, phase = multi_echo_signal(np.ones(SHAPE), 0.0, field, te, B0_T)
    omega_te = 2 * np.pi * 42.577478e6 * B0_T * 1e-6 * field[..., None] * te
    unwrapped = phase + 2 * np.pi * np.rint((omega_te - phase) / (2 * np.pi))
    unwrapped[10, 10, 10, 2] += 2 * np.pi
    fit = fit_field(unwrapped, mag, te, B0_T)
    assert fit.residual_rad[10, 10, 10] > 1.0
    assert np.percentile(fit.residual_rad, 99) < 1e-3


def test_mcpc3ds_and_chain_recover_field_with_offset_and_unequal_echoes() -> None:
    te = np.array([0.003, 0.0075, 0.012, 0.0165])  # TE1 ≠ ΔTE
    field = _field()
    mask = ellipsoid(SHAPE, VOX, (18, 20, 24))
    x, y, _ = centred_coordinates(SHAPE, VOX)
    phi0 = (2.5 * np.sin(x / 15.0) + 0.05 * y + 1.0).astype(np.float32)  # wraps, smooth
    mag, phase = multi_echo_signal(
        np.ones(SHAPE), 25.0, field, te, B0_T, phase_offset=phi0, noise=0.01
    )
    diff = unwrap_spatial(echo_difference(phase), mask)
    est = mcpc3ds_offset(
        phase[..., 0], diff, te[0], te[1], VOX, magnitude=mag[..., 0], mask=mask, sigma_mm=2.0
    )
    # the offset is recovered up to the global 2π-ambiguity of the template (a constant field)
    d = np.angle(np.exp(1j * (est - phi0)))[mask]
    inner = d - np.angle(np.mean(np.exp(1j * d)))
    assert np.sqrt(np.mean(inner**2)) < 0.03
    clean = remove_offset(phase, est)
    unwrapped = unwrap_temporal(clean, te, diff / np.float32(te[1] - te[0]), mag)
    fit = fit_field(unwrapped, mag, te, B0_T, mask=mask)
    err = fit.field_ppm[mask] - field[mask]
    err -= np.mean(err)  # a global 2π on the template is a constant field offset
    assert np.sqrt(np.mean(err**2)) < 2e-3
    # the constant is a whole number of cycles over ΔTE at most
    cycle_ppm = ppm_per_rad_per_s(B0_T) * 2 * np.pi / (te[1] - te[0])
    assert abs(np.mean(fit.field_ppm[mask] - field[mask])) < 0.5 * cycle_ppm
