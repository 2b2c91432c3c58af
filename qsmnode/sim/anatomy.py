"""The anatomy phantom: a head built from real template anatomy, in a random pose.

The brain is the MNI ICBM152 2009a nonlinear *symmetric* template that nilearn ships (T1,
grey- and white-matter probabilities, 1 mm); M1 and its hand and foot areas per hemisphere
are the simulator's own (``qsmnode.sim.m1_areas``: Jülich BA4 with hand-knob and paracentral
boxes), not the analysis's atlas and split. It is kept apart from what the M1 analysis
registers to (the 2009c *asymmetric* brain, at 2 mm): a different template, further warped by
a smooth random deformation, then placed in a random rigid pose.

The ground truth is not computed with the code under test: nothing in ``qsmnode.sim`` imports
``qsmnode.m1`` or ``qsmnode.qsm`` (``tests/test_sim_physics.py`` checks the imports).

Anatomy, on the template's 1 mm grid (template space ≈ MNI mm):
- brain mask: T1 > 0; tissue: GM or WM where its probability beats the other two (CSF = the
  remainder); deep grey nuclei (iron) from the analytic phantom's MNI-placed ellipsoids.
- sulci: an average template's sulci are closed (two GM banks touching). They are opened
  where the distance to WM has a sharp ridge inside GM (where the wavefronts from two banks
  meet): a CSF sheet about 1.5-2 mm thick, made by taking the minimum of the pial distance and
  the smoothed distance to the ridge minus ``_SHEET_OFFSET_MM`` (a sheet made only by removing
  the 1 mm ridge voxels closes again once the distance is smoothed).
- surfaces as signed distances (mm, half-voxel corrected, lightly smoothed): ``pial`` (> 0
  inside GM ∪ WM) and ``white`` (> 0 inside WM), sampled with trilinear interpolation, so the
  fine acquisition grid sees smooth surfaces and not 1 mm stairs.
- **cortical thickness and depth truth** (``qsmnode.sim.ribbon``): the length of the flow line
  of the potential u = white / (white − pial) through the point, from the white to the pial
  surface, and the equivolume depth (0 pial, 1 WM) as the column's volume fraction integrated
  along that line, computed once from the continuous surfaces at the grey-matter points of a
  0.5 mm isotropic template-space grid over a box around the hand and foot areas
  (``_TRUTH_BOX_MM``); sampled at the posed points by trilinear interpolation and corrected
  for the local stretch of the random deformation across the cortex. It is the same quantity
  the analysis estimates (a thickness along curves that meet both surfaces, equivolume
  layers) by another algorithm (a closed-form potential and Lagrangian line integration vs
  the analysis's Laplace equation and Eulerian Yezzi–Prince transport on voxel labels) and
  other code; the two agree on slabs, spheres and cylinders and may differ by a few tenths of
  a millimetre in folds (see ``qsmnode.sim.ribbon``). Outside the box (not the hand or foot
  areas) the depth is the distance-based pial / (pial − white) and the thickness pial −
  white.
- head: layers of CSF, bone and scalp at set distances outside the (smoothed) brain mask, a
  neck below, air around; the superior sagittal sinus (a vein) in the midline CSF layer.

χ, R2* and proton density come from the simulator's tissue table (``DEFAULT_PROPERTIES``);
the ALS-like change adds χ (and R2*) to the deep third of chosen M1 areas, exactly as the
analytic phantom does (``tissue_maps``).

Poses: scanner RAS = R · (template point) + t with R, t random (seeded); the template point
of a phantom point p is q = p + u(p), u a sum of random plane-wave cosines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from math import radians
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from qsmnode.dicom import reference_data
from qsmnode.sim.m1_areas import AreaRule, m1_area_labels
from qsmnode.sim.phantom import (
    CHI_AIR_PPM,
    DEFAULT_NUCLEI,
    DEFAULT_PROPERTIES,
    M1_AREA_NAMES,
    PhantomParams,
    Tissue,
    TissueSample,
    depth_bins,
    tissue_maps,
)
from qsmnode.sim.ribbon import Ribbon, flow_layers
from qsmnode.sim.ribbon import trilinear as _trilinear
from qsmnode.sim.scanner import (
    ScanParams,
    Simulation,
    Truth,
    acquire,
    grid_points,
    local_field,
    simulate_field,
)

F32 = NDArray[np.float32]

_HEAD_GRID_MM = 2.0
_HEAD_PAD_MM = 40.0
_SHEET_OFFSET_MM = 1.0
"""A sulcal sheet is where the smoothed distance to the ridge voxels is below this: 1.5-2 mm
thick (the smoothing, σ 0.6 mm, lifts the distance at the ridge itself to ≈0.5 mm)."""
_TRUTH_STEP_MM = 0.5
_TRUTH_BOX_MM = ((-60.0, 60.0), (-62.0, 4.0), (34.0, 92.0))
"""Template-space box (mm) of the fine thickness and depth truth: the hand and foot areas
(``qsmnode.sim.m1_areas``) and 10 mm around them."""


@dataclass(frozen=True)
class AnatomyParams:
    """The anatomy phantom: template, M1 areas, head layers, pose, deformation, ALS change.

    ``als_delta_chi_ppm`` adds χ (ppm) to the deep third (depth ≥ 2/3) of the named areas
    (``left_hand``, ``right_hand``, ``left_foot``, ``right_foot``); R2* rises by
    ``R2STAR_PER_CHI`` per ppm. The pose and the deformation are drawn from ``pose_seed``.
    """

    pose_seed: int = 0
    max_rotation_deg: float = 10.0
    """Each of the three rotation angles is uniform in ± this."""
    max_translation_mm: float = 8.0
    """Each translation component is uniform in ± this."""
    deformation_mm: float = 1.5
    """RMS amplitude of the smooth random deformation (0 = none)."""
    deformation_wavelength_mm: float = 70.0
    template: str = "mni152-2009a-sym"
    areas: AreaRule = field(default_factory=AreaRule)
    """The simulator's own M1 hand/foot rule (``qsmnode.sim.m1_areas``)."""
    csf_mm: float = 3.0
    skull_mm: float = 6.0
    scalp_mm: float = 5.0
    neck_bottom_mm: float = -150.0
    properties: MappingProxyType = field(default_factory=lambda: DEFAULT_PROPERTIES)
    als_delta_chi_ppm: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.als_delta_chi_ppm) - set(M1_AREA_NAMES)
        if unknown:
            raise ValueError(f"unknown M1 areas {sorted(unknown)}: use {sorted(M1_AREA_NAMES)}")
        object.__setattr__(self, "als_delta_chi_ppm",
                           MappingProxyType(dict(self.als_delta_chi_ppm)))

    def phantom_params(self) -> PhantomParams:
        """The analytic phantom's parameters that carry the tissue table and ALS change."""
        return PhantomParams(properties=self.properties,
                             als_delta_chi_ppm=self.als_delta_chi_ppm)


