"""An analytic head phantom with known susceptibility, relaxation and anatomy.

Everything is defined in RAS+ millimetres (head aligned with the scanner, origin near the anterior
commissure, as in MNI space), so the phantom can be sampled on any grid, oblique or not.

Anatomy:
- head (scalp, skull) and neck in air; χ_air − χ_tissue = +9.4 ppm;
- a CSF layer of a few mm under the skull, ventricles, sulcal CSF and the interhemispheric fissure;
- a folded cortical ribbon: grey matter within the local cortical thickness of the CSF boundary
  (pial surface or a sulcus), white matter beneath it;
- a precentral gyrus (M1) between the precentral and central sulci, with a posterior "hand knob"
  bend of the central sulcus; its lateral part is the hand area and its medial part, next to the
  fissure, the foot area (Penfield);
- iron-rich deep grey nuclei, the superior sagittal sinus and a few cortical and deep veins.

χ values are in ppm relative to water/CSF (typical 7T literature values, e.g. the QSM challenge
2.0 head model of Marques et al. 2021). The ALS-like change adds χ (and R2*) to the deep third
of chosen M1 areas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Final

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]

CHI_AIR_PPM: Final = 9.4
"""χ of air relative to tissue water (ppm)."""


class Tissue(IntEnum):
    """Tissue labels written to the truth label volume."""

    AIR = 0
    SCALP = 1
    BONE = 2
    CSF = 3
    GM = 4
    WM = 5
    CAUDATE = 6
    PUTAMEN = 7
    GLOBUS_PALLIDUS = 8
    THALAMUS = 9
    RED_NUCLEUS = 10
    SUBSTANTIA_NIGRA = 11
    VEIN = 12


class M1Area(IntEnum):
    """M1 area labels written to the truth M1 volume (0 = not M1)."""

    NONE = 0
    LEFT_HAND = 1
    RIGHT_HAND = 2
    LEFT_FOOT = 3
    RIGHT_FOOT = 4
    OTHER = 5


M1_AREA_NAMES: Final = MappingProxyType(
    {
        "left_hand": M1Area.LEFT_HAND,
        "right_hand": M1Area.RIGHT_HAND,
        "left_foot": M1Area.LEFT_FOOT,
        "right_foot": M1Area.RIGHT_FOOT,
    }
)


class DepthBin(IntEnum):
    """Cortical depth bins (0 = not cortex); deep is next to white matter."""

    NONE = 0
    DEEP = 1
    MIDDLE = 2
    SUPERFICIAL = 3


@dataclass(frozen=True)
class TissueProperties:
    chi_ppm: float
    r2star_per_s: float
    proton_density: float


# 7T values: χ relative to water; R2* from e.g. Peters 2007 and Cohen-Adair 2012 (cortex T2*
# about 32 ms); relative proton density.
DEFAULT_PROPERTIES: Final = MappingProxyType(
    {
        Tissue.AIR: TissueProperties(CHI_AIR_PPM, 0.0, 0.0),
        Tissue.SCALP: TissueProperties(0.0, 45.0, 0.75),
        Tissue.BONE: TissueProperties(-2.0, 500.0, 0.04),
        Tissue.CSF: TissueProperties(0.0, 8.0, 1.0),
        Tissue.GM: TissueProperties(0.015, 31.0, 0.86),
        Tissue.WM: TissueProperties(-0.03, 37.0, 0.70),
        Tissue.CAUDATE: TissueProperties(0.06, 40.0, 0.82),
        Tissue.PUTAMEN: TissueProperties(0.05, 45.0, 0.82),
        Tissue.GLOBUS_PALLIDUS: TissueProperties(0.16, 75.0, 0.78),
        Tissue.THALAMUS: TissueProperties(0.01, 38.0, 0.78),
        Tissue.RED_NUCLEUS: TissueProperties(0.11, 65.0, 0.78),
        Tissue.SUBSTANTIA_NIGRA: TissueProperties(0.14, 75.0, 0.78),
        Tissue.VEIN: TissueProperties(0.40, 120.0, 0.80),
    }
)

R2STAR_PER_CHI: Final = 700.0
"""R2* rise (s⁻¹) per ppm of added iron χ at 7T, for the ALS-like change (approx.)."""


@dataclass(frozen=True)
class Sulcus:
    """A CSF sheet cut into the brain from its surface, down to ``depth_mm``.

    ``kind`` "coronal": the sheet y = y0 + slope·|x| − knob(x), for x_range[0] ≤ |x| ≤ x_range[1];
    ``kind`` "sagittal": the sheet |x| = x0, for y_range[0] ≤ y ≤ y_range[1].
    The knob is a posterior bend of depth ``knob_mm`` centred at |x| = ``knob_x_mm``.
    """

    kind: str
    position_mm: float
    depth_mm: float
    extent_mm: tuple[float, float]
    slope: float = 0.0
    knob_mm: float = 0.0
    knob_x_mm: float = 0.0
    knob_width_mm: float = 8.0

    def sheet_coordinate(self, x: F32, y: F32) -> tuple[F32, F32]:
        """Signed distance (mm) to the sheet's plane, and distance beyond its extent."""
        ax = np.abs(x)
        if self.kind == "coronal":
            y_sheet = self.position_mm + self.slope * ax
            slope = np.full(ax.shape, self.slope, dtype=np.float32)
            if self.knob_mm:
                u = (ax - self.knob_x_mm) / self.knob_width_mm
                bump = self.knob_mm * np.exp(-(u**2))
                y_sheet = y_sheet - bump
                slope = slope + 2 * u / self.knob_width_mm * bump
            # Distance to the sheet by its local slope dy/d|x|, the knob's bend included.
            g = (y - y_sheet) / np.sqrt(1 + slope * slope)
            beyond = np.maximum(np.maximum(self.extent_mm[0] - ax, ax - self.extent_mm[1]), 0)
        else:
            g = ax - self.position_mm
            beyond = np.maximum(np.maximum(self.extent_mm[0] - y, y - self.extent_mm[1]), 0)
        return g.astype(np.float32, copy=False), beyond.astype(np.float32, copy=False)


