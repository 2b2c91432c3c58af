"""Measurements of the M1 areas per cortical layer, coverage, z-scores and quality flags.

For each area (``AREAS``) and layer (``LAYERS`` and "all") the region is the area's cortex
inside the field of view, split by depth bin (thirds of depth, deep next to white matter).
Per region: χ mean, SD and median, the T2*-weighted signal ratio, R2* mean, thickness mean
and voxel count (Costagli et al. 2016 measured χ per layer of M1; Cosottini et al. 2016 read
the T2*-weighted hypointensity of its deep layers).

**T2*-weighted signal ratio.** The mean combined magnitude of the region over a reference:
the median magnitude of all cortex in the slab *at the same depth bin* (all depths for
"all") outside the four measured areas. Matching the depth cancels the depth-dependent
partial volume with CSF (superficial) and white matter (deep); leaving the measured areas out
keeps the disease out of its own reference (ALS darkens deep M1); the median ignores veins and
outliers. The magnitude must be corrected for the receive bias first (``Segmentation.
corrected_magnitude``): the reference is slab-wide, so a residual bias would enter the ratio.
A normal area reads about 1 and a hypointense deep layer below 1. Local alternatives were
set aside: the same area's superficial layer is itself partial-volumed with CSF and pial
veins and would always read 1, and subjacent white matter changes in ALS too.

**Area cores.** The statistics (χ, signal ratio, R2*, thickness) of an area use its *core*:
the region minus the cortex within ``boundary_margin_mm`` (geodesic, through cortex) of
cortex outside the area: ROI erosion against the registration's error at the area's edges.
An edge misplaced by δ puts a band of neighbouring cortex about δ wide into the area, and in
a disease-affected area that band dilutes the change (measured on the anatomy phantom: the
registration places the areas to about 1.2 mm, and the whole-area deep-layer mean lost
20-30% of a +0.04 ppm change; the core lost 10-20%). Distances run through cortex, so the
other bank of a sulcus (across a thin CSF sheet) is far, unlike a Euclidean erosion. The
voxel count (and the SEG) stay those of the whole region; where the core is smaller than
the coverage minimum, the whole region is used.

**Coverage.** An area is "not covered" (``covered=False``, numbers NaN) when its measured
cortex volume inside the field of view is below ``min_volume_mm3`` (default 20 mm³), or when
the slab clips it: the fraction of the area's expected volume inside the field of view is
below ``min_fov_fraction`` (default 0.5). The expected volume is either given per area
(e.g. the atlas label's volume times the Jacobian of the registration) or, by default, the
volume of the area label itself, which for this purpose must be warped onto a grid that
reaches beyond the field of view (the field-of-view mask says which voxels were acquired).
A layer of a covered area is covered when it holds at least a third of ``min_volume_mm3``.

No file reading here: the normative table arrives as a mapping (the edge reads the TOML).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from qsmnode.m1.layers import DEEP, MIDDLE, SUPERFICIAL, depth_bins
from qsmnode.m1.result import AREAS, LAYERS, Measurement, QualityFlag, segment_label

F32 = NDArray[np.float32]
Mask = NDArray[np.bool_]

ALL_LAYERS: Final = (*LAYERS, "all")
SIGNAL_RATIO_REFERENCE: Final = "cortex-same-depth-outside-measured-areas"
"""Identifier of the T2*-weighted signal ratio's reference (see the module docstring); a
normative table must name the same one."""
NORMATIVE_SCHEMA: Final = 1
_BIN_OF_LAYER: Final = MappingProxyType({"deep": DEEP, "middle": MIDDLE,
                                         "superficial": SUPERFICIAL})


@dataclass(frozen=True)
class NormativeValue:
    """Normative mean and SD of one area and layer (the ratio's may be absent)."""

    chi_mean_ppm: float
    chi_sd_ppm: float
    t2star_signal_ratio_mean: float | None = None
    t2star_signal_ratio_sd: float | None = None


@dataclass(frozen=True)
class NormativeTable:
    """Normative values per (area, layer), for z-scores.

    The numbers only make sense for the same protocol, QSM pipeline (χ reference), depth
    method and signal-ratio reference; the table records them and ``measure_m1`` checks the
    depth method and signal-ratio reference.
    """

    values: Mapping[tuple[str, str], NormativeValue]
    description: str = ""
    placeholder: bool = False
    """True for the shipped example: its numbers are not clinical."""
    depth_method: str = "equivolume"
    chi_reference: str = ""
    t2star_signal_ratio_reference: str = SIGNAL_RATIO_REFERENCE

    def get(self, area: str, layer: str) -> NormativeValue | None:
        return self.values.get((area, layer))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> NormativeTable:
        """Validate a parsed table (e.g. ``tomllib.load`` of ``m1_normative.example.toml``).

        Raises ValueError, naming the offending key, for an unknown schema, area, layer or
        field, a non-finite number, an SD that is not positive, or a signal-ratio reference
        other than ``SIGNAL_RATIO_REFERENCE``.
        """
        if not isinstance(data, Mapping):
            raise ValueError("normative table: expected a mapping")
        known = {"schema", "description", "placeholder", "depth_method", "chi_reference",
                 "t2star_signal_ratio_reference", "areas"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"normative table: unknown keys {sorted(unknown)}")
        if data.get("schema") != NORMATIVE_SCHEMA:
            raise ValueError(
                f"normative table: schema must be {NORMATIVE_SCHEMA}, got {data.get('schema')!r}"
            )
        ref = data.get("t2star_signal_ratio_reference", SIGNAL_RATIO_REFERENCE)
        if ref != SIGNAL_RATIO_REFERENCE:
            raise ValueError(
                f"normative table: t2star_signal_ratio_reference {ref!r} is not the one this "
                f"analysis computes ({SIGNAL_RATIO_REFERENCE!r})"
            )
        depth_method = data.get("depth_method", "equivolume")
        if depth_method not in ("equivolume", "equidistant"):
            raise ValueError(f"normative table: unknown depth_method {depth_method!r}")
        areas = data.get("areas", {})
        if not isinstance(areas, Mapping):
            raise ValueError("normative table: 'areas' must be a table of areas")
        values: dict[tuple[str, str], NormativeValue] = {}
        for area, layers in areas.items():
            if area not in AREAS:
                raise ValueError(f"normative table: unknown area {area!r}; use {list(AREAS)}")
            if not isinstance(layers, Mapping):
                raise ValueError(f"normative table: areas.{area} must be a table of layers")
            for layer, entry in layers.items():
                where = f"areas.{area}.{layer}"
                if layer not in ALL_LAYERS:
                    raise ValueError(
                        f"normative table: unknown layer {where}; use {list(ALL_LAYERS)}")
                values[(area, layer)] = _normative_value(entry, where)
        return cls(
            values=MappingProxyType(values),
            description=str(data.get("description", "")),
            placeholder=bool(data.get("placeholder", False)),
            depth_method=depth_method,
            chi_reference=str(data.get("chi_reference", "")),
            t2star_signal_ratio_reference=ref,
        )


def _normative_value(entry: Any, where: str) -> NormativeValue:
    if not isinstance(entry, Mapping):
        raise ValueError(f"normative table: {where} must be a table")
    fields = ("chi_mean_ppm", "chi_sd_ppm", "t2star_signal_ratio_mean",
              "t2star_signal_ratio_sd")
    unknown = set(entry) - set(fields)
    if unknown:
        raise ValueError(f"normative table: unknown fields {sorted(unknown)} in {where}")
    nums: dict[str, float | None] = {}
    for name in fields:
        v = entry.get(name)
        if v is None:
            nums[name] = None
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"normative table: {where}.{name} must be a finite number")
        nums[name] = float(v)
    if nums["chi_mean_ppm"] is None or nums["chi_sd_ppm"] is None:
        raise ValueError(f"normative table: {where} needs chi_mean_ppm and chi_sd_ppm")
    if (nums["t2star_signal_ratio_mean"] is None) != (nums["t2star_signal_ratio_sd"] is None):
        raise ValueError(
            f"normative table: {where} needs both t2star_signal_ratio_mean and _sd, or neither")
    for name in ("chi_sd_ppm", "t2star_signal_ratio_sd"):
        if nums[name] is not None and nums[name] <= 0:
            raise ValueError(f"normative table: {where}.{name} must be positive")
    return NormativeValue(**nums)


