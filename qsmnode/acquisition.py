"""A multi-echo GRE acquisition as plain arrays: the type passed between layers.

Conventions (DESIGN.md): volumes are indexed ``[i, j, k]`` with echo last, the affine maps
voxel indices to RAS+ millimetres, and the B0 direction is a unit vector in voxel-index space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

GAMMA_BAR_HZ_PER_T = 42.577478e6
"""Proton gyromagnetic ratio over 2π, in Hz/T."""


def voxel_size_mm(affine: NDArray[np.floating]) -> NDArray[np.float64]:
    """Voxel edge lengths (mm) from a 4×4 voxel-to-RAS affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def direction_cosines(affine: NDArray[np.floating]) -> NDArray[np.float64]:
    """The 3×3 rotation whose columns are the voxel axes as RAS unit vectors."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return a / voxel_size_mm(affine)


def b0_direction(affine: NDArray[np.floating]) -> NDArray[np.float64]:
    """B0 (the scanner's superior axis, RAS z) as a unit vector in voxel-index space.

    ``b = R.T @ (0, 0, 1)`` with R the direction cosines. It is never assumed to lie along k.
    """
    b = direction_cosines(affine).T @ np.array([0.0, 0.0, 1.0])
    return b / np.linalg.norm(b)


@dataclass(frozen=True)
class MultiEchoGRE:
    """Magnitude and wrapped phase of every echo on one voxel grid.

    Attributes:
        magnitude: ``[i, j, k, echo]`` float32, arbitrary units.
        phase: ``[i, j, k, echo]`` float32, radians, wrapped to [-π, π).
        echo_times_s: echo times in seconds, ascending.
        affine: 4×4 voxel-to-RAS+ affine in mm.
        field_strength_t: B0 in tesla.
    """

    magnitude: NDArray[np.float32]
    phase: NDArray[np.float32]
    echo_times_s: tuple[float, ...]
    affine: NDArray[np.float64]
    field_strength_t: float

    def __post_init__(self) -> None:
        if self.magnitude.ndim != 4 or self.magnitude.shape != self.phase.shape:
            raise ValueError(
                f"magnitude {self.magnitude.shape} and phase {self.phase.shape} must be the same "
                "4-D shape [i, j, k, echo]"
            )
        if self.magnitude.shape[3] != len(self.echo_times_s):
            raise ValueError(
                f"{self.magnitude.shape[3]} echoes in the arrays but "
                f"{len(self.echo_times_s)} echo times"
            )
        if np.asarray(self.affine).shape != (4, 4):
            raise ValueError("affine must be 4×4")

    @property
    def shape(self) -> tuple[int, int, int]:
        i, j, k, _ = self.magnitude.shape
        return (i, j, k)

    @property
    def n_echoes(self) -> int:
        return len(self.echo_times_s)

    @property
    def voxel_size_mm(self) -> NDArray[np.float64]:
        return voxel_size_mm(self.affine)

    @property
    def b0_direction(self) -> NDArray[np.float64]:
        return b0_direction(self.affine)

    @property
    def imaging_frequency_hz(self) -> float:
        return GAMMA_BAR_HZ_PER_T * self.field_strength_t
