"""A synthetic multi-echo 3D GRE scanner: field, relaxation, phase offset, bias and noise.

The field perturbation is the dipole convolution of χ with B0 along the scanner's z axis, with
the simulator's own kernel (``sim.field.voxel_field``: box-shaped voxels, voxel-averaged field;
not the reconstruction's band-limited kernel, so the method is not graded on its own model),
computed in two scales, exactly by linearity:

- sources inside the *domain* (the field of view grown by a margin) on the acquisition grid
  itself, zero-padded;
- sources outside it (the rest of the head and neck) on a coarse grid of the same orientation
  whose cells tile the domain exactly, their field then interpolated (cubic) into the field of
  view. Those sources are at least the margin away, so their field there is smooth.

χ is taken relative to air inside the head (χ − 9.4 ppm) and 0 outside it, which gives the same
field as air at +9.4 ppm around the head, with no truncation at the grid's edge. χ outside the
brain mask is smoothed by σ = 1 voxel, which removes the non-physical Nyquist ripple a sharp
9.4 ppm edge causes on a discrete grid (DOMAIN.md).

Signal (per echo e): ``S = PD · bias · exp(−TE·R2*) · exp(i(2π γ̄ B0 TE · field + φ0)) + noise``
with complex Gaussian noise whose σ gives the requested echo-1 SNR in brain.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import radians
from types import MappingProxyType
from typing import Final, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from qsmnode.acquisition import GAMMA_BAR_HZ_PER_T, MultiEchoGRE, b0_direction, voxel_size_mm
from qsmnode.sim.field import voxel_field
from qsmnode.sim.phantom import (
    CHI_AIR_PPM,
    PhantomParams,
    Tissue,
    depth_bins,
    sample_tissue,
    tissue_maps,
)

F32 = NDArray[np.float32]


def rotation_matrix(angles_deg: tuple[float, float, float]) -> NDArray[np.float64]:
    """Rotation about the RAS x, then y, then z axes (degrees): the slab's obliquity."""
    ax, ay, az = (radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class ScanParams:
    """What the simulated scanner acquires.

    The voxel axes i, j, k start along the patient's left, posterior and superior (as a
    scanner stores an axial slab) and are rotated by ``rotation_deg``; the field of view is
    centred on ``centre_mm``.
    """

    shape: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float] = (0.0, -18.0, 12.0)
    rotation_deg: tuple[float, float, float] = (18.0, 0.0, 0.0)
    echo_times_s: tuple[float, ...] = (0.005, 0.0105, 0.016, 0.0215)
    field_strength_t: float = 7.0
    snr: float = 100.0
    """Echo-1 magnitude SNR in brain (mean signal over noise σ); 0 for no noise."""
    phase_offset_rad: float = 3.0
    """Amplitude of the smooth coil-combination phase offset φ0."""
    bias_strength: float = 0.6
    """Strength of the smooth receive-field inhomogeneity (0 = flat)."""
    shim_order: int = 2
    """The scanner's shim: spherical harmonics up to this order are fitted over the brain in
    the field of view and removed (−1: no shim). Shim fields are harmonic, so the local
    field is unchanged."""
    margin_mm: float = 16.0
    coarse_mm: float = 2.0
    seed: int = 0

    @property
    def affine(self) -> NDArray[np.float64]:
        """Voxel-to-RAS affine of the acquisition grid."""
        rot = rotation_matrix(self.rotation_deg)
        a = np.eye(4)
        a[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) * np.asarray(self.voxel_size_mm)
        centre_index = (np.asarray(self.shape) - 1) / 2.0
        a[:3, 3] = np.asarray(self.centre_mm) - a[:3, :3] @ centre_index
        return a


