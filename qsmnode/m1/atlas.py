"""M1 label handling in MNI space: which atlas voxels are M1, and its hand and foot areas.

Pure numerical code: the caller (the DICOM/template edge) reads the atlas file and passes its
array, affine and label values here.

- ``m1_hemispheres`` turns an atlas (integer labels, or a 4-D probabilistic atlas with one
  volume per label) into a hemisphere volume: 0 not M1, 1 left M1, 2 right M1. Which label
  values are M1 is configuration (``M1LabelSpec``), not code.
- ``split_areas`` splits it into Penfield's hand and foot areas (Costagli 2016, Cosottini 2016):
  the M1 voxels within a radius of the hand-knob centre (lateral convexity, approx. MNI
  (±36, −20, 57)) and of the foot centre (medial/paracentral, approx. MNI (±6, −25, 68)), each
  in its own hemisphere. The rest of M1 gets ``OTHER``.

Area values follow ``qsmnode.m1.result.AREAS``: 1 left hand, 2 right hand, 3 left foot,
4 right foot (the simulator's ``M1Area`` uses the same numbers), 5 other M1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from qsmnode.m1.result import AREAS

LEFT: Final = 1
RIGHT: Final = 2
OTHER_M1: Final = len(AREAS) + 1
"""Area value of M1 voxels outside the hand and foot areas."""


def area_value(area: str) -> int:
    """The value of an area (``left_hand`` …) in an area volume: 1..4."""
    return AREAS.index(area) + 1


@dataclass(frozen=True)
class M1LabelSpec:
    """Which values of an atlas are M1, per hemisphere.

    For an integer-label atlas, ``left``/``right`` are label values. For a probabilistic
    atlas (4-D, one volume per label, values in percent or 0..1), they are volume indices; a
    voxel is M1 when the summed probability of the hemisphere's M1 volumes is at least
    ``min_probability`` and at least that of every other label (maximum-probability map).
    ``split_by_x`` ignores the atlas's hemispheres and splits at x = 0 (for bilateral labels).
    """

    left: tuple[int, ...]
    right: tuple[int, ...]
    probabilistic: bool = False
    min_probability: float = 0.25
    split_by_x: bool = False


@dataclass(frozen=True)
class AreaSpec:
    """A ball in MNI space (mm): its left-hemisphere centre (x < 0) and radius.

    The right hemisphere's centre is the mirror image (x → −x)."""

    centre_mm: tuple[float, float, float]
    radius_mm: float

    def centre(self, hemisphere: int) -> NDArray[np.float64]:
        c = np.asarray(self.centre_mm, dtype=np.float64)
        c[0] = -abs(c[0]) if hemisphere == LEFT else abs(c[0])
        return c


@dataclass(frozen=True)
class AreaSplit:
    """How M1 is split into hand and foot areas (MNI mm)."""

    hand: AreaSpec = AreaSpec((-36.0, -20.0, 57.0), 16.0)
    foot: AreaSpec = AreaSpec((-6.0, -25.0, 68.0), 16.0)


def _mm_grid(shape: tuple[int, ...], affine: NDArray[np.float64]) -> tuple[NDArray, ...]:
    """RAS coordinates of voxel centres, as broadcastable float32 arrays."""
    a = np.asarray(affine, dtype=np.float64)
    i = np.arange(shape[0], dtype=np.float32)[:, None, None]
    j = np.arange(shape[1], dtype=np.float32)[None, :, None]
    k = np.arange(shape[2], dtype=np.float32)[None, None, :]
    return tuple(
        np.float32(a[r, 0]) * i + np.float32(a[r, 1]) * j + np.float32(a[r, 2]) * k
        + np.float32(a[r, 3])
        for r in range(3)
    )


def m1_hemispheres(
    atlas: NDArray, affine: NDArray[np.float64], spec: M1LabelSpec
) -> NDArray[np.uint8]:
    """The M1 voxels of an atlas by hemisphere: 0 not M1, 1 left, 2 right."""
    out = np.zeros(atlas.shape[:3], dtype=np.uint8)
    if spec.probabilistic:
        if atlas.ndim != 4:
            raise ValueError(f"a probabilistic atlas must be 4-D, got shape {atlas.shape}")
        n = atlas.shape[3]
        wanted = sorted(set(spec.left) | set(spec.right))
        if max(wanted) >= n:
            raise ValueError(f"label index {max(wanted)} beyond the atlas's {n} volumes")
        # Percent when stored as integers or above 1; one volume at a time (atlases are big).
        scale = np.float32(100.0) if (np.issubdtype(atlas.dtype, np.integer)
                                      or float(np.max(atlas[..., wanted[0]])) > 1.0) else 1
        others = np.zeros(atlas.shape[:3], dtype=atlas.dtype)
        for v in range(n):
            if v not in wanted:
                np.maximum(others, atlas[..., v], out=others)
        others = others.astype(np.float32) / scale
        for hemi, idx in ((LEFT, spec.left), (RIGHT, spec.right)):
            p = np.zeros(atlas.shape[:3], dtype=np.float32)
            for v in idx:
                p += atlas[..., v].astype(np.float32) / scale
            out[(p >= spec.min_probability) & (p >= others) & (out == 0)] = hemi
    else:
        if atlas.ndim != 3:
            raise ValueError(f"a label atlas must be 3-D, got shape {atlas.shape}")
        lab = np.rint(np.asarray(atlas)).astype(np.int64)
        out[np.isin(lab, spec.left)] = LEFT
        out[np.isin(lab, spec.right)] = RIGHT
    if spec.split_by_x:
        x = _mm_grid(out.shape, affine)[0]
        m1 = out > 0
        out[m1 & (x < 0)] = LEFT
        out[m1 & (x >= 0)] = RIGHT
    if not out.any():
        raise ValueError("the atlas has no voxel with the configured M1 label values")
    return out


def split_areas(
    hemispheres: NDArray[np.uint8],
    affine: NDArray[np.float64],
    split: AreaSplit | None = None,
) -> NDArray[np.uint8]:
    """Hand and foot areas per hemisphere from an M1 hemisphere volume (``m1_hemispheres``).

    Returns 0 outside M1, ``area_value(...)`` (1..4) in the hand and foot areas, and
    ``OTHER_M1`` (5) in the rest of M1. A voxel within both balls goes to the nearer centre.
    """
    split = split or AreaSplit()
    x, y, z = _mm_grid(hemispheres.shape, affine)
    out = np.where(hemispheres > 0, OTHER_M1, 0).astype(np.uint8)
    for hemi, side in ((LEFT, "left"), (RIGHT, "right")):
        in_hemi = hemispheres == hemi
        dists = []
        for spec in (split.hand, split.foot):
            c = spec.centre(hemi).astype(np.float32)
            d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
            dists.append(np.where(d2 <= np.float32(spec.radius_mm**2), d2, np.inf))
        hand_nearer = dists[0] <= dists[1]
        out[in_hemi & np.isfinite(dists[0]) & hand_nearer] = area_value(f"{side}_hand")
        out[in_hemi & np.isfinite(dists[1]) & ~hand_nearer] = area_value(f"{side}_foot")
    return out


def resample_labels(
    labels: NDArray, affine: NDArray[np.float64],
    shape: tuple[int, int, int], target_affine: NDArray[np.float64],
) -> NDArray:
    """Labels on another grid by nearest neighbour (0 outside the source grid)."""
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine)
    return ndimage.affine_transform(
        labels, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape), order=0,
        mode="constant", cval=0,
    ).astype(labels.dtype)
