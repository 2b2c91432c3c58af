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


def run_simulation(args: argparse.Namespace) -> int:
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
    if args.send:
        from qsmnode.node.storescu import StoreError, send_files

        host, port = args.send
        try:
            report = send_files(written["dicom"], host, port, args.called_ae, args.calling_ae)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        failed = {p: s for p, s in report.statuses.items() if s != 0}
        resumed = (f" ({report.associations} associations: resumed after a lost one)"
                   if report.associations > 1 else "")
        print(f"sent {len(report.statuses) - len(failed)} of {len(written['dicom'])} "
              f"instances to {args.called_ae}@{host}:{port}{resumed}")
        for path, status in failed.items():
            print(f"error: {path}: status 0x{status:04X}", file=sys.stderr)
        for path, reason in report.errors.items():
            print(f"error: {path}: {reason}", file=sys.stderr)
        return 0 if report.ok else 1
    return 0

