"""The simulator's physics against analytic results and its ground truth against itself."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from qsmnode.acquisition import GAMMA_BAR_HZ_PER_T
from qsmnode.sim.phantom import CHI_AIR_PPM, DepthBin, M1Area, PhantomParams, Tissue
from qsmnode.sim.scanner import ScanParams, preset, simulate, simulate_field


@dataclass(frozen=True)
class Sphere:
    """A uniform sphere (ppm) in a medium of χ = 0, as a ChiSource."""

    centre: tuple[float, float, float]
    radius: float
    chi: float = 1.0

    @property
    def extent_mm(self) -> tuple[tuple[float, float], ...]:
        return tuple((c - self.radius, c + self.radius) for c in self.centre)

    def sample(self, x, y, z):
        cx, cy, cz = self.centre
        inside = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= self.radius**2
        return (
            np.where(inside, np.float32(self.chi), np.float32(0)),
            np.zeros(x.shape, dtype=bool),
            np.ones(x.shape, dtype=bool),
        )


OBLIQUE = ScanParams(
    shape=(56, 52, 40),
    voxel_size_mm=(1.0, 1.2, 1.5),
    centre_mm=(0.0, 0.0, 0.0),
    rotation_deg=(20.0, 12.0, 5.0),
    shim_order=-1,
)


def analytic_sphere_field(scan: ScanParams, sphere: Sphere) -> tuple[np.ndarray, np.ndarray]:
    """Lorentz-corrected field (ppm) of a uniform sphere with B0 along RAS z, and the
    distance (mm) of each voxel from its centre."""
    a = scan.affine
    ijk = np.indices(scan.shape).reshape(3, -1).astype(np.float64)
    xyz = (a[:3, :3] @ ijk + a[:3, 3:4]).T - np.asarray(sphere.centre)
    r = np.linalg.norm(xyz, axis=1)
    cos2 = (xyz[:, 2] / np.maximum(r, 1e-9)) ** 2
    outside = sphere.chi / 3 * (sphere.radius / np.maximum(r, 1e-9)) ** 3 * (3 * cos2 - 1)
    field = np.where(r > sphere.radius, outside, 0.0)
    return field.reshape(scan.shape), r.reshape(scan.shape)


def test_sphere_in_view_matches_analytic_field_oblique_anisotropic() -> None:
    sphere = Sphere(centre=(2.0, -3.0, 1.0), radius=9.0)
    field, _, _ = simulate_field(sphere, OBLIQUE, supersample=3)
    expected, r = analytic_sphere_field(OBLIQUE, sphere)
    out = (r > 1.5 * sphere.radius) & (r < 25)
    err = np.abs(field - expected)[out]
    assert err.max() < 0.03 * sphere.chi, f"outside: max error {err.max():.4f} ppm"
    assert np.sqrt(np.mean(err**2)) < 0.005 * sphere.chi
    inner = r < 0.6 * sphere.radius
    # Lorentz-corrected: no field shift inside a uniform sphere.
    assert abs(field[inner].mean()) < 0.005 * sphere.chi
    assert np.abs(field[inner]).max() < 0.03 * sphere.chi


def test_sphere_outside_the_domain_reaches_the_view_through_the_coarse_grid() -> None:
    # 60 mm above the view's centre: beyond the 16 mm margin, so only the coarse grid sees it.
    sphere = Sphere(centre=(0.0, 5.0, 62.0), radius=12.0)
    field, _, _ = simulate_field(sphere, OBLIQUE)
    expected, _ = analytic_sphere_field(OBLIQUE, sphere)
    scale = np.abs(expected).max()
    assert scale > 0.01, "the sphere must produce a measurable field in view"
    err = np.abs(field - expected)
    assert err.max() < 0.08 * scale, f"max error {err.max():.5f} of {scale:.4f} ppm"
    assert np.sqrt(np.mean(err**2)) < 0.02 * scale


@pytest.fixture(scope="module")
def tiny():
    return simulate(preset("tiny", seed=3))


def test_phantom_has_every_tissue_and_air_contrast(tiny) -> None:
    t = tiny.truth
    present = set(np.unique(t.labels))
    assert present == {int(v) for v in Tissue}
    # Air is at +9.4 ppm; only its edge next to the scalp is smoothed (by one voxel).
    air = t.chi_ppm[t.labels == Tissue.AIR]
    assert np.median(air) == pytest.approx(CHI_AIR_PPM, abs=1e-4)
    assert np.mean(np.abs(air - CHI_AIR_PPM) < 0.05) > 0.6
    wm = np.median(t.chi_ppm[t.labels == Tissue.WM])
    gp = np.median(t.chi_ppm[t.labels == Tissue.GLOBUS_PALLIDUS])
    vein = np.median(t.chi_ppm[t.labels == Tissue.VEIN])
    assert wm < 0 < gp < vein
    # The brain mask holds the brain and its CSF, and no bone.
    assert not np.any(t.brain_mask & (t.labels == Tissue.BONE))
    assert np.all(t.brain_mask[t.labels == Tissue.WM])


def test_cortex_depth_bins_and_m1_areas(tiny) -> None:
    t = tiny.truth
    gm = t.labels == Tissue.GM
    assert np.all(t.depth_bins[gm] > 0) and np.all(t.depth_bins[~gm] == 0)
    assert {int(v) for v in np.unique(t.depth_bins[gm])} == {int(b) for b in DepthBin if b}
    for area in (M1Area.LEFT_HAND, M1Area.RIGHT_HAND, M1Area.LEFT_FOOT, M1Area.RIGHT_FOOT):
        assert np.count_nonzero(t.m1_areas == area) > 0, area.name
    left = t.m1_areas == M1Area.LEFT_HAND
    ijk = np.argwhere(left)
    x = (tiny.gre.affine[:3, :3] @ ijk.T + tiny.gre.affine[:3, 3:4])[0]
    assert np.all(x < 0), "the left hand area lies in the left hemisphere (RAS x < 0)"


def test_local_field_comes_only_from_inside_the_mask(tiny) -> None:
    t = tiny.truth
    assert np.all(t.local_field_ppm[~t.brain_mask] == 0)
    background = (t.total_field_ppm - t.local_field_ppm)[t.brain_mask]
    # Even after the shim, the air around the head makes a background field larger than the
    # local one.
    assert np.std(background) > 2 * np.std(t.local_field_ppm[t.brain_mask])


def test_noise_free_phase_is_the_wrapped_field_plus_offset() -> None:
    sim = simulate(preset("tiny", snr=0.0, seed=5))
    t, gre = sim.truth, sim.gre
    omega = 2 * np.pi * GAMMA_BAR_HZ_PER_T * gre.field_strength_t * 1e-6
    signal = gre.magnitude[..., 0] > 0
    for e, te in enumerate(gre.echo_times_s):
        expected = omega * te * t.total_field_ppm + t.phase_offset_rad
        diff = np.angle(np.exp(1j * (gre.phase[..., e] - expected)))[signal]
        assert np.abs(diff).max() < 1e-3
    assert gre.phase.min() >= -np.pi and gre.phase.max() < np.pi
    offset_span = np.ptp(t.phase_offset_rad[t.brain_mask])
    assert offset_span > 3.0, "φ0 spans several radians"


def test_echo1_snr_and_reproducibility() -> None:
    base = preset("tiny", seed=11)
    a, b = simulate(base), simulate(base)
    assert np.array_equal(a.gre.phase, b.gre.phase)
    clean = simulate(preset("tiny", seed=11, snr=0.0))
    brain = a.truth.labels >= Tissue.GM
    noisy = a.gre.magnitude[..., 0][brain]
    noise = (a.gre.magnitude[..., 0] - clean.gre.magnitude[..., 0])[brain]
    # At high SNR the magnitude's noise is the real channel's: σ.
    snr = clean.gre.magnitude[..., 0][brain].mean() / noise.std()
    assert 85 < snr < 115, f"echo-1 SNR {snr:.1f}"
    assert noisy.mean() > 0
    other = simulate(preset("tiny", seed=12))
    assert not np.array_equal(a.gre.phase, other.gre.phase)


def test_magnitude_decays_with_tissue_t2star(tiny) -> None:
    mag, t = tiny.gre.magnitude, tiny.truth
    te = np.asarray(tiny.gre.echo_times_s)
    wm = t.labels == Tissue.WM
    r2 = -np.polyfit(te, np.log([mag[..., e][wm].mean() for e in range(te.size)]), 1)[0]
    assert abs(r2 - np.median(t.r2star_per_s[wm])) < 4.0


def test_als_change_goes_to_the_deep_third_of_the_chosen_area_only() -> None:
    scan = preset("tiny", snr=0.0)
    base = simulate(scan)
    als = simulate(scan, PhantomParams(als_delta_chi_ppm={"left_hand": 0.03}))
    diff = als.truth.chi_ppm - base.truth.chi_ppm
    target = (base.truth.m1_areas == M1Area.LEFT_HAND) & (base.truth.depth_bins == DepthBin.DEEP)
    assert target.any()
    assert np.allclose(diff[target], 0.03, atol=1e-5)
    assert np.allclose(diff[~target], 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown M1 areas"):
        PhantomParams(als_delta_chi_ppm={"left_knee": 0.1})


def test_slab_is_oblique_with_anisotropic_voxels() -> None:
    scan = preset("slab")
    from qsmnode.acquisition import b0_direction, voxel_size_mm

    assert np.allclose(voxel_size_mm(scan.affine), (0.4, 0.4, 0.8))
    b = b0_direction(scan.affine)
    assert abs(b[2]) < 0.99, "B0 is not along the slice axis on an oblique slab"
    assert scan.shape == (320, 320, 80) and len(scan.echo_times_s) == 4
    assert scan.field_strength_t == 7.0


def test_shim_removes_low_order_field_and_keeps_the_local_field() -> None:
    raw = simulate(preset("tiny", snr=0.0, shim_order=-1))
    shimmed = simulate(preset("tiny", snr=0.0, shim_order=2))
    m = raw.truth.brain_mask
    assert np.array_equal(raw.truth.local_field_ppm, shimmed.truth.local_field_ppm)
    before, after = raw.truth.total_field_ppm[m], shimmed.truth.total_field_ppm[m]
    assert abs(after.mean()) < 1e-4
    assert after.std() < 0.7 * before.std()
    # What the shim took away is smooth: a 2nd-order polynomial has no voxel-scale detail.
    removed = raw.truth.total_field_ppm - shimmed.truth.total_field_ppm
    assert np.abs(np.diff(removed, n=3, axis=0)).max() < 1e-4


def test_the_simulator_never_imports_the_code_it_grades() -> None:
    """The simulator's truth must not come from the code it grades: no module of
    ``qsmnode.sim`` imports ``qsmnode.qsm`` (the reconstruction) or ``qsmnode.m1`` (the M1
    analysis: atlas split, layers), directly or by a relative import."""
    import ast
    from pathlib import Path

    import qsmnode.sim

    graded = ("qsmnode.qsm", "qsmnode.m1")
    root = Path(qsmnode.sim.__file__).parent
    paths = sorted(root.rglob("*.py"))
    assert len(paths) >= 8, paths  # the walk does see the simulator's modules
    offenders = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                if node.level:  # from . import x (qsmnode.sim), from ..m1 import layers
                    base = ".".join(["qsmnode", "sim"][: max(0, 3 - node.level)])
                    module = f"{base}.{node.module}" if node.module else base
                    names = [module, *(f"{module}.{a.name}" for a in node.names)]
                elif node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names
                          if any(n == g or n.startswith(g + ".") for g in graded)]
    assert not offenders, offenders


def _voxelised_sphere(n: int, radius: float, sub: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Volume fraction of a sphere (radius in voxels, 1 mm voxels) and the radius grid."""
    x = np.arange(n) - n / 2 + 0.5
    grid = np.meshgrid(x, x, x, indexing="ij")
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    frac = np.zeros((n, n, n))
    for a in offsets:
        for b in offsets:
            for c in offsets:
                frac += (grid[0] + a) ** 2 + (grid[1] + b) ** 2 + (grid[2] + c) ** 2 <= radius**2
    return frac / sub**3, grid