CENTRAL = Sulcus("coronal", -36.0, 20.0, (2.0, 62.0), slope=0.42, knob_mm=7.0, knob_x_mm=36.0)
PRECENTRAL = Sulcus("coronal", -22.0, 15.0, (6.0, 58.0), slope=0.42)

DEFAULT_SULCI: Final = (
    CENTRAL,
    PRECENTRAL,
    Sulcus("coronal", -52.0, 15.0, (4.0, 60.0), slope=0.42),  # postcentral
    Sulcus("coronal", -72.0, 12.0, (8.0, 45.0), slope=0.3),  # parietal
    Sulcus("coronal", 8.0, 13.0, (10.0, 50.0), slope=0.2),  # frontal
    Sulcus("coronal", 32.0, 12.0, (8.0, 45.0), slope=0.1),  # frontal
    Sulcus("sagittal", 24.0, 14.0, (-14.0, 55.0)),  # superior frontal
    Sulcus("sagittal", 26.0, 12.0, (-95.0, -60.0)),  # intraparietal
)


@dataclass(frozen=True)
class Ellipsoid:
    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]

    def radius(self, x: F32, y: F32, z: F32, grow_mm: float = 0.0) -> F32:
        """Ellipsoidal radius: < 1 inside, 1 on the surface (grown by ``grow_mm``)."""
        (cx, cy, cz), (a, b, c) = self.centre_mm, self.semi_axes_mm
        return np.sqrt(
            ((x - cx) / (a + grow_mm)) ** 2
            + ((y - cy) / (b + grow_mm)) ** 2
            + ((z - cz) / (c + grow_mm)) ** 2
        )


def _mirror(name: Tissue, centre: tuple[float, float, float], axes: tuple[float, float, float]):
    return [(name, Ellipsoid((s * centre[0], centre[1], centre[2]), axes)) for s in (-1, 1)]


DEFAULT_NUCLEI: Final = (
    *_mirror(Tissue.CAUDATE, (13.0, 8.0, 12.0), (5.0, 11.0, 7.0)),
    *_mirror(Tissue.PUTAMEN, (25.0, 1.0, 2.0), (5.0, 13.0, 9.0)),
    *_mirror(Tissue.GLOBUS_PALLIDUS, (18.5, -3.0, 0.0), (3.0, 7.0, 4.5)),
    *_mirror(Tissue.THALAMUS, (11.0, -18.0, 6.0), (7.5, 12.0, 8.0)),
    *_mirror(Tissue.RED_NUCLEUS, (5.0, -20.0, -8.0), (3.0, 3.5, 3.0)),
    *_mirror(Tissue.SUBSTANTIA_NIGRA, (10.0, -18.0, -13.0), (3.0, 7.0, 2.0)),
)

DEFAULT_VENTRICLES: Final = (
    Ellipsoid((-9.0, -10.0, 18.0), (5.0, 24.0, 7.0)),
    Ellipsoid((9.0, -10.0, 18.0), (5.0, 24.0, 7.0)),
)