@dataclass(frozen=True)
class AreaCoverage:
    """How well the slab covers one area."""

    area: str
    volume_mm3: float
    """Measured cortex of the area inside the field of view."""
    fov_fraction: float
    """Fraction of the area's expected volume inside the field of view (0 when unknown)."""
    covered: bool
    reason: str


def _voxel_volume(voxel_size_mm: Sequence[float] | NDArray[np.floating]) -> float:
    h = np.asarray(voxel_size_mm, dtype=np.float64)
    if h.shape != (3,) or np.any(h <= 0):
        raise ValueError("voxel_size_mm must be three positive lengths")
    return float(np.prod(h))


def _cortex_in_view(cortex: Mask, depth: F32, fov: Mask | None) -> Mask:
    m = np.asarray(cortex, dtype=bool) & np.isfinite(depth)
    if fov is not None:
        m &= np.asarray(fov, dtype=bool)
    return m


def area_coverage(
    areas: NDArray[np.integer],
    cortex: Mask,
    depth: F32,
    voxel_size_mm: Sequence[float] | NDArray[np.floating],
    *,
    fov: Mask | None = None,
    expected_volume_mm3: Mapping[str, float] | None = None,
    min_volume_mm3: float = 20.0,
    min_fov_fraction: float = 0.5,
) -> dict[str, AreaCoverage]:
    """Coverage of each area (the rule is in the module docstring).

    Args:
        areas: area label per voxel, ``AREAS.index(area) + 1`` (0 elsewhere); the warped
            atlas areas, not necessarily intersected with cortex.
        cortex: cortical grey matter.
        depth: cortical depth, NaN where undefined (those voxels are not measured).
        fov: voxels inside the acquired field of view (default: all).
        expected_volume_mm3: per area, its expected volume in this subject (mm³); default
            the volume of ``areas`` itself.
    """
    vox = _voxel_volume(voxel_size_mm)
    areas = np.asarray(areas)
    in_fov = np.ones(areas.shape, dtype=bool) if fov is None else np.asarray(fov, dtype=bool)
    measured = _cortex_in_view(cortex, depth, fov)
    label_all = np.bincount(areas.ravel(), minlength=len(AREAS) + 1)
    label_in = np.bincount(areas[in_fov].ravel(), minlength=len(AREAS) + 1)
    cortex_in = np.bincount(areas[measured].ravel(), minlength=len(AREAS) + 1)
    out = {}
    for i, area in enumerate(AREAS, start=1):
        volume = float(cortex_in[i]) * vox
        if expected_volume_mm3 is not None and area in expected_volume_mm3:
            expected = float(expected_volume_mm3[area])
        else:
            expected = float(label_all[i]) * vox
        fraction = min(1.0, float(label_in[i]) * vox / expected) if expected > 0 else 0.0
        if expected <= 0:
            covered, reason = False, "the area is not in the label map"
        elif fraction < min_fov_fraction:
            covered, reason = False, (
                f"the slab covers {fraction:.0%} of the area (< {min_fov_fraction:.0%})")
        elif volume < min_volume_mm3:
            covered, reason = False, (
                f"{volume:.0f} mm³ of cortex in view (< {min_volume_mm3:.0f} mm³)")
        else:
            covered, reason = True, (
                f"{fraction:.0%} of the area in view, {volume:.0f} mm³ of cortex")
        out[area] = AreaCoverage(area, volume, fraction, covered, reason)
    return out


