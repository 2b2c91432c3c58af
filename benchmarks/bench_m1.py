"""Benchmark: the M1 analysis on the realistic 7T slab of the anatomy phantom (issue 6).

For each pose seed: the anatomy phantom (``simulate_anatomy``, ``preset("slab")``: 320×320×80
at 0.4×0.4×0.8 mm, 18° oblique) with +0.04 ppm in the deep layer of the left hand area. The
analysis gets the true χ and R2* plus Gaussian noise (0.01 ppm, 2 s⁻¹: the QSM engine is
benchmarked on its own in ``bench_qsm.py``) and the RMS magnitude over echoes. The field is not
simulated (``with_field=False``): the magnitude does not depend on it.

``analyse_m1`` runs in a fresh (spawned) process that loads only its inputs, so the wall time
and peak RSS are the analysis's own. Reported: the time of each step (segmentation,
registration with the label warps, layering, measurements), the registration's stages, peak
RSS, and the accuracy against the phantom's truth: Dice of each area (found area ∩ own grey
matter against true area ∩ true grey matter), thickness MAE in M1 (true M1 grey matter that
the analysis also calls cortex) and each area's deep-layer χ error.

Run: ``.venv/bin/python benchmarks/bench_m1.py [--size slab] [--seeds 1 2 3]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

ALS = {"left_hand": 0.04}


def _worker(tmp: str) -> dict:
    """Run ``analyse_m1`` in this fresh process on the inputs saved in ``tmp``."""
    from qsmnode.dicom.reference_data import load_m1_atlas
    from qsmnode.m1.analysis import analyse_m1

    d = Path(tmp)
    arrays = {k: np.load(d / f"{k}.npy") for k in ("chi", "r2star", "magnitude", "mask")}
    affine = np.load(d / "affine.npy")
    t0 = time.perf_counter()
    atlas = load_m1_atlas()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result, seconds = analyse_m1(arrays["chi"], arrays["r2star"], arrays["magnitude"],
                                 arrays["mask"], affine, atlas)
    wall = time.perf_counter() - t0
    with open(d / "result.pkl", "wb") as f:
        pickle.dump(result, f)
    return {"wall": wall, "atlas_load": load_s, "seconds": seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _evaluate(sim, result) -> dict:
    from qsmnode.m1.result import AREAS, segment_of
    from qsmnode.sim.phantom import Tissue

    t = sim.truth
    gm = t.labels == Tissue.GM
    found = np.zeros(result.labels.shape, dtype=np.uint8)
    for label in np.unique(result.labels[result.labels > 0]):
        found[result.labels == label] = AREAS.index(segment_of(label)[0]) + 1
    out: dict = {"dice": {}, "deep_chi_error": {}, "deep_chi": {}}
    for i, area in enumerate(AREAS, start=1):
        true = gm & (t.m1_areas == i)
        mine = found == i
        out["dice"][area] = float(2 * (true & mine).sum() / max(true.sum() + mine.sum(), 1))
        deep_truth = float(t.chi_ppm[true & (t.cortical_depth >= 2 / 3)].mean())
        m = result.measurement(area, "deep")
        out["deep_chi"][area] = m.chi_mean_ppm
        out["deep_chi_error"][area] = m.chi_mean_ppm - deep_truth
    # The hand and foot areas: the phantom's thickness truth covers them (qsmnode.sim.ribbon).
    m1 = gm & np.isin(t.m1_areas, np.arange(1, len(AREAS) + 1)) & np.isfinite(result.thickness_mm)
    err = result.thickness_mm[m1] - t.thickness_mm[m1]
    out["thickness_mae"] = float(np.mean(np.abs(err)))
    out["thickness_bias"] = float(np.mean(err))
    out["covered"] = {a: result.measurement(a, "all").covered for a in AREAS}
    return out


def run(size: str, seed: int) -> dict:
    from qsmnode.sim.anatomy import simulate_anatomy
    from qsmnode.sim.phantom import Tissue
    from qsmnode.sim.scanner import preset

    t0 = time.perf_counter()
    sim = simulate_anatomy(preset(size), pose_seed=seed, als=ALS, with_field=False)
    sim_s = time.perf_counter() - t0
    t = sim.truth
    rng = np.random.default_rng(seed)
    inputs = {
        "chi": (t.chi_ppm + rng.normal(0, 0.01, t.chi_ppm.shape)).astype(np.float32),
        "r2star": (t.r2star_per_s + rng.normal(0, 2.0, t.chi_ppm.shape)).astype(np.float32),
        "magnitude": np.sqrt((sim.gre.magnitude.astype(np.float32) ** 2).mean(axis=-1)),
        "mask": t.brain_mask & (t.labels != Tissue.BONE),
        "affine": sim.gre.affine,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for k, v in inputs.items():
            np.save(Path(tmp) / f"{k}.npy", v)
        del inputs
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            timing = pool.submit(_worker, tmp).result()
        with open(Path(tmp) / "result.pkl", "rb") as f:
            result = pickle.load(f)
    return {"seed": seed, "simulate_s": sim_s, **timing, **_evaluate(sim, result)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="slab")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        r = run(args.size, seed)
        rows.append(r)
        s = r["seconds"]
        print(f"pose {seed}: simulate {r['simulate_s']:.1f} s; analysis {r['wall']:.1f} s ("
              + ", ".join(f"{k} {v:.1f} s" for k, v in s.items())
              + f"), atlas load {r['atlas_load']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB",
              flush=True)
        print("  Dice " + ", ".join(f"{a} {d:.3f}" for a, d in r["dice"].items()))
        print("  deep χ error (ppm) " + ", ".join(f"{a} {e:+.4f}"
                                                 for a, e in r["deep_chi_error"].items()))
        print(f"  thickness MAE in M1 {r['thickness_mae']:.3f} mm "
              f"(bias {r['thickness_bias']:+.3f}); covered {r['covered']}", flush=True)
    print("\n| pose | analysis | segmentation | registration | layers | measurements | peak RSS "
          "| Dice LH/RH/LF/RF | thickness MAE | deep χ err LH/RH/LF/RF (ppm) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        dice = "/".join(f"{v:.2f}" for v in r["dice"].values())
        err = "/".join(f"{v:+.4f}" for v in r["deep_chi_error"].values())
        print(f"| {r['seed']} | {r['wall']:.1f} s | {s['segmentation']:.1f} s | "
              f"{s['registration']:.1f} s | {s['layers']:.1f} s | {s['measurements']:.1f} s | "
              f"{r['peak_rss_gib']:.2f} GiB | {dice} | {r['thickness_mae']:.2f} mm | {err} |")


if __name__ == "__main__":
    main()
