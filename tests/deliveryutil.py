"""Test helpers for delivery: derived objects from the simulator's truth, until the pipeline
makes them itself.

:func:`truth_process` has the signature of :func:`qsmnode.node.jobs.process_acquisition` but
builds the derived objects with :func:`~qsmnode.dicom.derived.build_derived` from the small
simulation's ground truth (χ, R2*, M1 labels); :func:`truth_job` is the matching job function
(``tests.deliveryutil:truth_job``), and ``python -m tests.deliveryutil process DIR --out DIR
[--send DEST]`` is ``qsmnode process`` with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ALGORITHM_VERSION = "0.1-test"
CREATED = dt.datetime(2024, 5, 17, 12, 0, 0)


def truth_process(loaded: Any, files: Sequence[str], out_dir: Path | None,
                  *pipeline: object) -> tuple[dict[str, Any], list[Any]]:
    """The derived objects of the small simulated study, from its truth."""
    from qsmnode.dicom.derived import build_derived, source_reader
    from qsmnode.node.jobs import JobError
    from tests.derivedutil import m1_from_truth
    from tests.nodeutil import small_simulation

    sim = small_simulation()
    if tuple(loaded.gre.shape) != tuple(sim.truth.chi_ppm.shape):
        raise JobError(f"not the small simulated study: shape {loaded.gre.shape}")
    datasets = build_derived(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s,
                             m1_from_truth(sim), source_reader(files), ALGORITHM_VERSION,
                             CREATED)
    return {"derived": len(datasets)}, datasets


def truth_job(spec: Any) -> dict[str, Any]:
    """A job function: the default one, with :func:`truth_process` as the pipeline."""
    from qsmnode.node.jobs import load_job_acquisition, write_job_outputs

    loaded = load_job_acquisition(spec)
    result, datasets = truth_process(loaded, spec.files, spec.out_dir)
    write_job_outputs(spec, datasets)
    return result


def _main() -> int:
    from qsmnode.cli import run_process

    parser = argparse.ArgumentParser(description="qsmnode process with truth_process")
    parser.add_argument("command", choices=["process"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--send")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    return run_process(args.folder, args.out, args.send, args.config,
                       processor="tests.deliveryutil:truth_process")


if __name__ == "__main__":
    raise SystemExit(_main())