def region_labels(
    areas: NDArray[np.integer], cortex: Mask, depth: F32, fov: Mask | None = None
) -> NDArray[np.uint8]:
    """The ``M1Result.labels`` volume: ``segment_label(area, layer)`` on the areas' cortex
    inside the field of view, 0 elsewhere."""
    areas = np.asarray(areas)
    bins = depth_bins(np.where(_cortex_in_view(cortex, depth, fov), depth, np.nan))
    lut = np.zeros((len(AREAS) + 1, 4), dtype=np.uint8)
    for i, area in enumerate(AREAS, start=1):
        for layer, b in _BIN_OF_LAYER.items():
            lut[i, b] = segment_label(area, layer)
    valid = (areas >= 0) & (areas <= len(AREAS))
    return np.where(valid, lut[np.where(valid, areas, 0), bins], 0).astype(np.uint8)


def _z(value: float, mean: float | None, sd: float | None) -> float | None:
    if mean is None or sd is None or not math.isfinite(value):
        return None
    return (value - mean) / sd


def measure_m1(
    areas: NDArray[np.integer],
    cortex: Mask,
    depth: F32,
    thickness_mm: F32,
    chi_ppm: F32,
    r2star_per_s: F32,
    magnitude: F32,
    voxel_size_mm: Sequence[float] | NDArray[np.floating],
    *,
    fov: Mask | None = None,
    reference: Mask | None = None,
    expected_volume_mm3: Mapping[str, float] | None = None,
    normative: NormativeTable | None = None,
    depth_method: str = "equivolume",
    min_volume_mm3: float = 20.0,
    min_fov_fraction: float = 0.5,
    boundary_margin_mm: float = 1.5,
) -> tuple[Measurement, ...]:
    """Measure every area and layer (see the module docstring for the definitions).

    Args:
        areas: area label per voxel, ``AREAS.index(area) + 1`` (0 elsewhere).
        cortex: cortical grey matter (veins excluded).
        depth: cortical depth, 0 pial to 1 white matter, NaN outside cortex.
        thickness_mm: cortical thickness map.
        chi_ppm, r2star_per_s: the QSM engine's χ and R2* maps.
        magnitude: combined T2*-weighted magnitude, corrected for the receive bias.
        voxel_size_mm: voxel edge lengths.
        fov: voxels inside the acquired field of view (default all).
        reference: cortex for the signal ratio's reference (default: cortex outside the four
            areas); it is split by depth bin like the regions.
        expected_volume_mm3, min_volume_mm3, min_fov_fraction: the coverage rule.
        normative: the normative table for z-scores (None: no z-scores).
        depth_method: the depth method used, checked against the normative table's.
        boundary_margin_mm: width of the area edge left out of the statistics (0: none).

    Returns:
        ``Measurement`` per area and layer, areas in ``AREAS`` order, layers in ``LAYERS``
        order then "all".
    """
    shape = np.shape(areas)
    for name, arr in (("cortex", cortex), ("depth", depth), ("thickness_mm", thickness_mm),
                      ("chi_ppm", chi_ppm), ("r2star_per_s", r2star_per_s),
                      ("magnitude", magnitude)):
        if np.shape(arr) != shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}, areas {shape}")
    if normative is not None and normative.depth_method != depth_method:
        raise ValueError(
            f"the normative table is for {normative.depth_method} depth, the analysis used "
            f"{depth_method}"
        )
    vox = _voxel_volume(voxel_size_mm)
    areas = np.asarray(areas)
    coverage = area_coverage(areas, cortex, depth, voxel_size_mm, fov=fov,
                             expected_volume_mm3=expected_volume_mm3,
                             min_volume_mm3=min_volume_mm3, min_fov_fraction=min_fov_fraction)
    measured = _cortex_in_view(cortex, depth, fov)
    bins = depth_bins(np.where(measured, depth, np.nan))
    outside_areas = (areas < 1) | (areas > len(AREAS))
    ref = measured & outside_areas if reference is None else (
        np.asarray(reference, dtype=bool) & measured)
    mag = np.asarray(magnitude, dtype=np.float32)
    ref_level = {
        layer: _median_or_nan(mag[ref & (bins == b)]) for layer, b in _BIN_OF_LAYER.items()
    }
    ref_level["all"] = _median_or_nan(mag[ref])

    out = []
    for i, area in enumerate(AREAS, start=1):
        in_area = measured & (areas == i)
        core = area_core(in_area, measured, voxel_size_mm, boundary_margin_mm)
        for layer in ALL_LAYERS:
            in_layer = True if layer == "all" else bins == _BIN_OF_LAYER[layer]
            region = in_area & in_layer
            count = int(region.sum())
            need = min_volume_mm3 if layer == "all" else min_volume_mm3 / len(LAYERS)
            covered = coverage[area].covered and count * vox >= need and count >= 2
            inner = core & in_layer
            n_inner = int(inner.sum())
            if n_inner * vox >= need and n_inner >= 2:
                region = inner
            else:
                n_inner = count
            out.append(replace(_measure_region(
                area, layer, region, count, covered, chi_ppm, r2star_per_s, mag,
                thickness_mm, ref_level[layer],
                None if normative is None else normative.get(area, layer),
            ), core_voxel_count=n_inner))
    return tuple(out)