@dataclass(frozen=True)
class Pose:
    """Scanner RAS = rotation @ template point + translation_mm, after the deformation."""

    rotation: NDArray[np.float64]
    translation_mm: NDArray[np.float64]
    angles_deg: tuple[float, float, float]
    waves: tuple[tuple[NDArray[np.float64], NDArray[np.float64], float], ...]
    """Deformation u(p) = Σ amplitude · cos(k · p + phase): (amplitude, k, phase) per wave."""

    def to_template(self, x: F32, y: F32, z: F32) -> tuple[F32, F32, F32]:
        """The undeformed phantom point p of scanner points (inverse rigid pose)."""
        r, t = self.rotation, self.translation_mm
        d = (x - np.float32(t[0]), y - np.float32(t[1]), z - np.float32(t[2]))
        return tuple(
            (np.float32(r[0, a]) * d[0] + np.float32(r[1, a]) * d[1]
             + np.float32(r[2, a]) * d[2]).astype(np.float32)
            for a in range(3)
        )

    def deform(self, p: tuple[F32, F32, F32]) -> tuple[F32, F32, F32]:
        """The template point q = p + u(p)."""
        q = [c.copy() for c in p]
        for amp, k, phase in self.waves:
            c = np.cos(np.float32(k[0]) * p[0] + np.float32(k[1]) * p[1]
                       + np.float32(k[2]) * p[2] + np.float32(phase))
            for a in range(3):
                q[a] += np.float32(amp[a]) * c
        return tuple(q)

    def jacobian_t_dot(self, p: tuple[F32, F32, F32], n: tuple[F32, F32, F32]) -> F32:
        """|Jᵀ n| with J = ∂q/∂p: how a unit of distance along the template normal n maps
        back to the phantom (template distances divide by it)."""
        out = [c.copy() for c in n]
        for amp, k, phase in self.waves:
            s = -np.sin(np.float32(k[0]) * p[0] + np.float32(k[1]) * p[1]
                        + np.float32(k[2]) * p[2] + np.float32(phase))
            a_dot_n = (np.float32(amp[0]) * n[0] + np.float32(amp[1]) * n[1]
                       + np.float32(amp[2]) * n[2]) * s
            for b in range(3):
                out[b] += np.float32(k[b]) * a_dot_n
        return np.sqrt(out[0] ** 2 + out[1] ** 2 + out[2] ** 2)

    def to_scanner(self, points: NDArray[np.float64]) -> NDArray[np.float64]:
        """Scanner RAS of undeformed template points ``[n, 3]``."""
        return points @ self.rotation.T + self.translation_mm


