"""Write a simulation's ground truth next to its data, as NIfTI plus a JSON legend."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from qsmnode.dicom.nifti import write_nifti
from qsmnode.sim.phantom import DepthBin, M1Area, Tissue
from qsmnode.sim.scanner import Simulation, Truth

_UNITS = {
    "chi_ppm": "ppm (relative to water)",
    "total_field_ppm": "ppm of B0 (after the scanner's shim)",
    "local_field_ppm": "ppm of B0, field of the χ inside the brain mask",
    "brain_mask": "1 = brain and CSF",
    "labels": "tissue label",
    "cortical_depth": "0 at pial surface, 1 at white matter, -1 outside cortex",
    "depth_bins": "depth bin label",
    "thickness_mm": "mm",
    "m1_areas": "M1 area label",
    "r2star_per_s": "1/s",
    "phase_offset_rad": "rad",
}


def write_truth(sim: Simulation, out_dir: Path) -> list[Path]:
    """Write every truth volume as ``<name>.nii.gz`` and ``truth.json`` with the legends."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in fields(Truth):
        volume = getattr(sim.truth, f.name)
        if volume.dtype == bool:
            volume = volume.astype(np.uint8)
        written.append(write_nifti(volume, sim.gre.affine, out_dir / f"{f.name}.nii.gz"))
    legend = {
        "units": _UNITS,
        "labels": {t.name.lower(): int(t) for t in Tissue},
        "m1_areas": {a.name.lower(): int(a) for a in M1Area},
        "depth_bins": {b.name.lower(): int(b) for b in DepthBin},
        "echo_times_s": list(sim.gre.echo_times_s),
        "field_strength_t": sim.gre.field_strength_t,
        "b0_direction_voxel": sim.gre.b0_direction.tolist(),
        "scan": asdict(sim.scan),
        "als_delta_chi_ppm": dict(sim.phantom.als_delta_chi_ppm),
    }
    path = out_dir / "truth.json"
    path.write_text(json.dumps(legend, indent=2) + "\n")
    written.append(path)
    return written
