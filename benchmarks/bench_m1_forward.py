"""The deep-layer M1 change through the node's own M1 analysis, on qsm-forward phantoms.

``bench_qsm_forward.py`` scores the deep-M1 change over the phantom's TRUE deep layer. What a
radiologist reads is the change over the layers and areas the node finds itself
(segmentation, registration to the atlas, layering). This benchmark runs the BIDS App as a
researcher does (``qsmnode qsm BIDS_DIR OUT participant --m1``) on the independent head of
``qsmnode.sim.forward_head`` (qsm-forward's field; its M1 truth is grey matter within 12 mm
of the hand knob, "deep" within 1.5 mm of white matter, made without any ``qsmnode.m1`` code)
and reports, per seed:

- ``reported``: the left-hand minus right-hand deep-layer χ of the measurements table (ppm;
  the node's region cores);
- ``qsm_on_node_layers`` / ``truth_on_node_layers``: the same difference of the node's χ map
  and of the TRUE χ, both averaged over the node's whole deep-layer labels (so their gap is
  the QSM's error on the node's own layers, and the truth's reading against the phantom's
  +0.02 ppm is what the node's layers and areas make of the change);
- ``deep_in_true_change``: the fraction of the node's left-hand deep layer inside the
  phantom's changed voxels; ``true_change_found``: the fraction of those voxels in the
  node's left-hand area (any layer), and in its deep layer.

Usage: ``python benchmarks/bench_m1_forward.py --cases 7t-slab --seeds 0 1 2 [--json F]``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qsm_forward import CASES, report

from qsmnode.m1.result import segment_label
from qsmnode.sim.forward_head import simulate_head, write_bids


def _deep_rows(table: Path) -> dict[str, float]:
    with table.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["area"]: float(r["chi_mean_ppm"]) for r in rows if r["layer"] == "deep"}


def run_case(name: str, seed: int, tmp: Path) -> dict:
    sim = simulate_head(replace(CASES[name], seed=seed))
    bids = tmp / f"{name}-{seed}"
    write_bids(sim, bids)
    out = tmp / f"{name}-{seed}-out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qsmnode", "qsm", str(bids), str(out),
                           "participant", "--m1"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"qsmnode qsm failed: {proc.stderr[-2000:]}")
    anat = out / "qsmnode" / "sub-phantom" / "anat"
    deep = _deep_rows(anat / "sub-phantom_desc-m1_measurements.tsv")
    labels = np.asarray(nib.load(anat / "sub-phantom_desc-m1_dseg.nii.gz").dataobj)
    chi = np.asarray(nib.load(anat / "sub-phantom_Chimap.nii.gz").dataobj, dtype=np.float32)
    left = labels == segment_label("left_hand", "deep")
    right = labels == segment_label("right_hand", "deep")
    left_area = np.isin(labels, [segment_label("left_hand", x)
                                 for x in ("deep", "middle", "superficial")])
    changed = sim.m1_deep["left"]

    def difference(volume: np.ndarray) -> float:
        if not left.any() or not right.any():
            return float("nan")
        return float(volume[left].mean() - volume[right].mean())

    true_change = CASES[name].deep_m1_change_ppm
    return {
        "case": name, "seed": seed, "true_change": true_change, "wall_s": round(wall, 1),
        "reported": deep["left_hand"] - deep["right_hand"],
        "qsm_on_node_layers": difference(chi),
        "truth_on_node_layers": difference(sim.chi_ppm),
        "deep_voxels": [int(left.sum()), int(right.sum())],
        "deep_in_true_change": float((left & changed).sum() / max(left.sum(), 1)),
        "true_change_found_area": float((left_area & changed).sum() / max(changed.sum(), 1)),
        "true_change_found_deep": float((left & changed).sum() / max(changed.sum(), 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=["7t-slab"], choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--json", type=Path, help="append results as JSON lines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            for seed in args.seeds:
                report(run_case(name, seed, Path(tmp)), args.json)


if __name__ == "__main__":
    main()
