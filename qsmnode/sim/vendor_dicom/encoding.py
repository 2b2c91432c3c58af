"""Pixel encodings of the simulated scanner: magnitude and phase as 12-bit stored values, the
way Siemens and Philips write them (see :mod:`qsmnode.sim.vendor_dicom`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from qsmnode.acquisition import MultiEchoGRE
from qsmnode.dicom.geometry import frame_stack

STORED_MAX = 4095
"""Largest stored value (12 bits stored in 16 allocated)."""
SIEMENS_PHASE_SLOPE = 2.0
SIEMENS_PHASE_INTERCEPT = -4096.0
PHILIPS_PHASE_SLOPE_TEXT = "1.53455433455433"  # 6284 / 4095, as the real files write it
PHILIPS_PHASE_SLOPE = float(PHILIPS_PHASE_SLOPE_TEXT)
PHILIPS_PHASE_INTERCEPT = -3142.0


def magnitude_scale(gre: MultiEchoGRE) -> float:
    """Stored units per magnitude unit: ``4095 / max(magnitude)`` over all echoes (1 if zero)."""
    peak = float(np.max(gre.magnitude))
    return STORED_MAX / peak if peak > 0 and math.isfinite(peak) else 1.0


def encode_magnitude(magnitude: NDArray[np.floating], scale: float) -> NDArray[np.uint16]:
    """``round(magnitude * scale)`` clipped to 0..4095, as little-endian uint16."""
    stored = np.rint(np.asarray(magnitude, dtype=np.float64) * scale)
    return np.clip(stored, 0, STORED_MAX).astype("<u2")


def encode_phase_siemens(phase: NDArray[np.floating]) -> NDArray[np.uint16]:
    """Radians in [-π, π) to Siemens stored values: ``(2·stored - 4096)·π/4096 = phase``."""
    stored = np.rint((np.asarray(phase, dtype=np.float64) + np.pi) * (2048.0 / np.pi))
    return (stored.astype(np.int64) & 4095).astype("<u2")  # +π rounds to 4096 = -π


def encode_phase_philips(phase: NDArray[np.floating]) -> NDArray[np.uint16]:
    """Radians to Philips stored values: ``stored·1.53455 - 3142`` mrad = phase."""
    mrad = np.asarray(phase, dtype=np.float64) * 1000.0
    stored = np.rint((mrad - PHILIPS_PHASE_INTERCEPT) / PHILIPS_PHASE_SLOPE)
    return np.clip(stored, 0, STORED_MAX).astype("<u2")


def encode_echoes(
    volume: NDArray[np.floating], encode: Callable[[NDArray], NDArray[np.uint16]]
) -> list[NDArray[np.uint16]]:
    """Encode each echo of an ``[i, j, k, e]`` volume into a contiguous ``[k, Rows, Columns]``."""
    return [frame_stack(encode(volume[..., e])) for e in range(volume.shape[3])]
