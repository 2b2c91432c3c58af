"""Benchmark: the whole-head brain prior (issue 11 item 4) on the independent head phantom
whose scalp touches the brain, and on the real Philips 3T whole head.

``qsmnode.sim.forward_head`` with a thin skull (``skull_mm`` 1-2 mm: the scalp's signal meets
the brain's, as partial volume does on real 3 mm images), so the signal mask spans the whole
head and ``run_qsm`` asks for the template prior. Each case runs three ways in the same
process: the signal mask alone, the prior with the one-level registration of 2026-12-06
(``ONE_LEVEL_BRAIN_PRIOR_PARAMS``: rigid + affine at 4 mm from the DICOM geometry), and the
prior with the current one (``BRAIN_PRIOR_PARAMS``: start search, rigid and affine at 8 then
4 mm). Reported: the brain mask's volume and Dice against the phantom's true intracranial
mask, whether the prior was applied (or why not), the registration's normalised mutual
information (NMI; below ``MIN_QUALITY_NMI`` the prior is refused), the prior's own time and
the ``run_qsm`` wall time. ``--pose`` also turns the phantom's grid by a rigid transform
(degrees about x, y, z and mm), as a head lying differently in the scanner.

With ``--philips DIR`` the real Philips 3T 2-echo whole head (a DICOM folder; not part of the
repository) runs the same three ways, with the χ 1st/99th percentiles in the QSM mask. Run::

    nice -n 5 .venv/bin/python benchmarks/bench_brain_prior.py [--voxel-mm 2] \\
        [--skull-mm 1 2] [--seeds 0] [--tilts 20] [--pose 20 0 0 0 0 0] \\
        [--philips ../shared/data/philips-3t-2echo/classic]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation

from qsmnode.dicom.reference_data import load_template
from qsmnode.m1.register import (
    BRAIN_PRIOR_PARAMS,
    MIN_QUALITY_NMI,
    Registration,
    RegistrationParams,
    template_brain_prior,
)
from qsmnode.qsm.engine import run_qsm
from qsmnode.sim.forward_head import HeadConditions, simulate_head

ONE_LEVEL_BRAIN_PRIOR_PARAMS = RegistrationParams(resolution_mm=4.0, levels=(1,),
                                                  bspline_mesh_mm=0.0)
"""The prior's registration before the start search (2026-12-06): rigid + affine on one 4 mm
level from the DICOM geometry, the "before" column."""

PriorFunction = Callable[[NDArray[np.float32], NDArray[np.bool_]], NDArray[np.bool_]]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def recording_prior(affine: np.ndarray, params: RegistrationParams,
                    registrations: list[Registration]) -> PriorFunction:
    """``qsmnode.m1.register.brain_prior_function`` with the default template, which also
    keeps each registration (for its NMI)."""
    template = load_template()

    def prior(image: NDArray[np.float32], head_mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
        brain, registration = template_brain_prior(image, affine, head_mask, template.data,
                                                   template.affine, params)
        registrations.append(registration)
        if registration.quality_nmi < MIN_QUALITY_NMI:
            raise ValueError(f"NMI {registration.quality_nmi:.3f} < {MIN_QUALITY_NMI:g}")
        return brain

    return prior


WAYS: tuple[tuple[str, RegistrationParams | None], ...] = (
    ("signal mask", None),
    ("one-level prior (before)", ONE_LEVEL_BRAIN_PRIOR_PARAMS),
    ("searched prior (now)", BRAIN_PRIOR_PARAMS),
)


def run_ways(args: tuple, affine: np.ndarray, ml: float, truth: np.ndarray | None) -> None:
    """Run ``run_qsm(*args)`` the three ways of :data:`WAYS` and print one line each."""
    for name, params in WAYS:
        registrations: list[Registration] = []
        prior = None if params is None else recording_prior(affine, params, registrations)
        started = time.perf_counter()
        result = run_qsm(*args, brain_prior=prior)
        seconds = time.perf_counter() - started
        record = result.quality["mask_prior"]
        line = f"  {name}: mask {result.mask.sum() * ml:.0f} mL"
        if truth is not None:
            line += f", Dice {dice(result.mask, truth):.3f}"
        else:
            p1, p99 = np.percentile(result.chi_ppm[result.qsm_mask], [1, 99])
            line += (f", QSM mask {result.qsm_mask.sum() * ml:.0f} mL, chi p1/p99 "
                     f"{p1:+.3f}/{p99:+.3f} ppm")
        line += f", prior applied {record['applied']}"
        if not record["applied"]:
            line += f" ({record['why_not'][:60]})"
        if registrations:
            reg = registrations[-1]
            line += (f", NMI {reg.quality_nmi:.3f}, registration {reg.seconds:.1f} s ("
                     + ", ".join(f"{k} {v:.1f}" for k, v in reg.stage_seconds) + ")")
        print(line + f", run_qsm {seconds:.1f} s", flush=True)


def posed(affine: np.ndarray, pose: list[float]) -> np.ndarray:
    """``affine`` with the head turned by ``pose`` (degrees about x, y, z; then mm)."""
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler("xyz", pose[:3], degrees=True).as_matrix()
    turn[:3, 3] = pose[3:]
    return turn @ affine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel-mm", type=float, default=2.0)
    parser.add_argument("--skull-mm", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tilts", type=float, nargs="+", default=[20.0])
    parser.add_argument("--pose", type=float, nargs=6, default=[0.0] * 6,
                        metavar=("RX", "RY", "RZ", "TX", "TY", "TZ"))
    parser.add_argument("--philips", type=Path, default=None,
                        help="DICOM folder of the Philips 3T 2-echo whole head")
    parser.add_argument("--no-phantom", action="store_true")
    args = parser.parse_args()
    if args.philips is not None:
        from qsmnode.dicom.load import load_folder

        (loaded,) = load_folder(args.philips)
        gre = loaded.gre
        affine = posed(np.asarray(gre.affine, np.float64), args.pose)
        ml = float(np.prod(gre.voxel_size_mm)) / 1000.0
        print(f"Philips 3T whole head {args.philips.name}, pose {args.pose}", flush=True)
        run_ways((gre.magnitude, gre.phase, gre.echo_times_s, gre.voxel_size_mm,
                  gre.b0_direction, gre.field_strength_t), affine, ml, None)
    if args.no_phantom:
        return 0
    for skull in args.skull_mm:
        for seed in args.seeds:
            for tilt in args.tilts:
                sim = simulate_head(HeadConditions(voxel_mm=args.voxel_mm, skull_mm=skull,
                                                   seed=seed, tilt_deg=tilt))
                vs = np.sqrt((sim.affine[:3, :3] ** 2).sum(axis=0))
                ml = float(np.prod(vs)) / 1000.0
                truth = sim.brain_mask
                print(f"skull {skull:g} mm, {args.voxel_mm:g} mm voxels, seed {seed}, tilt "
                      f"{tilt:g}, pose {args.pose}: true intracranial mask "
                      f"{truth.sum() * ml:.0f} mL", flush=True)
                run_ways((sim.magnitude, sim.phase_rad, sim.conditions.echo_times_s, vs,
                          sim.b0_direction, sim.conditions.field_strength_t),
                         posed(sim.affine, args.pose), ml, truth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
