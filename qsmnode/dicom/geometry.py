"""The one place that converts between the voxel-to-RAS affine and DICOM's LPS patient frame.

Array-axis convention (used by every writer and reader in ``qsmnode``):

- ``i`` (axis 0) is the DICOM **column** index: it steps along the row direction cosine, the first
  three values of ImageOrientationPatient (IOP).
- ``j`` (axis 1) is the DICOM **row** index: it steps along the column direction cosine, the last
  three values of IOP.
- ``k`` (axis 2) is the slice index; slice ``k`` has ImagePositionPatient ``affine @ (0, 0, k, 1)``
  (converted to LPS). ImagePositionPatient is the centre of the first transmitted voxel
  (row 0, column 0), and the affine maps voxel centres, so no half-voxel shift is involved.

So the pixel matrix of slice ``k`` (``Rows × Columns``) is ``volume[:, :, k].T``
(:func:`slice_pixels`), ``Columns`` is the size of ``i`` and ``Rows`` the size of ``j``.
PixelSpacing is ``[row spacing, column spacing]`` = ``[|a_j|, |a_i|]``, where ``a_i``, ``a_j``,
``a_k`` are the affine's columns.

DICOM's patient frame is LPS (x to the patient's left, y posterior, z superior); RAS+ flips the
signs of x and y. Nothing else differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

_RAS_LPS = np.array([-1.0, -1.0, 1.0])
"""Element-wise factor that converts a vector from RAS to LPS (and back)."""


def ras_to_lps(v: ArrayLike) -> NDArray[np.float64]:
    """Convert a point or vector (last axis of length 3) from RAS+ to DICOM LPS; its own inverse."""
    return np.asarray(v, dtype=np.float64) * _RAS_LPS


lps_to_ras = ras_to_lps


@dataclass(frozen=True)
class PlaneGeometry:
    """DICOM geometry of a stack of parallel slices, all values in LPS millimetres.

    Attributes:
        orientation: ImageOrientationPatient, six direction cosines (row, then column direction).
        positions: ``[n_slices, 3]`` ImagePositionPatient of each slice ``k``.
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)`` = ``(|a_j|, |a_i|)``.
        slice_spacing: distance between adjacent slice planes along the normal; written as both
            SliceThickness and SpacingBetweenSlices (contiguous 3D slabs have no gap).
    """

    orientation: tuple[float, float, float, float, float, float]
    positions: NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    @property
    def normal(self) -> NDArray[np.float64]:
        """Slice normal in LPS: row cosine × column cosine."""
        return slice_normal(self.orientation)


def slice_normal(orientation: Sequence[float]) -> NDArray[np.float64]:
    """Unit normal (LPS) of the plane given by an ImageOrientationPatient: row × column."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    return n / np.linalg.norm(n)


