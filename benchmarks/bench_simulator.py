"""Benchmark: simulate and write the realistic 7T M1 slab (320×320×80, 4 echoes).

Reports wall time per stage and the peak resident memory of this process. Run with
``make bench`` or ``.venv/bin/python benchmarks/bench_simulator.py [--size slab]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from qsmnode.dicom.nifti import write_megre
from qsmnode.sim.phantom import PhantomParams
from qsmnode.sim.scanner import preset, simulate
from qsmnode.sim.truth import write_truth
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="slab")
    parser.add_argument("--style", default="siemens")
    args = parser.parse_args()
    scan = preset(args.size)
    print(f"size {args.size}: {scan.shape} at {scan.voxel_size_mm} mm, "
          f"{len(scan.echo_times_s)} echoes, {os.cpu_count()} cores")
    t0 = time.perf_counter()
    sim = simulate(scan, PhantomParams(als_delta_chi_ppm={"left_hand": 0.03}))
    t1 = time.perf_counter()
    print(f"simulate        {t1 - t0:7.1f} s   peak RSS {peak_rss_gib():.2f} GiB")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = write_dicom(sim.gre, out / "dicom", args.style, SimStudyInfo(seed=1))
        t2 = time.perf_counter()
        print(f"write DICOM     {t2 - t1:7.1f} s   {len(files)} files ({args.style})")
        write_truth(sim, out / "truth")
        t3 = time.perf_counter()
        print(f"write truth     {t3 - t2:7.1f} s")
        write_megre(sim.gre, out / "nifti")
        t4 = time.perf_counter()
        print(f"write NIfTI     {t4 - t3:7.1f} s")
    print(f"total           {t4 - t0:7.1f} s   peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