@dataclass(frozen=True)
class PhantomParams:
    """Geometry and tissue values of the head phantom.

    ``als_delta_chi_ppm`` adds χ (ppm) to the deep third of the named M1 areas
    (``left_hand``, ``right_hand``, ``left_foot``, ``right_foot``), with R2* rising by
    ``R2STAR_PER_CHI`` per ppm.
    """

    brain: Ellipsoid = Ellipsoid((0.0, -18.0, 12.0), (68.0, 86.0, 64.0))
    csf_layer_mm: float = 3.0
    skull_mm: float = 6.0
    scalp_mm: float = 5.0
    neck_bottom_mm: float = -150.0
    cortex_mm: float = 2.4
    m1_cortex_mm: float = 2.9
    sulcus_width_mm: float = 1.4
    fissure_depth_mm: float = 34.0
    sulci: tuple[Sulcus, ...] = DEFAULT_SULCI
    nuclei: tuple[tuple[Tissue, Ellipsoid], ...] = DEFAULT_NUCLEI
    ventricles: tuple[Ellipsoid, ...] = DEFAULT_VENTRICLES
    hand_x_mm: tuple[float, float] = (24.0, 50.0)
    foot_x_mm: tuple[float, float] = (0.0, 14.0)
    properties: MappingProxyType = field(default_factory=lambda: DEFAULT_PROPERTIES)
    als_delta_chi_ppm: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        unknown = set(self.als_delta_chi_ppm) - set(M1_AREA_NAMES)
        if unknown:
            raise ValueError(
                f"unknown M1 areas {sorted(unknown)}: use {sorted(M1_AREA_NAMES)}"
            )
        if not isinstance(self.als_delta_chi_ppm, MappingProxyType):
            frozen = MappingProxyType(dict(self.als_delta_chi_ppm))
            object.__setattr__(self, "als_delta_chi_ppm", frozen)

    @property
    def head_extent_mm(self) -> tuple[tuple[float, float], ...]:
        """Bounding box of the head and neck (mm, RAS) as (min, max) per axis."""
        grow = self.csf_layer_mm + self.skull_mm + self.scalp_mm
        (cx, cy, cz), (a, b, c) = self.brain.centre_mm, self.brain.semi_axes_mm
        return (
            (cx - a - grow, cx + a + grow),
            (cy - b - grow, cy + b + grow),
            (self.neck_bottom_mm, cz + c + grow),
        )


@dataclass
class TissueSample:
    """Phantom properties at a set of points."""

    label: NDArray[np.uint8]
    depth: F32
    """Normalised cortical depth: 0 at the pial surface, 1 at white matter, −1 outside cortex."""
    thickness_mm: F32
    """Local cortical thickness in cortex, 0 elsewhere."""
    m1_area: NDArray[np.uint8]
    in_brain_mask: NDArray[np.bool_]
    """The brain and its CSF, out to half-way through the CSF layer under the skull."""