def plane_geometry(affine: ArrayLike, n_slices: int, ortho_tol: float = 1e-6) -> PlaneGeometry:
    """DICOM plane geometry of every slice ``k < n_slices`` of a voxel-to-RAS affine.

    Raises ValueError when the in-plane axes ``a_i`` and ``a_j`` are not orthogonal (DICOM's
    rows and columns always are). The slice axis may be oblique to the plane; slice positions
    then carry the shear, and ``slice_spacing`` is the distance along the normal.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError("affine must be 4×4")
    cols = ras_to_lps(a[:3, :3].T)  # rows of this array: a_i, a_j, a_k in LPS
    sizes = np.linalg.norm(cols, axis=1)
    if np.any(sizes <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    row_cos, col_cos = cols[0] / sizes[0], cols[1] / sizes[1]
    if abs(float(row_cos @ col_cos)) > ortho_tol:
        raise ValueError("the affine's i and j axes are not orthogonal: not a DICOM image plane")
    orientation = (*(float(x) for x in row_cos), *(float(x) for x in col_cos))
    origin = ras_to_lps(a[:3, 3])
    positions = origin + np.arange(n_slices, dtype=np.float64)[:, None] * cols[2]
    spacing = abs(float(cols[2] @ slice_normal(orientation)))
    return PlaneGeometry(
        orientation=orientation,  # type: ignore[arg-type]
        positions=positions,
        pixel_spacing=(float(sizes[1]), float(sizes[0])),
        slice_spacing=spacing,
    )


def affine_from_slices(
    orientations: Sequence[Sequence[float]],
    positions: Sequence[Sequence[float]],
    pixel_spacing: Sequence[float],
    slice_spacing: float | None = None,
    tol_mm: float = 1e-3,
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Voxel-to-RAS affine of a stack of slices, and the slice order along the normal.

    Args:
        orientations: ImageOrientationPatient of each slice (all must agree).
        positions: ImagePositionPatient of each slice, in any order. Each position must appear
            once: split echoes and magnitude/phase before calling.
        pixel_spacing: PixelSpacing ``[row spacing, column spacing]``.
        slice_spacing: spacing along the normal; needed only for a single slice (otherwise
            the positions define the slice axis, shear included).
        tol_mm: tolerance for orientations, duplicate positions and irregular spacing.

    Returns:
        ``(affine, order)``: ``order[k]`` is the index (into the inputs) of volume slice ``k``.
        Slices are sorted by ascending position along the normal (row × column), so ``a_k``
        points along the normal. Writing a volume whose ``a_k`` already does so and reading it
        back returns its affine exactly (to DS precision).

    Raises:
        ValueError: inconsistent orientations, duplicate positions or irregular spacing.
    """
    ori = np.asarray(orientations, dtype=np.float64).reshape(-1, 6)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(ori) != len(pos) or len(pos) == 0:
        raise ValueError("need one orientation per position and at least one slice")
    if np.abs(ori - ori[0]).max() > tol_mm:
        raise ValueError("slices have different ImageOrientationPatient")
    row_cos = ori[0, :3] / np.linalg.norm(ori[0, :3])
    col_cos = ori[0, 3:] / np.linalg.norm(ori[0, 3:])
    normal = slice_normal(ori[0])
    order = np.argsort(pos @ normal, kind="stable")
    pos = pos[order]
    n = len(pos)
    if n == 1:
        if slice_spacing is None:
            raise ValueError("a single slice needs slice_spacing")
        step = normal * float(slice_spacing)
    else:
        gaps = np.diff(pos @ normal)
        if gaps.min() < tol_mm:
            raise ValueError("two slices share a position: split echoes/parts first")
        step = (pos[-1] - pos[0]) / (n - 1)
        expected = pos[0] + np.arange(n)[:, None] * step
        worst = float(np.abs(pos - expected).max())
        if worst > tol_mm:
            raise ValueError(f"slices are not evenly spaced (off by up to {worst:.4g} mm)")
    row_spacing, col_spacing = (float(x) for x in pixel_spacing)
    affine = np.eye(4)
    affine[:3, 0] = lps_to_ras(row_cos * col_spacing)
    affine[:3, 1] = lps_to_ras(col_cos * row_spacing)
    affine[:3, 2] = lps_to_ras(step)
    affine[:3, 3] = lps_to_ras(pos[0])
    return affine, order


def slice_pixels(volume: NDArray, k: int) -> NDArray:
    """The ``Rows × Columns`` pixel matrix of slice ``k`` of an ``[i, j, k, ...]`` volume."""
    return np.swapaxes(volume[:, :, k], 0, 1)


def frame_stack(volume: NDArray) -> NDArray:
    """All slices of an ``[i, j, k]`` volume as one contiguous ``[k, Rows, Columns]`` array:
    ``frame_stack(v)[k]`` equals ``slice_pixels(v, k)``."""
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))


def volume_from_frames(frames: Sequence[NDArray]) -> NDArray:
    """Stack ``Rows × Columns`` pixel matrices (already in slice order) into an ``[i, j, k]``
    volume: the inverse of :func:`slice_pixels`."""
    return np.stack([np.swapaxes(np.asarray(f), 0, 1) for f in frames], axis=2)
