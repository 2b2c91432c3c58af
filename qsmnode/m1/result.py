"""What the M1 analysis returns, and what the derived-DICOM builders turn into SEG, SR and key
images.

Areas are Penfield's hand and foot areas of M1 in each hemisphere; layers are thirds of
cortical depth, deep being next to white matter (Costagli et al. 2016, Cosottini et al. 2016).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

AREAS: Final = ("left_hand", "right_hand", "left_foot", "right_foot")
LAYERS: Final = ("deep", "middle", "superficial")


def segment_label(area: str, layer: str) -> int:
    """The label value of an (area, layer) in ``M1Result.labels``: 1..12, area-major."""
    return AREAS.index(area) * len(LAYERS) + LAYERS.index(layer) + 1


def segment_of(label: int) -> tuple[str, str]:
    """The (area, layer) of a label value 1..12."""
    area, layer = divmod(int(label) - 1, len(LAYERS))
    return AREAS[area], LAYERS[layer]


@dataclass(frozen=True)
class Measurement:
    """One area and layer (``layer`` "all" for the whole cortical thickness of the area).

    ``covered`` is False when the slab does not cover the area well enough to measure it;
    the numbers are then NaN and ``voxel_count`` says how little there was.
    """

    area: str
    layer: str
    voxel_count: int
    covered: bool
    chi_mean_ppm: float
    chi_sd_ppm: float
    chi_median_ppm: float
    t2star_signal_ratio: float
    """T2*-weighted combined magnitude relative to the reference tissue (see the analysis)."""
    r2star_mean_per_s: float
    thickness_mean_mm: float
    chi_z: float | None = None
    """z-score against a configured normative table; None without one."""
    core_voxel_count: int | None = None
    """Voxels the statistics come from: the region's core, away from the area's edges
    (``qsmnode.m1.measure``); ``voxel_count`` is the whole region's."""
    t2star_signal_ratio_z: float | None = None


@dataclass(frozen=True)
class QualityFlag:
    """A quality-control result for the report: a figure, whether it passed, and why."""

    name: str
    passed: bool
    value: float | None
    text: str


RELIABILITY_CHECKS = ("registration_nmi", "registration_mask", "registration_areas",
                      "segmentation_gm_wm_ratio", "cortical_thickness", "t1w_laterality")
"""The quality flags the M1 measures rest on: when one fails (a misregistration, a
segmentation that found no cortex, non-brain input such as a phantom sphere, a GRE mirrored
left-right with respect to its same-session T1w), the measures are not reliable. Coverage is
not among them: an area out of view is reported "not covered"."""
RELIABILITY_FLAG = "m1_measures_reliable"
"""The flag that says the M1 measures are not reliable, and why (present only then)."""


def unreliable_because(flags: tuple[QualityFlag, ...] | list[QualityFlag]) -> list[str]:
    """The names of the failed :data:`RELIABILITY_CHECKS` (empty: the measures are reliable)."""
    return [f.name for f in flags if f.name in RELIABILITY_CHECKS and not f.passed]


@dataclass(frozen=True)
class M1Result:
    """The M1 analysis of one acquisition, on its voxel grid.

    Attributes:
        labels: uint8 ``[i, j, k]``, 0 outside, else ``segment_label(area, layer)``.
        depth: float32 normalised cortical depth, 0 at the pial surface and 1 at white matter,
            NaN outside cortex.
        thickness_mm: float32 cortical thickness, NaN outside cortex.
        measurements: per area and layer (and "all").
        flags: registration quality, coverage per area, segmentation sanity.
        t1w_not_used: why a same-session T1w given to the analysis was not what it registered
            ("" when it was, or when none was given).
    """

    labels: NDArray[np.uint8]
    depth: NDArray[np.float32]
    thickness_mm: NDArray[np.float32]
    measurements: tuple[Measurement, ...]
    flags: tuple[QualityFlag, ...]
    t1w_not_used: str = ""

    def measurement(self, area: str, layer: str) -> Measurement:
        for m in self.measurements:
            if m.area == area and m.layer == layer:
                return m
        raise KeyError(f"no measurement for {area}/{layer}")

    def beyond_z(self, limit: float) -> list[Measurement]:
        """Covered measurements whose χ z-score is at or beyond ``±limit``."""
        return [m for m in self.measurements
                if m.covered and m.chi_z is not None and abs(m.chi_z) >= limit]

    def deep_asymmetry(self, measure: str = "chi_mean_ppm") -> tuple[str, float, float] | None:
        """``(limb, left, right)`` values of ``measure`` (a :class:`Measurement` field; χ mean
        in ppm by default) for the limb ("hand" or "foot") whose deep layers differ most
        between the hemispheres, among limbs covered on both sides with finite values; None
        when no limb is."""
        best: tuple[str, float, float] | None = None
        for limb in ("hand", "foot"):
            try:
                left = self.measurement(f"left_{limb}", "deep")
                right = self.measurement(f"right_{limb}", "deep")
            except KeyError:
                continue
            pair = (limb, float(getattr(left, measure)), float(getattr(right, measure)))
            if not (left.covered and right.covered and math.isfinite(pair[1])
                    and math.isfinite(pair[2])):
                continue
            if best is None or abs(pair[1] - pair[2]) > abs(best[1] - best[2]):
                best = pair
        return best