def area_core(
    area: Mask,
    cortex: Mask,
    voxel_size_mm: Sequence[float] | NDArray[np.floating],
    margin_mm: float,
) -> Mask:
    """The area minus its cortex within ``margin_mm`` of cortex outside it, the distance
    measured through cortex (a geodesic dilation: 6-neighbour steps, each axis stepping as
    often as its voxel size allows, a chamfer approximation of the distance)."""
    area = np.asarray(area, dtype=bool)
    if margin_mm <= 0 or not area.any():
        return area.copy()
    h = np.asarray(voxel_size_mm, dtype=np.float64)
    step = float(h.min())
    n = int(np.ceil(margin_mm / step - 1e-9))
    box = []
    for a in range(3):
        hit = np.flatnonzero(area.any(axis=tuple(b for b in range(3) if b != a)))
        box.append(slice(max(0, int(hit[0]) - n - 1), int(hit[-1]) + n + 2))
    box = tuple(box)
    sub_area, sub_cortex = area[box], np.asarray(cortex, dtype=bool)[box] | area[box]
    band = sub_cortex & ~sub_area
    for t in range(1, n + 1):
        grown = band.copy()
        for a in range(3):
            if np.floor(t * step / h[a] + 1e-6) > np.floor((t - 1) * step / h[a] + 1e-6):
                lo = [slice(None)] * 3
                hi = [slice(None)] * 3
                lo[a], hi[a] = slice(0, -1), slice(1, None)
                grown[tuple(lo)] |= band[tuple(hi)]
                grown[tuple(hi)] |= band[tuple(lo)]
        band = grown & sub_cortex
    core = area.copy()
    core[box] &= ~band
    return core


