"""Phase unwrapping: exact (2π-congruent) spatial and temporal unwrapping."""

from __future__ import annotations

import numpy as np
import pytest

from qsmnode.qsm.synthetic import centred_coordinates, ellipsoid
from qsmnode.qsm.unwrap import (
    BestPath,
    Laplacian,
    SpatialUnwrap,
    laplacian_unwrap,
    unwrap_spatial,
    unwrap_temporal,
    wrap,
)

SHAPE = (48, 48, 48)
VOX = (1.0, 1.0, 1.0)


def _bump() -> np.ndarray:
    """A smooth 3-D Gaussian bump peaking at 25 rad on a tilted ramp (many wraps)."""
    x, y, z = centred_coordinates(SHAPE, VOX)
    bump = 25.0 * np.exp(-(x**2 + y**2 + z**2) / (2 * 9.0**2))
    return (bump + 0.25 * x - 0.15 * z + 1.0).astype(np.float32)


def _congruent(unwrapped: np.ndarray, wrapped: np.ndarray) -> bool:
    k = (unwrapped.astype(np.float64) - wrapped) / (2 * np.pi)
    return bool(np.all(np.abs(k - np.rint(k)) < 1e-4))


@pytest.mark.parametrize("method", [BestPath(), Laplacian()], ids=lambda m: m.method)
def test_spatial_unwrap_is_congruent_and_exact(method: SpatialUnwrap) -> None:
    truth = _bump()
    wrapped = wrap(truth)
    mask = ellipsoid(SHAPE, VOX, (22, 20, 21))
    out = unwrap_spatial(wrapped, mask, method=method)
    assert out.dtype == np.float32
    assert _congruent(out, wrapped)
    k = np.rint((out - truth) / (2 * np.pi))[mask]
    assert np.unique(k).size == 1, f"{method}: not one global 2π multiple: {np.unique(k)}"


def test_bestpath_whole_grid_without_mask() -> None:
    truth = _bump()
    wrapped = wrap(truth)
    out = unwrap_spatial(wrapped)
    k = np.rint((out - truth) / (2 * np.pi))
    assert _congruent(out, wrapped)
    assert np.unique(k).size == 1


@pytest.mark.parametrize("formula", ["sincos", "wrapped"])
def test_laplacian_estimate_is_close_for_gentle_phase(formula: str) -> None:
    x, y, z = centred_coordinates(SHAPE, VOX)
    truth = (8.0 * np.exp(-(x**2 + y**2 + z**2) / (2 * 10.0**2))).astype(np.float32)
    est = laplacian_unwrap(wrap(truth), VOX, formula=formula)  # type: ignore[arg-type]
    err = (est - truth) - np.mean(est - truth)
    assert np.sqrt(np.mean(err**2)) < 0.1


def test_sincos_laplacian_underestimates_steep_phase() -> None:
    """The DOMAIN lesson: sin/cos Laplacian unwrapping flattens steep gradients."""
    truth = _bump()
    sincos = laplacian_unwrap(wrap(truth), VOX, formula="sincos")
    exact = laplacian_unwrap(wrap(truth), VOX, formula="wrapped")

    def peak(a: np.ndarray) -> float:  # bump height above the median
        return float(a[24, 24, 24] - np.median(a))

    assert peak(sincos) < 0.85 * peak(truth)
    assert abs(peak(exact) - peak(truth)) < 0.01 * peak(truth)


def test_temporal_unwrap_follows_template_and_is_congruent() -> None:
    rng = np.random.default_rng(1)
    te = np.array([0.004, 0.009, 0.014, 0.019])  # unequal first echo and spacing
    x, y, z = centred_coordinates(SHAPE, VOX)
    omega = (2 * np.pi * 120.0 * np.exp(-(x**2 + y**2) / 300.0) + 30.0 * z / 24).astype(np.float32)
    truth = omega[..., None] * te.astype(np.float32)
    wrapped = wrap(truth + rng.normal(0, 0.05, truth.shape).astype(np.float32))
    template = omega * np.float32(1.0) + rng.normal(0, 20.0, omega.shape).astype(np.float32)
    mag = np.ones(truth.shape, np.float32)
    out = unwrap_temporal(wrapped, te, template, mag)
    assert _congruent(out, wrapped)
    k = np.rint((out - truth) / (2 * np.pi))
    assert np.count_nonzero(k) == 0
