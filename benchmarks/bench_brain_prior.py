"""Benchmark: the whole-head brain prior (issue 11 item 4) on the independent head phantom
whose scalp touches the brain.

``qsmnode.sim.forward_head`` with a thin skull (``skull_mm`` 1-2 mm: the scalp's signal meets
the brain's, as partial volume does on real 3 mm images), so the signal mask spans the whole
head and ``run_qsm`` asks the template prior (``dicom.reference_data.brain_prior_for``, the
node's). Reported per case: the brain mask's volume and Dice against the phantom's true
intracranial mask, with and without the prior, and what the prior step recorded (applied, or
why not: e.g. its registration's normalised mutual information below the threshold). Run::

    .venv/bin/python benchmarks/bench_brain_prior.py [--voxel-mm 2] [--skull-mm 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qsmnode.dicom.reference_data import brain_prior_for
from qsmnode.qsm.engine import run_qsm
from qsmnode.sim.forward_head import HeadConditions, simulate_head


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel-mm", type=float, default=2.0)
    parser.add_argument("--skull-mm", type=float, nargs="+", default=[1.0, 2.0])
    args = parser.parse_args()
    for skull in args.skull_mm:
        sim = simulate_head(HeadConditions(voxel_mm=args.voxel_mm, skull_mm=skull))
        vs = np.sqrt((sim.affine[:3, :3] ** 2).sum(axis=0))
        ml = float(np.prod(vs)) / 1000.0
        truth = sim.brain_mask
        print(f"skull {skull:g} mm, {args.voxel_mm:g} mm voxels: true intracranial mask "
              f"{truth.sum() * ml:.0f} mL", flush=True)
        for name, prior in (("signal mask", None), ("with the prior", brain_prior_for(sim.affine))):
            started = time.perf_counter()
            result = run_qsm(sim.magnitude, sim.phase_rad, sim.conditions.echo_times_s, vs,
                             sim.b0_direction, sim.conditions.field_strength_t,
                             brain_prior=prior)
            record = result.quality["mask_prior"]
            print(f"  {name}: mask {result.mask.sum() * ml:.0f} mL, Dice "
                  f"{dice(result.mask, truth):.3f}, prior applied {record['applied']}"
                  f"{'' if record['applied'] else ': ' + record['why_not']} "
                  f"({time.perf_counter() - started:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