def sample_tissue(p: PhantomParams, x: F32, y: F32, z: F32) -> TissueSample:
    """Evaluate the phantom's anatomy at RAS points (mm); arrays of any equal shape."""
    brain_rho = p.brain.radius(x, y, z)
    # Depth below the brain surface along the ray from the brain centre (mm; < 0 outside).
    cx, cy, cz = p.brain.centre_mm
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
    depth_surface = (1.0 - brain_rho) * r / np.maximum(brain_rho, 1e-3)

    half_width = p.sulcus_width_mm / 2
    # Distance (mm) to the nearest CSF boundary: pial surface, sulcus or fissure.
    dist_csf = np.maximum(depth_surface, 0.0)
    in_sulcus = np.zeros(x.shape, dtype=bool)
    sheets = [(np.abs(x).astype(np.float32), np.zeros_like(x), p.fissure_depth_mm)]
    for s in p.sulci:
        g, beyond = s.sheet_coordinate(x, y)
        sheets.append((np.abs(g), beyond, s.depth_mm))
    for abs_g, beyond, depth_mm in sheets:
        below = np.maximum(depth_surface - depth_mm, 0.0)
        d = np.sqrt(np.maximum(abs_g - half_width, 0.0) ** 2 + below**2 + beyond**2)
        in_sulcus |= (abs_g < half_width) & (depth_surface < depth_mm) & (beyond == 0)
        np.minimum(dist_csf, d, out=dist_csf)

    # The precentral gyrus lies between the central and precentral sulcal sheets.
    g_central, beyond_central = CENTRAL.sheet_coordinate(x, y)
    g_pre, _ = PRECENTRAL.sheet_coordinate(x, y)
    precentral = (g_central > 0) & (g_pre < 0) & (beyond_central == 0)
    thickness = np.where(precentral, p.m1_cortex_mm, p.cortex_mm).astype(np.float32)

    in_ventricle = np.zeros(x.shape, dtype=bool)
    for v in p.ventricles:
        in_ventricle |= v.radius(x, y, z) < 1.0
    brain_tissue = (brain_rho < 1.0) & ~in_sulcus & ~in_ventricle
    cortex = brain_tissue & (dist_csf <= thickness)

    label = np.full(x.shape, Tissue.AIR, dtype=np.uint8)
    head = p.brain.radius(x, y, z, p.csf_layer_mm + p.skull_mm + p.scalp_mm) < 1.0
    neck = (
        (((x - cx) / 58.0) ** 2 + ((y - cy + 8.0) / 66.0) ** 2 < 1.0)
        & (z < cz)
        & (z >= p.neck_bottom_mm)
    )
    label[head | neck] = Tissue.SCALP
    label[p.brain.radius(x, y, z, p.csf_layer_mm + p.skull_mm) < 1.0] = Tissue.BONE
    inner_skull = p.brain.radius(x, y, z, p.csf_layer_mm) < 1.0
    label[inner_skull] = Tissue.CSF
    label[brain_tissue] = Tissue.WM
    label[cortex] = Tissue.GM
    for tissue, ellipsoid in p.nuclei:
        label[brain_tissue & (ellipsoid.radius(x, y, z) < 1.0)] = tissue

    # Veins: the superior sagittal sinus over the fissure, cortical veins in the mouths of the
    # central and postcentral sulci, and the internal cerebral veins.
    sss = np.sqrt(x**2 + (depth_surface + 2.6) ** 2) < 2.4
    veins = sss & inner_skull
    for sulcus, side, (lo, hi) in ((CENTRAL, 1, (12.0, 46.0)), (p.sulci[2], -1, (8.0, 40.0))):
        g, _ = sulcus.sheet_coordinate(x, y)
        along = side * x
        veins |= (np.sqrt(g**2 + (depth_surface + 0.3) ** 2) < 0.9) & (along >= lo) & (along <= hi)
    for side in (-1, 1):
        veins |= (
            (np.sqrt((x - side * 2.5) ** 2 + (z - 17.0) ** 2) < 1.2) & (y > -40.0) & (y < -4.0)
        )
    label[veins & inner_skull] = Tissue.VEIN

    gm = label == Tissue.GM
    depth = np.where(gm, np.clip(dist_csf / thickness, 0.0, 1.0), -1.0).astype(np.float32)
    m1_area = np.zeros(x.shape, dtype=np.uint8)
    m1 = gm & precentral
    ax = np.abs(x)
    m1_area[m1] = M1Area.OTHER
    left = x < 0
    hand = m1 & (ax >= p.hand_x_mm[0]) & (ax <= p.hand_x_mm[1])
    foot = m1 & (ax >= p.foot_x_mm[0]) & (ax <= p.foot_x_mm[1])
    m1_area[hand & left] = M1Area.LEFT_HAND
    m1_area[hand & ~left] = M1Area.RIGHT_HAND
    m1_area[foot & left] = M1Area.LEFT_FOOT
    m1_area[foot & ~left] = M1Area.RIGHT_FOOT
    return TissueSample(
        label=label,
        depth=depth,
        thickness_mm=np.where(gm, thickness, 0.0).astype(np.float32),
        m1_area=m1_area,
        in_brain_mask=p.brain.radius(x, y, z, p.csf_layer_mm / 2) < 1.0,
    )


def depth_bins(depth: F32) -> NDArray[np.uint8]:
    """Thirds of normalised depth: superficial [0, 1/3), middle, deep [2/3, 1]."""
    bins = np.zeros(depth.shape, dtype=np.uint8)
    cortex = depth >= 0
    bins[cortex & (depth < 1 / 3)] = DepthBin.SUPERFICIAL
    bins[cortex & (depth >= 1 / 3) & (depth < 2 / 3)] = DepthBin.MIDDLE
    bins[cortex & (depth >= 2 / 3)] = DepthBin.DEEP
    return bins


def tissue_maps(p: PhantomParams, t: TissueSample) -> tuple[F32, F32, F32]:
    """χ (ppm, relative to water), R2* (s⁻¹) and proton density from the anatomy."""
    lut = np.array(
        [
            (p.properties[Tissue(i)].chi_ppm, p.properties[Tissue(i)].r2star_per_s,
             p.properties[Tissue(i)].proton_density)
            for i in range(len(Tissue))
        ],
        dtype=np.float32,
    )
    chi = lut[t.label, 0]
    r2star = lut[t.label, 1]
    pd = lut[t.label, 2]
    deep = t.depth >= 2 / 3
    for name, delta in p.als_delta_chi_ppm.items():
        where = deep & (t.m1_area == M1_AREA_NAMES[name])
        chi[where] += np.float32(delta)
        r2star[where] += np.float32(R2STAR_PER_CHI * delta)
    return chi, r2star, pd