PRESETS: Final = MappingProxyType(
    {
        # Unit tests: the whole head at 3-4 mm, runs in about a second.
        "tiny": ScanParams(shape=(56, 68, 40), voxel_size_mm=(3.0, 3.0, 3.6),
                           rotation_deg=(15.0, 0.0, 0.0), centre_mm=(0.0, -18.0, 20.0)),
        # The realistic 7T M1 slab: 0.4 × 0.4 × 0.8 mm over the vertex, oblique.
        "slab": ScanParams(shape=(320, 320, 80), voxel_size_mm=(0.4, 0.4, 0.8),
                           rotation_deg=(18.0, 0.0, 0.0), centre_mm=(0.0, -20.0, 55.0)),
        # A smaller slab at 0.8 × 0.8 × 1.2 mm for end-to-end tests.
        "small-slab": ScanParams(shape=(160, 160, 48), voxel_size_mm=(0.8, 0.8, 1.2),
                                 rotation_deg=(18.0, 0.0, 0.0), centre_mm=(0.0, -20.0, 52.0)),
        # Whole brain at 1 mm isotropic.
        "brain": ScanParams(shape=(160, 200, 160), voxel_size_mm=(1.0, 1.0, 1.0),
                            rotation_deg=(12.0, 0.0, 0.0), centre_mm=(0.0, -18.0, 14.0)),
    }
)


@dataclass
class Truth:
    """Ground truth on the acquisition grid."""

    chi_ppm: F32
    total_field_ppm: F32
    local_field_ppm: F32
    """Field of the χ inside the brain mask, within the mask (0 outside)."""
    brain_mask: NDArray[np.bool_]
    labels: NDArray[np.uint8]
    cortical_depth: F32
    depth_bins: NDArray[np.uint8]
    thickness_mm: F32
    m1_areas: NDArray[np.uint8]
    r2star_per_s: F32
    phase_offset_rad: F32


@dataclass
class Simulation:
    gre: MultiEchoGRE
    truth: Truth
    scan: ScanParams
    phantom: PhantomParams = field(default_factory=PhantomParams)


@dataclass(frozen=True)
class _Lattice:
    """A grid given by an affine in the acquisition's fine index space."""

    shape: tuple[int, int, int]
    index_affine: NDArray[np.float64]
    """Maps this grid's indices to fine index coordinates."""

    def points(self, world: NDArray[np.float64], k0: int, k1: int) -> tuple[F32, F32, F32]:
        """RAS coordinates (mm) of the voxel centres of slices k0..k1-1."""
        a = world @ self.index_affine
        i = np.arange(self.shape[0], dtype=np.float64)[:, None, None]
        j = np.arange(self.shape[1], dtype=np.float64)[None, :, None]
        k = np.arange(k0, k1, dtype=np.float64)[None, None, :]
        return tuple(
            (a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3]).astype(np.float32)
            for r in range(3)
        )


def _solid_harmonics(x: NDArray, y: NDArray, z: NDArray, order: int) -> list[NDArray]:
    """The real solid spherical harmonics up to ``order`` (≤ 2) at centred points."""
    terms = [np.ones_like(x)]
    if order >= 1:
        terms += [x, y, z]
    if order >= 2:
        terms += [x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y]
    return terms


def shim(
    field_ppm: F32, mask: NDArray[np.bool_], points: tuple[F32, F32, F32], order: int
) -> F32:
    """Remove the least-squares fit over ``mask`` of the solid spherical harmonics up to
    ``order`` (≤ 2), as a scanner's B0 shim does."""
    if order < 0:
        return field_ppm
    centre = [float(p[mask].mean()) for p in points]
    centred = [(p - np.float32(c)) for p, c in zip(points, centre, strict=True)]
    basis = np.stack([t[mask] for t in _solid_harmonics(*centred, order)], axis=1)
    coef, *_ = np.linalg.lstsq(basis.astype(np.float64), field_ppm[mask], rcond=None)
    fit = sum(np.float32(a) * t for a, t in zip(coef, _solid_harmonics(*centred, order),
                                                  strict=True))
    return (field_ppm - fit).astype(np.float32)


class ChiSource(Protocol):
    """Susceptibility defined in RAS millimetres, for the field engine."""

    @property
    def extent_mm(self) -> tuple[tuple[float, float], ...]:
        """Bounding box (min, max) per RAS axis outside which χ equals the surrounding's."""
        ...

    def sample(
        self, x: F32, y: F32, z: F32
    ) -> tuple[F32, NDArray[np.bool_], NDArray[np.bool_]]:
        """χ relative to the surrounding medium (ppm), the brain mask, and where χ must stay
        sharp (brain tissue); elsewhere it is smoothed by one voxel."""
        ...