def test_the_simulators_kernel_is_its_own_and_closer_to_the_analytic_sphere() -> None:
    """Box voxels with a voxel-averaged field: not the reconstruction's band-limited kernel,
    and nearer the analytic exterior field of a sphere than that kernel is."""
    from qsmnode.qsm.dipole import dipole_kernel, forward_field
    from qsmnode.sim.field import voxel_field, voxel_kernel

    n, radius, b0 = 64, 8.0, np.array([0.0, 0.0, 1.0])
    own = voxel_kernel((n, n, n), (1.0, 1.0, 1.0), b0)
    method = dipole_kernel((n, n, n), (1.0, 1.0, 1.0), b0)
    assert np.sqrt(np.mean((own - method) ** 2)) > 0.01, "the simulator reuses the method's kernel"
    frac, (x, y, z) = _voxelised_sphere(n, radius)
    r = np.sqrt(x * x + y * y + z * z)
    analytic = (radius**3 / 3) * (3 * z * z / np.maximum(r, 1e-9) ** 2 - 1) / np.maximum(r, 1) ** 3
    shell = (r > radius + 2) & (r < radius + 10)

    def rms_error(field: np.ndarray) -> float:
        return float(np.sqrt(np.mean((field - analytic)[shell] ** 2)))

    err_own = rms_error(voxel_field(frac, (1, 1, 1), b0, pad_factor=2))
    err_method = rms_error(forward_field(frac, (1, 1, 1), b0, pad_factor=2))
    assert err_own < 0.01 * np.sqrt(np.mean(analytic[shell] ** 2))
    assert err_own < err_method, f"own {err_own:.2e} ppm, method's kernel {err_method:.2e} ppm"
