"""Test helpers for the derived-DICOM builders: an M1 result from the simulator's ground truth,
and the Debian validators."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from qsmnode.m1.result import AREAS, LAYERS, M1Result, Measurement, QualityFlag, segment_label
from qsmnode.sim.phantom import M1_AREA_NAMES, DepthBin
from qsmnode.sim.scanner import Simulation

_BINS = {"deep": DepthBin.DEEP, "middle": DepthBin.MIDDLE, "superficial": DepthBin.SUPERFICIAL}
NAN = float("nan")


def truth_labels(sim: Simulation) -> np.ndarray:
    """``M1Result.labels`` from the truth M1 areas and depth bins."""
    t = sim.truth
    labels = np.zeros(t.m1_areas.shape, dtype=np.uint8)
    for area in AREAS:
        for layer in LAYERS:
            mask = (t.m1_areas == M1_AREA_NAMES[area]) & (t.depth_bins == _BINS[layer])
            labels[mask] = segment_label(area, layer)
    return labels


def _measure(
    sim: Simulation, area: str, layer: str, mask: np.ndarray, min_voxels: int
) -> Measurement:
    t = sim.truth
    n = int(mask.sum())
    if n < min_voxels:
        return Measurement(area, layer, n, False, NAN, NAN, NAN, NAN, NAN, NAN)
    chi = t.chi_ppm[mask].astype(np.float64)
    magnitude = sim.gre.magnitude[..., -1]
    reference = float(magnitude[t.depth_bins > 0].mean())
    z = float((chi.mean() - 0.015) / 0.01) if area.endswith("hand") else None
    return Measurement(
        area=area,
        layer=layer,
        voxel_count=n,
        covered=True,
        chi_mean_ppm=float(chi.mean()),
        chi_sd_ppm=float(chi.std()),
        chi_median_ppm=float(np.median(chi)),
        t2star_signal_ratio=float(magnitude[mask].mean()) / reference,
        r2star_mean_per_s=float(t.r2star_per_s[mask].mean()),
        thickness_mean_mm=float(t.thickness_mm[mask].mean()),
        chi_z=z,
        t2star_signal_ratio_z=None if z is None else -z / 2,
    )


def m1_from_truth(
    sim: Simulation, only: tuple[str, str] | None = None, min_voxels: int = 3
) -> M1Result:
    """An M1 result whose labels and measurements are the truth's; ``only`` keeps one region
    (a single-segment SEG). Regions with fewer than ``min_voxels`` voxels are "not covered"."""
    t = sim.truth
    labels = truth_labels(sim)
    if only is not None:
        labels[labels != segment_label(*only)] = 0
    measurements = []
    for area in AREAS:
        for layer in LAYERS:
            mask = labels == segment_label(area, layer)
            measurements.append(_measure(sim, area, layer, mask, min_voxels))
        in_area = (labels > 0) & (t.m1_areas == M1_AREA_NAMES[area])
        measurements.append(_measure(sim, area, "all", in_area, min_voxels))
    depth = np.where(t.cortical_depth >= 0, t.cortical_depth, np.nan).astype(np.float32)
    thickness = np.where(t.depth_bins > 0, t.thickness_mm, np.nan).astype(np.float32)
    flags = (
        QualityFlag("registration", True, 0.87, "registration NCC 0.87 >= 0.5"),
        QualityFlag("coverage", all(m.covered for m in measurements), None, "all areas covered"),
    )
    return M1Result(labels, depth, thickness, tuple(measurements), flags)


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for one file."""
    out = run(["dciodvfy", str(path)])
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def dciodvfy_warnings(path: Path) -> list[str]:
    out = run(["dciodvfy", str(path)])
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Warning")]


def m1_blocks(shape: tuple[int, int, int], chi_ppm: np.ndarray) -> M1Result:
    """An M1 result on any grid (a real sample's): each area and layer a small block of voxels
    around the centre, measured on ``chi_ppm``. For building and validating the SEG and SR of
    real data, not for their values."""
    labels = np.zeros(shape, dtype=np.uint8)
    ci, cj, ck = (n // 2 for n in shape)
    measurements = []
    for a, area in enumerate(AREAS):
        for li, layer in enumerate(LAYERS):
            i0, j0 = ci - 8 + 4 * a, cj - 6 + 4 * li
            labels[i0:i0 + 3, j0:j0 + 3, max(ck - 1, 0):ck + 2] = segment_label(area, layer)
        for layer in (*LAYERS, "all"):
            mask = ((labels > 0) & np.isin(labels, [segment_label(area, x) for x in LAYERS])
                    if layer == "all" else labels == segment_label(area, layer))
            chi = chi_ppm[mask].astype(np.float64)
            measurements.append(Measurement(
                area, layer, int(mask.sum()), True, float(chi.mean()), float(chi.std()),
                float(np.median(chi)), 1.0, 30.0, 2.5))
    depth = np.where(labels > 0, 0.5, np.nan).astype(np.float32)
    thickness = np.where(labels > 0, 2.5, np.nan).astype(np.float32)
    flags = (QualityFlag("registration", True, None, "registration not checked (test)"),)
    return M1Result(labels, depth, thickness, tuple(measurements), flags)
