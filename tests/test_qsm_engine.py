"""End-to-end QSM engine on a small synthetic 7T head (oblique B0, offsets, bias, noise)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmnode.qsm import background as bg
from qsmnode.qsm import inversion as inv
from qsmnode.qsm.engine import METHODS, QSMParams, QSMResult, run_qsm
from qsmnode.qsm.synthetic import centred_coordinates, ellipsoid, multi_echo_signal
from qsmnode.qsm.unwrap import BestPath, Laplacian, SpatialUnwrap
from qsmnode.sim.field import voxel_field

SHAPE = (56, 64, 52)
VOX = (1.0, 1.0, 1.0)
TE = np.array([0.005, 0.010, 0.015, 0.020])
B0_T = 7.0
B0 = np.array([0.0, np.sin(np.deg2rad(18)), np.cos(np.deg2rad(18))])


@pytest.fixture(scope="module")
def head() -> dict[str, np.ndarray]:
    x, y, z = centred_coordinates(SHAPE, VOX)
    head = ellipsoid(SHAPE, VOX, (25, 29, 23))
    brain = ellipsoid(SHAPE, VOX, (20, 24, 18))
    wm = ellipsoid(SHAPE, VOX, (16, 20, 14))
    chi = np.zeros(SHAPE, np.float32)
    chi[brain] = 0.02
    chi[wm] = -0.03
    nuclei = ellipsoid(SHAPE, VOX, (3, 5, 4), (-7, 3, 0)) | ellipsoid(
        SHAPE, VOX, (3, 5, 4), (7, 3, 0)
    )
    chi[nuclei] = 0.15
    vein = ellipsoid(SHAPE, VOX, (1.2, 12, 1.2), (0, -4, 10))
    chi[vein] = 0.4
    chi_brain = chi * brain
    outside = np.where(head, 0.0, 9.4).astype(np.float32)  # air around the head
    outside[head & ~ellipsoid(SHAPE, VOX, (23, 27, 21))] = -1.5  # skull
    outside = ndimage.gaussian_filter(outside, 1.0) * ~brain
    # the field from the simulator's kernel (box voxels), not the reconstruction's own
    total = voxel_field(chi_brain + outside, VOX, B0, pad_factor=2.0)
    m0 = np.where(brain, np.where(wm, 0.7, 0.9), 0.0).astype(np.float32)
    m0[head & ~ellipsoid(SHAPE, VOX, (23, 27, 21))] = 0.6  # scalp (bone is dark)
    m0[ellipsoid(SHAPE, VOX, (23, 27, 21)) & ~ellipsoid(SHAPE, VOX, (21.5, 25.5, 19.5))] = 0.02
    r2s = np.where(nuclei | vein, 80.0, 35.0).astype(np.float32)
    bias = np.exp(0.7 * x / 25 - 0.4 * z / 23).astype(np.float32)
    phi0 = (1.2 * np.sin(x / 20.0) + 0.03 * y + 2.0).astype(np.float32)
    mag, phase = multi_echo_signal(m0 * bias, r2s, total, TE, B0_T, phase_offset=phi0, noise=0.01)
    return {"mag": mag, "phase": phase, "chi": chi_brain, "total": total, "brain": brain}


@pytest.fixture(scope="module")
def result(head: dict[str, np.ndarray]) -> QSMResult:
    return run_qsm(head["mag"], head["phase"], TE, VOX, B0, B0_T)


def _nrmse(est: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    a = est[mask] - est[mask].mean()
    b = truth[mask] - truth[mask].mean()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_outputs_are_well_formed(result: QSMResult) -> None:
    for name in (
        "chi_ppm",
        "r2star_per_s",
        "t2star_s",
        "magnitude",
        "total_field_ppm",
        "local_field_ppm",
        "fit_residual_rad",
    ):
        arr = getattr(result, name)
        assert arr.shape == SHAPE and arr.dtype == np.float32, name
        assert np.isfinite(arr).all(), name
    assert result.mask.dtype == bool and result.qsm_mask.dtype == bool
    assert not (result.qsm_mask & ~result.mask).any()
    assert np.all(result.chi_ppm[~result.qsm_mask] == 0)
    q = result.quality
    for key in ("mask_fraction", "fit_residual_rad_median", "timings_s", "background", "inversion"):
        assert key in q
    assert q["inversion"]["n_fft"] > 0 and "fft_shape" in q["inversion"]
    assert q["timings_s"]["total"] > 0


def test_mask_field_and_chi_match_truth(head: dict[str, np.ndarray], result: QSMResult) -> None:
    brain = head["brain"]
    dice = 2 * (result.mask & brain).sum() / (result.mask.sum() + brain.sum())
    assert dice > 0.93
    both = result.mask & brain & (result.fit_residual_rad < 0.5)
    assert _nrmse(result.total_field_ppm, head["total"], both) < 0.02
    region = result.qsm_mask & brain
    nrmse = _nrmse(result.chi_ppm, head["chi"], region)
    print(f"pipeline chi NRMSE {nrmse:.3f}")
    # measured 0.48 with the default TFI (0.38 over single-step TV's smaller mask), 0.25 with
    # single-step TV (0.08 when this head's field came from the reconstruction's own kernel:
    # an inverse crime), PDF + TV-ADMM 0.69 (test below): this head's white matter is one
    # uniform ellipsoid inside a uniform shell, a smooth field the two-step methods partly
    # take for background and single-step TV's Laplacian sees only at the edges. On the
    # independent MNI heads the order is the other way round (benchmarks/RESULTS.md).
    assert nrmse < 0.55
    sstv = run_qsm(head["mag"], head["phase"], TE, VOX, B0, B0_T, METHODS["single-step-tv"])
    assert _nrmse(sstv.chi_ppm, head["chi"], sstv.qsm_mask & brain) < 0.32
    # paramagnetic nuclei come out positive, well above white matter
    nuclei = ellipsoid(SHAPE, VOX, (2, 4, 3), (-7, 3, 0)) & region
    wm = ellipsoid(SHAPE, VOX, (12, 16, 10)) & ~ellipsoid(SHAPE, VOX, (10, 9, 9)) & region
    assert result.chi_ppm[nuclei].mean() - result.chi_ppm[wm].mean() > 0.1


@pytest.mark.parametrize(
    ("inversion", "background", "unwrap", "bound"),
    [(inv.TKD(), bg.VSharp(), Laplacian(), 1.0), (inv.TVADMM(), bg.ResharpLBV(), BestPath(), 0.6),
     (inv.TVADMM(), bg.PDF(), BestPath(), 0.8)],
)
def test_two_step_pipelines_run(
    head: dict[str, np.ndarray], inversion: inv.LocalFieldInversion,
    background: bg.BackgroundMethod, unwrap: SpatialUnwrap, bound: float
) -> None:
    params = QSMParams(inversion_method=inversion, background_method=background,
                       unwrap_method=unwrap)
    res = run_qsm(head["mag"], head["phase"], TE, VOX, B0, B0_T, params)
    region = res.qsm_mask & head["brain"]
    assert _nrmse(res.chi_ppm, head["chi"], region) < bound
    record = res.quality["params"]
    assert record["inversion_method"] == inversion.method
    assert record["background_method"] == background.method
    assert record["unwrap_method"] == unwrap.method
    assert res.quality["background"]["n_fft"] >= 0


@pytest.mark.parametrize("echoes", [1, 2])
def test_few_echoes(head: dict[str, np.ndarray], echoes: int) -> None:
    """Two echoes use the log-linear R2*; one echo skips offsets and R2* (field includes φ0)."""
    res = run_qsm(
        head["mag"][..., :echoes], head["phase"][..., :echoes], TE[:echoes], VOX, B0, B0_T
    )
    assert np.isfinite(res.chi_ppm).all()
    assert res.qsm_mask.sum() > 0.5 * head["brain"].sum()
    if echoes == 2:
        region = res.qsm_mask & head["brain"]
        assert _nrmse(res.chi_ppm, head["chi"], region) < 0.8
    else:
        assert np.all(res.r2star_per_s == 0)