def _rotation(angles_deg: tuple[float, float, float]) -> NDArray[np.float64]:
    ax, ay, az = (radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_pose(params: AnatomyParams, n_waves: int = 4) -> Pose:
    """The rigid pose and deformation drawn from ``params.pose_seed``."""
    rng = np.random.default_rng(params.pose_seed)
    angles = tuple(float(a) for a in rng.uniform(-1, 1, 3) * params.max_rotation_deg)
    t = rng.uniform(-1, 1, 3) * params.max_translation_mm
    waves = []
    for _ in range(n_waves if params.deformation_mm > 0 else 0):
        amp = rng.normal(size=3)
        amp *= params.deformation_mm / np.linalg.norm(amp) * np.sqrt(2.0 / n_waves)
        d = rng.normal(size=3)
        lam = params.deformation_wavelength_mm * rng.uniform(0.8, 1.25)
        k = d / np.linalg.norm(d) * 2 * np.pi / lam
        waves.append((amp, k, float(rng.uniform(0, 2 * np.pi))))
    return Pose(_rotation(angles), t, angles, tuple(waves))


def _signed_distance(inside: NDArray[np.bool_], spacing: float = 1.0) -> F32:
    """Signed distance (mm) to the boundary between ``inside`` and the rest: > 0 inside.

    Voxel centres sit half a voxel from the boundary between two voxels, hence the ±½."""
    din = ndimage.distance_transform_edt(inside).astype(np.float32)
    dout = ndimage.distance_transform_edt(~inside).astype(np.float32)
    return (np.where(inside, din - 0.5, 0.5 - dout) * np.float32(spacing)).astype(np.float32)


def _sulcal_ridges(gm: NDArray[np.bool_], wm: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """GM voxels on a sharp ridge of the distance to WM: where the two banks of a closed
    sulcus meet (second difference ≤ −0.9 mm along some axis, at least 1.5 mm from WM)."""
    d = ndimage.distance_transform_edt(~wm).astype(np.float32)
    ridge = np.zeros(gm.shape, dtype=bool)
    for ax in range(3):
        lo = np.roll(d, 1, ax)
        hi = np.roll(d, -1, ax)
        ridge |= (d >= lo) & (d >= hi) & (lo + hi - 2 * d <= -0.9)
    return ridge & gm & (d >= 1.5)


@dataclass(frozen=True)
class _Model:
    """The template anatomy as sampled volumes (template space, mm)."""

    inv_affine: NDArray[np.float64]
    pial: F32
    white: F32
    areas: NDArray[np.uint8]
    head_inv_affine: NDArray[np.float64]
    outside: F32
    """Signed distance (mm) outside the smoothed brain mask (< 0 inside), 2 mm grid."""
    extent_mm: tuple[tuple[float, float], ...]
    """Template-space box of the head and neck."""
    licence: str
    truth_inv_affine: NDArray[np.float64]
    truth_thickness: F32
    """Thickness (mm) of the ribbon along its flow lines on the fine grid (``_fine_layers``)."""
    truth_depth: F32
    """Equivolume depth of the ribbon on the fine grid (0 pial, 1 white matter)."""


@lru_cache(maxsize=2)
def _model(template: str, rule: AreaRule, head_mm: float, neck_bottom_mm: float) -> _Model:
    tt = reference_data.load_tissue_template(template)
    brain = tt.t1 > 0
    csf = np.clip(1 - tt.gm - tt.wm, 0, 1)
    wm = brain & (tt.wm >= tt.gm) & (tt.wm >= csf)
    gm = brain & ~wm & (tt.gm >= csf)
    ridges = _sulcal_ridges(gm, wm)
    tissue = (gm | wm) & ~ridges
    pial = ndimage.gaussian_filter(_signed_distance(tissue), 0.6)
    to_ridge = ndimage.gaussian_filter(
        ndimage.distance_transform_edt(~ridges).astype(np.float32), 0.6)
    np.minimum(pial, to_ridge - np.float32(_SHEET_OFFSET_MM), out=pial)
    white = ndimage.gaussian_filter(_signed_distance(wm), 0.6)
    del csf, gm, wm, tissue, ridges, to_ridge
    inv_affine = np.linalg.inv(tt.affine)
    truth_inv_affine, truth_thickness, truth_depth = _fine_layers(
        pial, white, inv_affine, _TRUTH_BOX_MM, _TRUTH_STEP_MM)

    areas, atlas_licence = m1_area_labels(
        tuple(int(n) for n in tt.t1.shape), tuple(float(v) for v in tt.affine.ravel()), rule)

    # The head: distances outside the smoothed brain mask on a padded 2 mm grid.
    f = int(_HEAD_GRID_MM)
    pad = int(_HEAD_PAD_MM / _HEAD_GRID_MM)
    smooth = ndimage.gaussian_filter(brain.astype(np.float32), 2.0)[::f, ::f, ::f] > 0.5
    smooth = np.pad(smooth, pad)
    outside = -_signed_distance(smooth, _HEAD_GRID_MM)
    head_affine = tt.affine @ np.diag([f, f, f, 1.0])
    head_affine[:3, 3] -= head_affine[:3, :3] @ np.full(3, pad)
    ijk = np.argwhere(outside < head_mm)
    ends = np.array([ijk.min(axis=0), ijk.max(axis=0)], dtype=np.float64)
    ends = ends @ head_affine[:3, :3].T + head_affine[:3, 3]
    box_lo, box_hi = ends.min(axis=0) - 2, ends.max(axis=0) + 2
    box_lo[2] = min(box_lo[2], neck_bottom_mm)
    extent = tuple((float(a), float(b)) for a, b in zip(box_lo, box_hi, strict=True))
    for arr in (pial, white, outside, truth_thickness, truth_depth):
        arr.setflags(write=False)
    return _Model(inv_affine, pial, white, areas,
                  np.linalg.inv(head_affine), outside, extent,
                  f"{tt.licence}; {atlas_licence}",
                  truth_inv_affine, truth_thickness, truth_depth)


def _fine_layers(
    pial: F32, white: F32, inv_affine: NDArray[np.float64],
    box_mm: tuple[tuple[float, float], ...], step_mm: float,
) -> tuple[NDArray[np.float64], F32, F32]:
    """The thickness and depth truth: the ribbon's flow-line thickness and equivolume depth
    (``qsmnode.sim.ribbon``) at the grey-matter points of a ``step_mm`` isotropic
    template-space grid over ``box_mm``, from the continuous surfaces on their own grid.

    Returns the grid's inverse affine and the two maps, each filled outside grey matter with
    its nearest grey-matter value (so trilinear sampling right at the surfaces stays
    defined)."""
    axes = [np.arange(lo, hi + step_mm / 2, step_mm, dtype=np.float32) for lo, hi in box_mm]
    shape = tuple(a.size for a in axes)
    q = tuple(np.broadcast_to(a.reshape([-1 if d == i else 1 for d in range(3)]), shape)
              .ravel() for i, a in enumerate(axes))
    (p, w), _ = _trilinear((pial, white), inv_affine, q, -1e3)
    gm = (p >= 0) & (w < 0)
    del p, w
    ribbon = Ribbon.from_fields(pial, white, np.linalg.inv(inv_affine))
    layers = flow_layers(ribbon, tuple(c[gm] for c in q))
    del q, ribbon
    thickness = np.full(gm.size, np.nan, dtype=np.float32)
    depth = thickness.copy()
    thickness[gm] = layers.thickness_mm
    depth[gm] = layers.depth_equivolume
    thickness, depth = thickness.reshape(shape), depth.reshape(shape)
    known = np.isfinite(thickness) & np.isfinite(depth)
    thickness, depth = _extend(known, thickness, depth, rounds=3)
    affine = np.diag([step_mm, step_mm, step_mm, 1.0])
    affine[:3, 3] = [lo for lo, _ in box_mm]
    return np.linalg.inv(affine), thickness, depth


def _extend(known: NDArray[np.bool_], *maps: F32, rounds: int) -> list[F32]:
    """Maps extended beyond ``known`` by ``rounds`` voxels: each round, an unknown voxel with
    known voxels among its 26 neighbours takes their mean (NaN further out)."""
    out = [np.where(known, v, 0).astype(np.float32) for v in maps]
    known = known.copy()
    for _ in range(rounds):
        count = ndimage.uniform_filter(known.astype(np.float32), 3, mode="constant")
        new = ~known & (count > 0)
        for v in out:
            total = ndimage.uniform_filter(v, 3, mode="constant")
            v[new] = total[new] / count[new]
        known |= new
    for v in out:
        v[~known] = np.nan
    return out


def _index_coords(inv_affine: NDArray[np.float64], q: tuple[F32, F32, F32]) -> list[F32]:
    return [
        np.float32(inv_affine[a, 0]) * q[0] + np.float32(inv_affine[a, 1]) * q[1]
        + np.float32(inv_affine[a, 2]) * q[2] + np.float32(inv_affine[a, 3])
        for a in range(3)
    ]


def _nearest(vol: NDArray, inv_affine: NDArray[np.float64], q: tuple[F32, F32, F32]) -> NDArray:
    """Nearest-neighbour sample of a volume at template points (0 outside its grid)."""
    c = [np.rint(v).astype(np.int64) for v in _index_coords(inv_affine, q)]
    valid = np.ones(c[0].shape, dtype=bool)
    for a in range(3):
        valid &= (c[a] >= 0) & (c[a] < vol.shape[a])
        np.clip(c[a], 0, vol.shape[a] - 1, out=c[a])
    return np.where(valid, vol[c[0], c[1], c[2]], 0).astype(vol.dtype)


class AnatomyPhantom:
    """The anatomy phantom in its pose: samples its anatomy anywhere in scanner RAS mm.

    It is a ``ChiSource`` for ``qsmnode.sim.scanner.simulate_field``."""

    def __init__(self, params: AnatomyParams | None = None) -> None:
        self.params = params or AnatomyParams()
        p = self.params
        self.model = _model(p.template, p.areas, p.csf_mm + p.skull_mm + p.scalp_mm,
                            p.neck_bottom_mm)
        self.pose = random_pose(p)
        self._tissue_params = p.phantom_params()

    @property
    def licence(self) -> str:
        """Licences of the template and atlas files the phantom is built from."""
        return self.model.licence

    @property
    def extent_mm(self) -> tuple[tuple[float, float], ...]:
        """Scanner-space box of the posed head and neck (deformation included)."""
        box = self.model.extent_mm
        corners = np.array([[x, y, z] for x in box[0] for y in box[1] for z in box[2]])
        world = self.pose.to_scanner(corners)
        grow = 3 * self.params.deformation_mm + 2
        return tuple((float(world[:, a].min() - grow), float(world[:, a].max() + grow))
                     for a in range(3))

    def tissue(self, x: F32, y: F32, z: F32) -> TissueSample:
        """The phantom's tissue at scanner RAS points (mm), arrays of one shape."""
        m, prm = self.model, self.params
        shape = np.shape(x)
        p = self.pose.to_template(*(np.ravel(c).astype(np.float32) for c in (x, y, z)))
        q = self.pose.deform(p)
        (out,), _ = _trilinear((m.outside,), m.head_inv_affine, q, 1e3)
        label = np.full(out.shape, Tissue.AIR, dtype=np.uint8)
        # Neck: an elliptic cylinder of soft tissue under the head.
        neck = (((q[0] / 52.0) ** 2 + ((q[1] + 22.0) / 60.0) ** 2) < 1.0) & (
            q[2] < -30.0) & (q[2] >= prm.neck_bottom_mm)
        label[neck | (out < prm.csf_mm + prm.skull_mm + prm.scalp_mm)] = Tissue.SCALP
        label[out < prm.csf_mm + prm.skull_mm] = Tissue.BONE
        inner = out < prm.csf_mm
        label[inner] = Tissue.CSF
        depth = np.full(out.shape, -1.0, dtype=np.float32)
        thickness = np.zeros(out.shape, dtype=np.float32)
        areas = np.zeros(out.shape, dtype=np.uint8)

        # Brain tissue, only evaluated inside the inner skull.
        idx = np.flatnonzero(inner)
        qi = tuple(c[idx] for c in q)
        (pial, white), _ = _trilinear((m.pial, m.white), m.inv_affine, qi, -1e3)
        tissue = pial >= 0
        lab = np.where(tissue, np.where(white >= 0, Tissue.WM, Tissue.GM), Tissue.CSF)
        lab = lab.astype(np.uint8)
        deep = tissue & (np.abs(qi[0]) < 36) & (qi[1] > -40) & (qi[1] < 25) & (qi[2] > -25) \
            & (qi[2] < 32)
        dq = tuple(c[deep] for c in qi)
        sub = lab[deep]
        for name, ell in DEFAULT_NUCLEI:
            sub[ell.radius(*dq) < 1.0] = name
        lab[deep] = sub
        # Superior sagittal sinus: a tube in the midline CSF layer over the vertex.
        oi = out[idx]
        sss = (np.sqrt(qi[0] ** 2 + (oi - 0.55 * prm.csf_mm) ** 2) < 0.5 * prm.csf_mm + 0.6) \
            & (qi[1] > -100.0) & (qi[1] < 55.0) & (qi[2] > 0.0)
        lab[sss & ~tissue] = Tissue.VEIN
        label[idx] = lab

        gm = lab == Tissue.GM
        if gm.any():
            gi = idx[gm]
            qg = tuple(c[gi] for c in q)
            pg = tuple(c[gi] for c in p)
            w = pial[gm] - white[gm]
            d = np.clip(pial[gm] / np.maximum(w, np.float32(1e-3)), 0, 1)
            (fine_w, fine_d), _ = _trilinear((m.truth_thickness, m.truth_depth),
                                             m.truth_inv_affine, qg, np.nan)
            in_box = np.isfinite(fine_w)
            w = np.where(in_box, fine_w, w)
            depth[gi] = np.where(in_box, np.clip(fine_d, 0, 1), d)
            _, grad = _trilinear((m.pial, m.white), m.inv_affine, qg, 0.0, gradient=True)
            norm = np.maximum(np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2), 1e-6)
            normal = tuple((c / norm).astype(np.float32) for c in grad)
            thickness[gi] = w / np.maximum(self.pose.jacobian_t_dot(pg, normal), 0.2)
            areas[gi] = _nearest(m.areas, m.inv_affine, qg)
        return TissueSample(
            label=label.reshape(shape),
            depth=depth.reshape(shape),
            thickness_mm=thickness.reshape(shape),
            m1_area=areas.reshape(shape),
            in_brain_mask=(out < prm.csf_mm / 2).reshape(shape),
        )

    def sample(self, x: F32, y: F32, z: F32) -> tuple[F32, NDArray[np.bool_], NDArray[np.bool_]]:
        """χ relative to air (0 outside the head), the brain mask, and brain tissue."""
        t = self.tissue(x, y, z)
        chi, _, _ = tissue_maps(self._tissue_params, t)
        chi_rel = np.where(t.label == Tissue.AIR, 0.0, chi - CHI_AIR_PPM).astype(np.float32)
        return chi_rel, t.in_brain_mask, t.label >= Tissue.GM


def simulate_anatomy(
    scan: ScanParams,
    pose_seed: int = 0,
    als: Mapping[str, float] | None = None,
    params: AnatomyParams | None = None,
    with_field: bool = True,
) -> Simulation:
    """Simulate a multi-echo GRE acquisition of the anatomy phantom, with its ground truth.

    ``pose_seed`` draws the pose and deformation; ``als`` maps areas (``left_hand`` …) to a
    deep-layer χ increase (ppm). ``params`` overrides everything else (its own
    ``pose_seed``/``als_delta_chi_ppm`` are then replaced by the arguments when given).
    The signal model is ``qsmnode.sim.scanner.simulate``'s. ``with_field=False`` skips the
    field (total and local field 0, χ unsmoothed): the magnitude is unchanged, for tests that
    need only anatomy and magnitude (registration).
    """
    params = params or AnatomyParams()
    changes: dict[str, object] = {"pose_seed": pose_seed}
    if als is not None:
        changes["als_delta_chi_ppm"] = dict(als)
    params = replace(params, **changes)
    phantom = AnatomyPhantom(params)
    points = grid_points(scan)
    t = phantom.tissue(*points)
    del points
    tissue_chi, r2star, pd = tissue_maps(phantom._tissue_params, t)
    if with_field:
        total_field, chi, brain_mask = simulate_field(phantom, scan)
        chi += np.float32(CHI_AIR_PPM)
        local = local_field(chi, brain_mask, scan.affine)
    else:
        chi, brain_mask = tissue_chi, t.in_brain_mask
        total_field = np.zeros(scan.shape, dtype=np.float32)
        local = np.zeros(scan.shape, dtype=np.float32)
    del tissue_chi
    centre = tuple(float(v) for v in phantom.pose.to_scanner(np.array([[0.0, -18.0, 12.0]]))[0])
    gre, total_field, phase0 = acquire(
        scan, total_field, r2star, pd, brain_mask, t.label >= Tissue.GM, centre
    )
    truth = Truth(
        chi_ppm=chi,
        total_field_ppm=total_field,
        local_field_ppm=local,
        brain_mask=brain_mask,
        labels=t.label,
        cortical_depth=t.depth,
        depth_bins=depth_bins(t.depth),
        thickness_mm=t.thickness_mm,
        m1_areas=t.m1_area,
        r2star_per_s=r2star,
        phase_offset_rad=phase0,
    )
    return Simulation(gre=gre, truth=truth, scan=scan, phantom=params.phantom_params())




T1W_CONTRAST: MappingProxyType = MappingProxyType({
    Tissue.AIR: 0.0, Tissue.SCALP: 0.75, Tissue.BONE: 0.1, Tissue.CSF: 0.15, Tissue.GM: 0.55,
    Tissue.WM: 0.9, Tissue.VEIN: 0.3,
})
"""T1-weighted (MPRAGE-like) intensity per tissue; deep nuclei take grey matter's."""


def simulate_t1w(
    scan: ScanParams,
    pose_seed: int = 0,
    params: AnatomyParams | None = None,
    noise: float = 0.02,
    bias: float = 0.2,
) -> tuple[F32, NDArray[np.float64], NDArray[np.bool_]]:
    """A same-session T1w-like volume of the anatomy phantom on its own grid.

    Same pose (``pose_seed``) as a GRE simulated with it, so the two share the scanner's
    RAS, as series of one Frame of Reference do. Intensities by tissue label
    (``T1W_CONTRAST``), a smooth multiplicative receive bias of about ±``bias`` and Gaussian
    noise (``noise``, relative to white matter), after averaging the labels' intensities
    over a 2×2×2 sub-voxel grid (partial volume). Returns the image, its affine and the
    brain mask (brain tissue and CSF inside the skull).
    """
    params = replace(params or AnatomyParams(), pose_seed=pose_seed)
    phantom = AnatomyPhantom(params)
    lut = np.zeros(max(int(t) for t in Tissue) + 1, dtype=np.float32)
    for t in Tissue:
        lut[t] = T1W_CONTRAST.get(t, T1W_CONTRAST[Tissue.GM])
    affine = scan.affine
    ijk = np.indices(scan.shape, dtype=np.float32).reshape(3, -1)
    image = np.zeros(ijk.shape[1], dtype=np.float32)
    mask = np.zeros(ijk.shape[1], dtype=bool)
    for offset in np.array(np.meshgrid(*[(-0.25, 0.25)] * 3, indexing="ij")).reshape(3, -1).T:
        pts = affine[:3, :3] @ (ijk + offset[:, None].astype(np.float32)) + affine[:3, 3:4]
        t = phantom.tissue(*pts.astype(np.float32))
        image += lut[t.label] / 8
        mask |= t.in_brain_mask
    image = image.reshape(scan.shape)
    rng = np.random.default_rng(scan.seed + 1000 * pose_seed)
    centre = np.asarray(scan.shape) / 2
    coords = np.indices(scan.shape, dtype=np.float32)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    ramp = sum(np.float32(direction[a]) * (coords[a] - centre[a]) / scan.shape[a]
               for a in range(3))
    image *= (1 + np.float32(bias) * np.sin(np.float32(np.pi) * ramp)).astype(np.float32)
    image += rng.normal(0, noise, scan.shape).astype(np.float32)
    return np.clip(image, 0, None).astype(np.float32), affine, mask.reshape(scan.shape)
