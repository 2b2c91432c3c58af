"""The `simulate` and `demo` commands: simulate a study, write it, show it, send it."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from qsmnode.dicom.nifti import write_megre
from qsmnode.sim.phantom import PhantomParams
from qsmnode.sim.scanner import Simulation, preset, simulate
from qsmnode.sim.truth import write_truth
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom


def write_study(sim: Simulation, out: Path, style: str, seed: int) -> dict[str, list[Path]]:
    """Write the DICOM study, the truth and the BIDS MEGRE NIfTI under ``out``."""
    return {
        "dicom": write_dicom(sim.gre, out / "dicom", style, SimStudyInfo(seed=seed)),
        "truth": write_truth(sim, out / "truth"),
        "nifti": write_megre(sim.gre, out / "nifti"),
    }


def run_simulation(args: argparse.Namespace) -> list[Path] | int:
    """Simulate and write the study; the DICOM files written, or an exit code on bad use."""
    overrides: dict[str, object] = {"seed": args.seed}
    if args.snr is not None:
        overrides["snr"] = args.snr
    scan = preset(args.size, **overrides)
    phantom = PhantomParams(als_delta_chi_ppm=dict(args.als))
    out = args.out
    if out is None:
        if not args.send:
            print("error: give --out DIR, --send HOST:PORT, or both", file=sys.stderr)
            return 2
        out = Path(tempfile.mkdtemp(prefix="qsmnode-sim-"))
    sim = simulate(scan, phantom)
    written = write_study(sim, out, args.style, args.seed)
    for kind, paths in written.items():
        print(f"{kind}: {len(paths)} files in {out / kind}")
    return written["dicom"]

