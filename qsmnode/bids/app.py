"""``qsmnode qsm``: the single-folder form and the BIDS App form, as exit codes.

- ``qsmnode qsm DIR --out OUT``: one acquisition in one folder, plain file names (as before).
- ``qsmnode qsm BIDS_DIR OUTPUT_DIR participant [--participant-label …] [--session-label …]``:
  every MEGRE acquisition selected, as BIDS derivatives (``cluster``, ``derivatives``).
- ``qsmnode qsm BIDS_DIR OUTPUT_DIR group``: the cohort table and figures (``cohort``).

Exit codes: 0 done; 1 some acquisition failed (each named on stderr); 2 bad arguments or
input (a dataset without MEGRE, a bad label, an unreachable scheduler), named.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qsmnode.qsm import DEFAULT_METHOD


def error(text: str) -> None:
    """One ``error:`` line on stderr."""
    print(f"error: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Dispatch on the form of the command line (see the module docstring)."""
    from qsmnode.qsm.engine import METHODS

    if args.method not in METHODS:
        error(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
        return 2
    level = args.analysis_level
    if level is None:
        if args.output_dir is not None:
            error(f"{args.output_dir}: OUTPUT_DIR needs an analysis level after it: "
                  "participant or group")
            return 2
        if args.out is None:
            error("give --out DIR (one acquisition in a folder), or OUTPUT_DIR and an "
                  "analysis level, participant or group (a BIDS dataset)")
            return 2
        return single_folder(args.input, args.out, args.method)
    if args.out is not None:
        error("--out is for the single-folder form; the BIDS App form writes to OUTPUT_DIR")
        return 2
    if level == "participant":
        return participant(args)
    return group(args)


def single_folder(folder: Path, out: Path, method: str = DEFAULT_METHOD) -> int:
    """QSM of the one acquisition in ``folder`` with the named pipeline
    (:data:`qsmnode.qsm.engine.METHODS`); maps as ``out/<quantity>.nii.gz``."""
    from qsmnode.dicom.nifti import BidsError, read_megre, write_niftis
    from qsmnode.dicom.reference_data import brain_prior_for
    from qsmnode.qsm.engine import METHODS, run_qsm

    try:
        gre = read_megre(folder)
    except (BidsError, OSError) as exc:
        hint = ""
        if folder.is_dir() and any(folder.glob("sub-*")):
            hint = (" (this looks like a BIDS dataset: use `qsmnode qsm BIDS_DIR OUTPUT_DIR "
                    "participant`)")
        error(f"{exc}{hint}")
        return 2
    result = run_qsm(gre.magnitude, gre.phase, gre.echo_times_s, gre.voxel_size_mm,
                     gre.b0_direction, gre.field_strength_t, METHODS[method],
                     brain_prior=brain_prior_for(gre.affine))
    outputs = {
        "chi_ppm": (result.chi_ppm, "chi (ppm)"),
        "r2star_per_s": (result.r2star_per_s, "R2* (1/s)"),
        "t2star_s": (result.t2star_s, "T2* (s)"),
        "magnitude": (result.magnitude, "echo-combined magnitude (a.u.)"),
        "brain_mask": (result.mask.astype("uint8"), "brain mask"),
        "qsm_mask": (result.qsm_mask.astype("uint8"), "QSM mask"),
        "total_field_ppm": (result.total_field_ppm, "total field (ppm)"),
        "local_field_ppm": (result.local_field_ppm, "local field (ppm)"),
    }
    write_niftis([(volume, gre.affine, out / f"{name}.nii.gz", f"qsmnode: {what}")
                  for name, (volume, what) in outputs.items()])
    quality = {"method": method, **result.quality}  # "params": every setting of every step
    (out / "quality.json").write_text(json.dumps(quality, indent=2, default=str) + "\n")
    print(f"{len(outputs)} maps written to {out} "
          f"({gre.n_echoes} echoes, {gre.field_strength_t:g} T, shape {gre.shape})")
    return 0


def _check_normative(path: Path | None) -> bool:
    if path is None:
        return True
    from qsmnode.node.normative import NormativeTableError, read_normative_table

    try:
        read_normative_table(path)
    except NormativeTableError as exc:
        error(f"--normative {exc}")
        return False
    return True


def participant(args: argparse.Namespace) -> int:
    """The participant level: every acquisition selected, on Dask; 1 when one failed."""
    from qsmnode.bids.cluster import ClusterError, run_participants
    from qsmnode.bids.derivatives import Options, derivatives_root
    from qsmnode.bids.layout import LayoutError, describe, find_acquisitions

    try:
        layout = find_acquisitions(args.input, args.participant_label, args.session_label)
    except LayoutError as exc:
        error(str(exc))
        return 2
    for note in layout.passed_over:
        print(f"passed over: {note}", file=sys.stderr)
    if not _check_normative(args.normative):
        return 2
    if args.output_dir.resolve() == args.input.resolve():
        error(f"{args.output_dir}: OUTPUT_DIR must not be the BIDS dataset itself")
        return 2
    counts = describe(layout)
    print(f"{args.input}: {counts['acquisitions']} MEGRE acquisition(s) of "
          f"{counts['subjects']} subject(s), {counts['sessions']} session(s)")
    options = Options(m1=args.m1, normative=args.normative.resolve() if args.normative else None,
                      method=args.method)
    try:
        report = run_participants(layout, args.output_dir, options, args.scheduler,
                                  args.n_workers, args.memory_limit,
                                  worker_wait_s=args.wait_for_workers)
    except ClusterError as exc:
        error(str(exc))
        return 2
    print(f"{len(report.done)} done, {len(report.skipped)} skipped (finished before), "
          f"{len(report.failed)} failed; derivatives in {derivatives_root(args.output_dir)}")
    for why in report.failed.values():  # each names its acquisition
        print(f"error: {why}", file=sys.stderr)
    return 1 if report.failed else 0


def group(args: argparse.Namespace) -> int:
    """The group level: the cohort table and figures from the participant level's output."""
    from qsmnode.bids.cohort import CohortError, run_group
    from qsmnode.bids.layout import LayoutError, normalise_labels
    from qsmnode.node.normative import NormativeTableError

    try:
        table = run_group(args.output_dir, args.normative,
                          normalise_labels(args.participant_label, "sub"),
                          normalise_labels(args.session_label, "ses"))
    except (CohortError, LayoutError, NormativeTableError) as exc:
        error(str(exc))
        return 2
    acquisitions = {r["acquisition"] for r in table.rows}
    print(f"cohort table: {table.path} ({len(table.rows)} rows, {len(acquisitions)} "
          f"acquisitions, {len(table.failed)} failed)")
    for figure in table.figures:
        print(f"figure: {figure}")
    for note in table.notes:
        print(f"note: {note}")
    for why in table.failed.values():
        print(f"failed: {why}", file=sys.stderr)
    return 0