@dataclass(frozen=True)
class HeadSource:
    """The head phantom in air, as a ChiSource."""

    phantom: PhantomParams

    @property
    def extent_mm(self) -> tuple[tuple[float, float], ...]:
        return self.phantom.head_extent_mm

    def sample(
        self, x: F32, y: F32, z: F32
    ) -> tuple[F32, NDArray[np.bool_], NDArray[np.bool_]]:
        t = sample_tissue(self.phantom, x, y, z)
        chi, _, _ = tissue_maps(self.phantom, t)
        chi_rel_air = np.where(t.label == Tissue.AIR, 0.0, chi - CHI_AIR_PPM).astype(np.float32)
        return chi_rel_air, t.in_brain_mask, t.label >= Tissue.GM


def grid_points(scan: ScanParams) -> tuple[F32, F32, F32]:
    """RAS coordinates (mm) of every voxel centre of the acquisition grid."""
    return _Lattice(scan.shape, np.eye(4)).points(scan.affine, 0, scan.shape[2])


def _sample_source(
    source: ChiSource,
    world: NDArray[np.float64],
    lattice: _Lattice,
    supersample: int = 1,
    chunk: int = 8,
) -> tuple[F32, NDArray[np.bool_], NDArray[np.bool_]]:
    """A source's χ, brain mask and sharp-χ mask on a lattice, each sub-sampled
    ``supersample``³ times per voxel (χ averaged, masks by majority)."""
    chi = np.zeros(lattice.shape, dtype=np.float32)
    inside = np.zeros(lattice.shape, dtype=np.uint8)
    sharp = np.zeros(lattice.shape, dtype=np.uint8)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    for k0 in range(0, lattice.shape[2], chunk):
        k1 = min(k0 + chunk, lattice.shape[2])
        for oi in offsets:
            for oj in offsets:
                for ok in offsets:
                    shift = np.eye(4)
                    shift[:3, 3] = (oi, oj, ok)
                    sub = _Lattice(lattice.shape, lattice.index_affine @ shift)
                    c, m, t = source.sample(*sub.points(world, k0, k1))
                    chi[:, :, k0:k1] += c
                    inside[:, :, k0:k1] += m
                    sharp[:, :, k0:k1] += t
    n = supersample**3
    chi /= np.float32(n)
    return chi, 2 * inside.astype(np.int32) > n, 2 * sharp.astype(np.int32) > n


def _smooth_outside_tissue(chi: F32, tissue: NDArray[np.bool_], sigma_vox: float = 1.0) -> F32:
    """Smooth χ by σ voxels everywhere but in brain tissue, which the CSF layer shields.

    A normalised convolution over the non-tissue voxels: tissue χ neither changes nor leaks
    into its neighbours."""
    outside = np.where(tissue, np.float32(0), chi)
    weight = ndimage.gaussian_filter((~tissue).astype(np.float32), sigma_vox)
    smooth = ndimage.gaussian_filter(outside, sigma_vox) / np.maximum(weight, np.float32(1e-3))
    return np.where(tissue, chi, smooth).astype(np.float32)