def _median_or_nan(values: NDArray[np.floating]) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size >= 10 else math.nan


def _measure_region(
    area: str,
    layer: str,
    region: Mask,
    count: int,
    covered: bool,
    chi: F32,
    r2star: F32,
    mag: F32,
    thickness: F32,
    ref_level: float,
    norm: NormativeValue | None,
) -> Measurement:
    if not covered:
        nan = math.nan
        return Measurement(area, layer, count, False, nan, nan, nan, nan, nan, nan)
    c = np.asarray(chi)[region].astype(np.float64)
    ratio = float(np.mean(mag[region], dtype=np.float64)) / ref_level if ref_level > 0 else (
        math.nan)
    has_chi = bool(np.isfinite(c).any())  # no χ where QSM was not computed: NaN
    chi_mean = float(np.nanmean(c)) if has_chi else math.nan
    th = np.asarray(thickness)[region]
    m = Measurement(
        area=area,
        layer=layer,
        voxel_count=count,
        covered=True,
        chi_mean_ppm=chi_mean,
        chi_sd_ppm=float(np.nanstd(c, ddof=1)) if has_chi else math.nan,
        chi_median_ppm=float(np.nanmedian(c)) if has_chi else math.nan,
        t2star_signal_ratio=ratio,
        r2star_mean_per_s=float(np.nanmean(np.asarray(r2star)[region], dtype=np.float64)),
        thickness_mean_mm=float(np.nanmean(th, dtype=np.float64)) if np.isfinite(th).any()
        else math.nan,
    )
    if norm is None:
        return m
    return replace(
        m,
        chi_z=_z(chi_mean, norm.chi_mean_ppm, norm.chi_sd_ppm),
        t2star_signal_ratio_z=_z(ratio, norm.t2star_signal_ratio_mean,
                                 norm.t2star_signal_ratio_sd),
    )


def quality_flags(
    coverage: Mapping[str, AreaCoverage],
    gm: Mask,
    wm: Mask,
    thickness_mm: F32,
    *,
    thickness_range_mm: tuple[float, float] = (1.5, 4.5),
    gm_wm_ratio_range: tuple[float, float] = (0.2, 5.0),
) -> tuple[QualityFlag, ...]:
    """Coverage per area and segmentation sanity checks, for the report.

    - ``coverage_<area>``: passed when covered; the value is the fraction in view.
    - ``segmentation_gm_wm_ratio``: grey- over white-matter volume in the slab. The range is
      wide on purpose: a vertex slab holds relatively more cortex than a whole brain (about
      1.2–1.5), and the check is there to catch a gross failure (one class swallowing
      another), not to grade anatomy.
    - ``cortical_thickness``: the median cortical thickness of the slab within the
      physiological range (1.5–4.5 mm in adults, Fischl & Dale, PNAS 2000;97:11050).
    """
    flags = [
        QualityFlag(f"coverage_{area}", c.covered, c.fov_fraction, c.reason)
        for area, c in ((a, coverage[a]) for a in AREAS if a in coverage)
    ]
    n_gm, n_wm = int(np.count_nonzero(gm)), int(np.count_nonzero(wm))
    ratio = n_gm / n_wm if n_wm else math.inf
    lo, hi = gm_wm_ratio_range
    ok = lo <= ratio <= hi
    flags.append(QualityFlag(
        "segmentation_gm_wm_ratio", ok, ratio if math.isfinite(ratio) else None,
        f"grey/white matter volume ratio {ratio:.2f} "
        + ("within" if ok else "outside") + f" {lo:g}–{hi:g}",
    ))
    th = np.asarray(thickness_mm)[np.asarray(gm, dtype=bool)]
    th = th[np.isfinite(th)]
    med = float(np.median(th)) if th.size else math.nan
    lo, hi = thickness_range_mm
    ok = bool(th.size) and lo <= med <= hi
    flags.append(QualityFlag(
        "cortical_thickness", ok, med if th.size else None,
        (f"median cortical thickness {med:.2f} mm " + ("within" if ok else "outside")
         + f" {lo:g}–{hi:g} mm") if th.size else "no cortical thickness measured",
    ))
    return tuple(flags)
