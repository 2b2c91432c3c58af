"""R2*/T2* from synthetic mono-exponential decays, and echo combination."""

from __future__ import annotations

import numpy as np
import pytest

from qsmnode.qsm.relaxometry import combine_magnitude, r2star_map


def _decays(te: np.ndarray, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    r2s = np.linspace(10.0, 120.0, 24 * 24 * 12, dtype=np.float32).reshape(24, 24, 12)
    s0 = 1000.0
    clean = s0 * np.exp(-r2s[..., None] * te)
    noisy = np.abs(
        clean + noise * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    )
    return noisy.astype(np.float32), r2s


@pytest.mark.parametrize(
    ("method", "te", "tol"),
    [
        ("arlo", np.array([0.004, 0.009, 0.014, 0.019]), 0.05),
        ("loglinear", np.array([0.004, 0.009, 0.014, 0.019]), 0.05),
        ("auto", np.array([0.003, 0.007, 0.013, 0.021]), 0.05),  # unequal → log-linear
        ("auto", np.array([0.005, 0.010]), 0.1),  # two echoes: √2·σ/S/ΔTE ≈ 3-5 s⁻¹
    ],
)
def test_r2star_recovers_known_values_with_noise(method: str, te: np.ndarray, tol: float) -> None:
    mag, truth = _decays(te, noise=10.0)  # SNR 100 at TE = 0
    r2s, t2s = r2star_map(mag, te, method=method)  # type: ignore[arg-type]
    assert r2s.dtype == np.float32 and t2s.dtype == np.float32
    rel = np.abs(r2s - truth) / np.maximum(truth, 40.0)  # ~σ(R2*) ≈ 1-4 s⁻¹ at SNR 100
    assert np.median(rel) < tol
    assert np.percentile(rel, 95) < 5 * tol
    np.testing.assert_allclose(t2s * r2s, 1.0, rtol=1e-5)


def test_r2star_is_clipped_and_masked() -> None:
    te = np.array([0.004, 0.009, 0.014])
    mag = np.ones((4, 4, 4, 3), np.float32)
    mag[0, 0, 0] = [1.0, 1e-6, 1e-9]  # absurd decay
    mag[1, 1, 1] = [1.0, 2.0, 3.0]  # growth → R2* < 0
    mask = np.ones((4, 4, 4), bool)
    mask[3, 3, 3] = False
    r2s, t2s = r2star_map(mag, te, r2star_max_per_s=400.0, mask=mask)
    assert r2s[0, 0, 0] == 400.0
    assert r2s[1, 1, 1] == 0.0 and t2s[1, 1, 1] == 0.0
    assert r2s[3, 3, 3] == 0.0


def test_combined_magnitude() -> None:
    te = np.array([0.004, 0.009, 0.014])
    mag = np.stack([np.full((3, 3, 3), v, np.float32) for v in (3.0, 4.0, 12.0)], axis=-1)
    np.testing.assert_allclose(combine_magnitude(mag, te), 13.0)
    te_w = combine_magnitude(mag, te, method="te_weighted")
    np.testing.assert_allclose(te_w, (0.004 * 3 + 0.009 * 4 + 0.014 * 12) / 0.027, rtol=1e-6)