def _taper(coords: NDArray[np.float64], lo: float, hi: float, ramp: float) -> NDArray[np.float64]:
    """1 inside [lo + ramp, hi − ramp], a raised cosine down to 0 at lo and hi, 0 beyond."""
    t = np.clip(np.minimum(coords - lo, hi - coords) / ramp, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def simulate_field(
    source: ChiSource, scan: ScanParams, supersample: int = 1
) -> tuple[F32, F32, NDArray[np.bool_]]:
    """Total field (ppm) on the acquisition grid, with the grid's χ (ppm, relative to the
    surrounding medium) and brain mask.

    The sources are split by a smooth partition of unity w + (1 − w) = 1: w·χ on the fine
    domain and (1 − w)·χ on the coarse grid, w falling from 1 at half the margin to 0 at the
    domain's edge, so neither part has a sharp cut that would ring.
    """
    world = scan.affine
    vs = voxel_size_mm(world)
    b = b0_direction(world)
    n = np.asarray(scan.shape)
    f = np.maximum(1, np.round(scan.coarse_mm / vs)).astype(int)
    margin = np.ceil(scan.margin_mm / vs).astype(int)
    margin += (-(n + 2 * margin)) % f  # the domain is a whole number of coarse cells
    lo, hi, ramp = -margin - 0.5, n - 1 + margin + 0.5, margin / 2.0

    def weight(axes: list[NDArray[np.float64]]) -> NDArray[np.float32]:
        w = [_taper(c, lo[a], hi[a], ramp[a]) for a, c in enumerate(axes)]
        return (w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :]).astype(
            np.float32
        )

    dom_shape = tuple(int(v) for v in n + 2 * margin)
    dom_affine = np.eye(4)
    dom_affine[:3, 3] = -margin
    domain = _Lattice(dom_shape, dom_affine)
    chi_dom, mask_dom, tissue_dom = _sample_source(source, world, domain, supersample)
    chi_dom = _smooth_outside_tissue(chi_dom, tissue_dom)
    del tissue_dom
    sl = tuple(slice(int(m), int(m + s)) for m, s in zip(margin, n, strict=True))
    chi_fov = chi_dom[sl].copy()
    mask_fov = mask_dom[sl].copy()
    del mask_dom
    chi_dom *= weight([np.arange(d) - m for d, m in zip(dom_shape, margin, strict=True)])
    total = voxel_field(chi_dom, vs, b)[sl].copy()
    del chi_dom

    # Coarse grid over the whole head, its cells aligned with the domain's.
    corners = np.array(
        [[x, y, z, 1.0] for x in source.extent_mm[0]
         for y in source.extent_mm[1] for z in source.extent_mm[2]]
    )
    idx = (np.linalg.inv(world) @ corners.T)[:3]
    lo_cells = np.floor((idx.min(axis=1) + margin + 0.5) / f).astype(int) - 2
    hi_cells = np.ceil((idx.max(axis=1) + margin + 0.5) / f).astype(int) + 2
    lo_cells = np.minimum(lo_cells, 0)
    hi_cells = np.maximum(hi_cells, (n + 2 * margin) // f)
    c_shape = tuple(int(v) for v in hi_cells - lo_cells)
    c_affine = np.eye(4)
    c_affine[:3, :3] = np.diag(f)
    c_affine[:3, 3] = -margin + lo_cells * f + (f - 1) / 2.0
    coarse = _Lattice(c_shape, c_affine)
    chi_c, _, tissue_c = _sample_source(source, world, coarse, supersample=2)
    chi_c = _smooth_outside_tissue(chi_c, tissue_c)
    centres = [c_affine[a, a] * np.arange(c_shape[a]) + c_affine[a, 3] for a in range(3)]
    chi_c *= 1 - weight(centres)
    field_c = voxel_field(chi_c, vs * f, b)
    # Fine voxel centres in coarse index coordinates.
    coords = [
        ((np.arange(n[a]) - c_affine[a, 3]) / f[a]).astype(np.float32) for a in range(3)
    ]
    grid = np.meshgrid(*coords, indexing="ij")
    total += ndimage.map_coordinates(field_c, grid, order=3, mode="nearest").astype(np.float32)
    return total, chi_fov, mask_fov


def _smooth_random_field(
    points: tuple[F32, F32, F32], rng: np.random.Generator, amplitude: float, wavelength_mm: float
) -> F32:
    """A sum of three random plane-wave cosines: a smooth spatial function of given amplitude."""
    out = np.zeros(points[0].shape, dtype=np.float32)
    for _ in range(3):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        lam = wavelength_mm * rng.uniform(0.7, 1.4)
        phase = rng.uniform(0, 2 * np.pi)
        arg = (points[0] * d[0] + points[1] * d[1] + points[2] * d[2]) * np.float32(2 * np.pi / lam)
        out += np.float32(amplitude / np.sqrt(3)) * np.cos(arg + np.float32(phase))
    return out


def _receive_bias(points: tuple[F32, F32, F32], centre: tuple[float, ...], strength: float) -> F32:
    """Smooth 7T receive-field inhomogeneity: central brightening and a left-right tilt."""
    x, y, z = (p - np.float32(c) for p, c in zip(points, centre, strict=True))
    r2 = x * x + y * y + z * z
    central = np.exp(-r2 / np.float32(2 * 55.0**2))
    tilt = 1 + np.float32(0.3 * strength) * (x / np.float32(80.0)) + np.float32(
        0.2 * strength) * (y / np.float32(100.0))
    return ((1 - strength / 2) + strength * central) * tilt


def local_field(chi_ppm: F32, brain_mask: NDArray[np.bool_], affine: NDArray[np.float64]) -> F32:
    """The field (ppm) of the χ inside the brain mask, within the mask (0 outside)."""
    source = np.where(brain_mask, chi_ppm, 0).astype(np.float32)
    field_ppm = voxel_field(source, voxel_size_mm(affine), b0_direction(affine))
    return np.where(brain_mask, field_ppm, 0).astype(np.float32)


def acquire(
    scan: ScanParams,
    total_field_ppm: F32,
    r2star_per_s: F32,
    proton_density: F32,
    brain_mask: NDArray[np.bool_],
    brain_tissue: NDArray[np.bool_],
    bias_centre_mm: tuple[float, float, float],
) -> tuple[MultiEchoGRE, F32, F32]:
    """The scanner: shim, then per echo T2* decay, phase evolution, a smooth offset φ0,
    receive bias and complex noise (σ from the echo-1 SNR in ``brain_tissue``).

    Returns the acquisition, the shimmed total field and φ0 (rad).
    """
    rng = np.random.default_rng(scan.seed)
    world = scan.affine
    points = grid_points(scan)
    total_field_ppm = shim(total_field_ppm, brain_mask, points, scan.shim_order)
    phase0 = _smooth_random_field(points, rng, scan.phase_offset_rad, wavelength_mm=220.0)
    m0 = (proton_density * _receive_bias(points, bias_centre_mm, scan.bias_strength)).astype(
        np.float32
    )
    del points

    te = np.asarray(scan.echo_times_s, dtype=np.float32)
    omega = np.float32(2 * np.pi * GAMMA_BAR_HZ_PER_T * scan.field_strength_t * 1e-6)
    sigma = 0.0
    if scan.snr > 0:
        s1 = m0[brain_tissue] * np.exp(-te[0] * r2star_per_s[brain_tissue])
        sigma = float(s1.mean()) / scan.snr
    mag = np.empty((*scan.shape, te.size), dtype=np.float32)
    phase = np.empty_like(mag)
    for e, te_e in enumerate(te):
        s = (m0 * np.exp(-te_e * r2star_per_s)).astype(np.complex64)
        s *= np.exp(1j * (omega * te_e * total_field_ppm + phase0)).astype(np.complex64)
        if sigma > 0:
            s += (rng.normal(0, sigma, scan.shape) + 1j * rng.normal(0, sigma, scan.shape)).astype(
                np.complex64
            )
        mag[..., e] = np.abs(s)
        # np.angle is in [-π, π]; fold +π onto -π so the range is [-π, π).
        ph = np.angle(s).astype(np.float32)
        ph[ph >= np.pi] -= np.float32(2 * np.pi)
        phase[..., e] = ph
    gre = MultiEchoGRE(
        magnitude=mag,
        phase=phase,
        echo_times_s=tuple(float(v) for v in scan.echo_times_s),
        affine=world,
        field_strength_t=scan.field_strength_t,
    )
    return gre, total_field_ppm, phase0


def simulate(scan: ScanParams, phantom: PhantomParams | None = None) -> Simulation:
    """Simulate a multi-echo GRE acquisition of the head phantom, with its ground truth."""
    phantom = phantom or PhantomParams()
    total_field, chi, brain_mask = simulate_field(HeadSource(phantom), scan)
    chi += np.float32(CHI_AIR_PPM)
    points = grid_points(scan)
    t = sample_tissue(phantom, *points)
    del points
    _, r2star, pd = tissue_maps(phantom, t)
    gre, total_field, phase0 = acquire(
        scan, total_field, r2star, pd, brain_mask, t.label >= Tissue.GM, phantom.brain.centre_mm
    )
    truth = Truth(
        chi_ppm=chi,
        total_field_ppm=total_field,
        local_field_ppm=local_field(chi, brain_mask, scan.affine),
        brain_mask=brain_mask,
        labels=t.label,
        cortical_depth=t.depth,
        depth_bins=depth_bins(t.depth),
        thickness_mm=t.thickness_mm,
        m1_areas=t.m1_area,
        r2star_per_s=r2star,
        phase_offset_rad=phase0,
    )
    return Simulation(gre=gre, truth=truth, scan=scan, phantom=phantom)


def preset(name: str, **overrides: object) -> ScanParams:
    """A named scan preset (tiny, slab, small-slab, brain) with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown size {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)

