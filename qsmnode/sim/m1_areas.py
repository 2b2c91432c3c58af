"""The simulator's own M1 hand and foot areas: an anatomical rule, independent of the analysis.

The analysis (``qsmnode.m1.atlas``) takes M1 from HCPex area 4 drawn on the ICBM 2009c
asymmetric template and splits it with two 16 mm balls around literature hand-knob and foot
centres. The phantom's truth must not be that code, so the simulator defines M1 and its areas
its own way, from other sources:

- **M1** is Brodmann area 4 of the Jülich cytoarchitectonic maps (Geyer et al., Nature
  1996;382:805, areas 4a and 4p; Eickhoff et al., NeuroImage 2005;25:1325), shipped as FSL's
  probabilistic Jülich histological atlas (read through ``qsmnode.dicom.reference_data``, the
  IO edge): a voxel of a hemisphere is M1 where the summed probability of its 4a and 4p maps
  is at least ``AreaRule.min_probability`` (20 %: the maps are population maps of ten
  post-mortem brains, so a lower threshold covers the area of an individual cortex; only the
  phantom's own grey matter is labelled). The probabilities are resampled to the phantom's
  template grid by trilinear interpolation.
- **hand area**: the part of M1 on the lateral convexity at the height of the "hand knob",
  the omega-shaped bend of the precentral gyrus that holds the hand's motor representation
  (Yousry et al., Brain 1997;120:141). In MNI space the knob lies about 35-40 mm from the
  midline at z ≈ 55-60 mm (e.g. the M1 peak of the ALE meta-analysis of Mayka et al.,
  NeuroImage 2006;31:1453, near (±37, −21, 58)); the rule takes M1 with 24 ≤ |x| ≤ 50 mm and
  44 ≤ z ≤ 70 mm, the knob and the gyrus about one knob-width above and below it.
- **foot area**: the leg and foot lie medially, on the paracentral lobule at the vertex and on
  the medial wall (Penfield & Boldrey, Brain 1937;60:389): M1 with |x| ≤ 14 mm and z ≥ 54 mm.
- the rest of M1 is ``M1Area.OTHER``.

So the truth differs from the analysis's definition on purpose: another atlas (cytoarchitecture
vs multimodal parcellation), another template, and boxes instead of balls. Comparing the two is
a comparison of two reasonable definitions of "the hand area" plus the analysis's own error
(registration, segmentation): the M1 tests measure overlap (Dice), how much of what the
analysis calls an area is truly that area (precision) and how far the centroids lie apart,
with tolerances measured on this phantom (see ``tests/test_m1_analysis.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from qsmnode.dicom import reference_data
from qsmnode.sim.phantom import M1Area

JUELICH_KEY = "juelich"
"""The Jülich histological atlas (``qsmnode.dicom.reference_data.FILES``): 4-D, percent."""
JUELICH_BA4: dict[str, tuple[int, ...]] = {"left": (46, 48), "right": (47, 49)}
"""Volumes of the FSL Jülich atlas (0-based, the order of its label list): GM Primary motor
cortex BA4a and BA4p, left and right."""


@dataclass(frozen=True)
class Box:
    """A region in MNI mm by distance from the midline |x| and height z (mm)."""

    abs_x_mm: tuple[float, float]
    z_mm: tuple[float, float]

    def contains(self, x: NDArray, z: NDArray) -> NDArray[np.bool_]:
        ax = np.abs(x)
        return ((ax >= self.abs_x_mm[0]) & (ax <= self.abs_x_mm[1])
                & (z >= self.z_mm[0]) & (z <= self.z_mm[1]))


@dataclass(frozen=True)
class AreaRule:
    """The simulator's rule for M1 and its hand and foot areas (see the module docstring)."""

    min_probability: float = 20.0
    """Summed BA4a + BA4p probability (percent) from which a voxel is M1."""
    hand: Box = Box((24.0, 50.0), (44.0, 70.0))
    foot: Box = Box((0.0, 14.0), (54.0, 200.0))


def _resample(volume: NDArray, affine: NDArray[np.float64], shape: tuple[int, ...],
              target_affine: NDArray[np.float64]) -> NDArray[np.float32]:
    """``volume`` on the target grid by trilinear interpolation (0 outside its own grid)."""
    m = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)
    return ndimage.affine_transform(np.asarray(volume, np.float32), m[:3, :3], offset=m[:3, 3],
                                    output_shape=tuple(shape), order=1, mode="constant",
                                    cval=0.0).astype(np.float32)


@lru_cache(maxsize=2)
def m1_area_labels(shape: tuple[int, int, int], affine_key: tuple[float, ...],
                   rule: AreaRule) -> tuple[NDArray[np.uint8], str]:
    """M1 area labels (``M1Area``: 0 not M1, 1-4 hand/foot, 5 other M1) on a grid given by
    its shape and flattened 4 × 4 affine, and the atlas's licence. Not restricted to grey
    matter: the phantom labels only its grey-matter points."""
    affine = np.asarray(affine_key, np.float64).reshape(4, 4)
    atlas = reference_data.load_volume(JUELICH_KEY)
    ijk = np.indices(shape, dtype=np.float32)
    x, _, z = (np.float32(affine[r, 0]) * ijk[0] + np.float32(affine[r, 1]) * ijk[1]
               + np.float32(affine[r, 2]) * ijk[2] + np.float32(affine[r, 3]) for r in range(3))
    del ijk
    out = np.zeros(shape, dtype=np.uint8)
    for side, sign, hand, foot in (("left", -1, M1Area.LEFT_HAND, M1Area.LEFT_FOOT),
                                   ("right", 1, M1Area.RIGHT_HAND, M1Area.RIGHT_FOOT)):
        prob = sum(_resample(atlas.data[..., v], atlas.affine, shape, affine)
                   for v in JUELICH_BA4[side])
        m1 = (prob >= np.float32(rule.min_probability)) & (sign * x > 0)
        out[m1] = M1Area.OTHER
        out[m1 & rule.hand.contains(x, z)] = hand
        out[m1 & rule.foot.contains(x, z)] = foot
    out.setflags(write=False)
    return out, f"atlas {JUELICH_KEY}: {atlas.licence}"
