"""Cohort throughput of the BIDS App on Dask (issue 16): subjects per hour with 1 and with 2
Dask workers, and the ratio (aim ≥ 1.8× from 1 to 2 workers), plus the peak memory of a
worker.

The cohort: ``--subjects`` whole-head 1 mm simulated brains (the simulator's ``brain`` preset,
160×200×160, 4 echoes; one scanner noise seed per subject), written as BIDS MEGRE NIfTI. Each
run is ``qsmnode qsm BIDS OUT participant --n-workers N`` (the embedded LocalCluster) into a
fresh OUTPUT_DIR, timed from start to exit and, from its progress lines, from the first task's
submission to the last result (the span a large cohort is made of: without the cluster's
start-up and the dataset scan); the peak resident memory of the Dask worker
processes is sampled every 0.2 s. Two ways of giving the cores to the workers, each with 1
and 2 workers, all in the same invocation, one after the other, on the same machine:

- ``shared``: the default, each worker's FFTs use cores ÷ workers threads (one worker uses
  the whole machine; two workers one core each);
- ``one-core``: ``QSMNODE_FFT_WORKERS=1`` for every worker, so each worker is one core, as a
  cluster node's worker slot is: the ratio then measures how the engine scales with workers,
  not how one worker's threads compare with two processes.

The machine's own ceiling is measured in the same run: a fixed single-threaded workload in one
process, then in two processes at once; the ratio of the work done per second is the most two
workers can gain on this machine, whatever the engine. Two workloads bracket QSM: FFTs
(forward and inverse real FFTs of a whole-head 1 mm float32 volume, ``scipy.fft`` with one
worker) and memory-bound element-wise arithmetic on the four echoes of such a volume (numpy).
``--machine-only`` measures only these.

On a small shared VM one run of each is not a number: the single worker's time per task and the
machine's own ceilings move by ±15 % from minute to minute. ``--repeats K`` runs every mode's
1- and 2-worker runs K times, interleaved (the order of 1 and 2 workers alternates from one
repeat to the next, so a drift of the machine falls on both alike), measures the ceilings before
every repeat, and reports medians: the speed-up is the ratio of the median times, and the
per-repeat ratios are printed beside it so their spread can be read.

Usage::

    .venv/bin/python benchmarks/bench_cohort.py [--subjects 4] [--size brain|tiny] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

from qsmnode.dicom.nifti import write_megre
from qsmnode.sim.scanner import preset, simulate


def write_cohort(root: Path, subjects: int, size: str) -> None:
    for n in range(1, subjects + 1):
        sim = simulate(replace(preset(size), seed=100 + n))
        write_megre(sim.gre, root / f"sub-{n:02d}" / "anat", prefix=f"sub-{n:02d}")
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "bench cohort", "BIDSVersion": "1.10.0"}) + "\n")


def peak_worker_rss(process: subprocess.Popen[str], stop: threading.Event,
                    peak: dict[str, float]) -> None:
    """Largest RSS (MiB) of any descendant of ``process`` that is a Dask worker (a Python
    process running ``distributed``'s worker), sampled until ``stop``."""
    parent = psutil.Process(process.pid)
    while not stop.is_set():
        try:
            for child in parent.children(recursive=True):
                try:
                    rss = child.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                peak["worker_mib"] = max(peak.get("worker_mib", 0.0), rss)
        except psutil.Error:
            pass
        stop.wait(0.2)


MODES = {"shared": {}, "one-core": {"QSMNODE_FFT_WORKERS": "1"}}
"""The environment of each way of giving the cores to the workers (see the docstring)."""


_FFT_LOAD = """
import sys, time
import numpy as np
from scipy import fft
x = np.random.default_rng(0).random((160, 200, 160), dtype=np.float32)
end = time.perf_counter() + float(sys.argv[1])
n = 0
while time.perf_counter() < end:
    fft.irfftn(fft.rfftn(x, workers=1), s=x.shape, workers=1)
    n += 1
print(n)
"""


_ELEMENTWISE_LOAD = """
import sys, time
import numpy as np
x = np.random.default_rng(0).random((160, 200, 160, 4), dtype=np.float32)
y, z = x.copy(), np.empty_like(x)
end = time.perf_counter() + float(sys.argv[1])
n = 0
while time.perf_counter() < end:
    np.multiply(x, 1.0001, out=z)
    np.add(z, y, out=z)
    np.sqrt(z, out=z)
    n += 1
print(n)
"""


def machine_scaling(load: str, seconds: float = 20.0) -> float:
    """Work per second of two single-threaded processes running ``load`` at once over one
    alone."""
    def rounds(processes: int) -> int:
        running = [subprocess.Popen([sys.executable, "-c", load, str(seconds)],
                                    stdout=subprocess.PIPE, text=True)
                   for _ in range(processes)]
        return sum(int(p.communicate()[0]) for p in running)

    one = rounds(1)
    return rounds(2) / one


def run(bids: Path, out: Path, workers: int, mode: str) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "QSMNODE_FFT_WORKERS"} | MODES[mode]
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "qsmnode", "qsm", str(bids), str(out), "participant",
         "--n-workers", str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stop = threading.Event()
    peak: dict[str, float] = {}
    sampler = threading.Thread(target=peak_worker_rss, args=(process, stop, peak), daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{mode}, {workers} worker(s): exit {process.returncode}\n"
                         f"{stderr[-2000:]}")
    done = [(float(task), float(elapsed)) for task, elapsed in
            re.findall(r": done in ([0-9.]+) s.*?\(([0-9.]+) s elapsed", stdout)]
    return {"workers": workers, "seconds": seconds, "peak_worker_mib": peak.get("worker_mib", 0),
            "processing_s": max((e for _, e in done), default=float("nan")),
            "task_s": sum(t for t, _ in done) / max(len(done), 1)}


def report(mode: str, rows: list[dict[str, float]], subjects: int) -> None:
    """Print one run's line."""
    for row in rows:
        per_hour = subjects / row["seconds"] * 3600
        print(f"{mode}: {row['workers']} worker(s): {row['seconds']:.1f} s, "
              f"{per_hour:.1f} subjects/hour; tasks {row['processing_s']:.1f} s from "
              f"the first submission to the last result, {row['task_s']:.1f} s per "
              f"task; peak worker RSS {row['peak_worker_mib']:.0f} MiB", flush=True)


def summary(mode: str, runs: list[dict[str, float]], subjects: int) -> None:
    """Medians over the repeats of one mode, and the speed-up from them."""
    def median(workers: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["workers"] == workers)

    def ratios(key: str) -> str:
        ones = [r[key] for r in runs if r["workers"] == 1]
        twos = [r[key] for r in runs if r["workers"] == 2]
        return ", ".join(f"{a / b:.2f}" for a, b in zip(ones, twos, strict=True))

    repeats = len(runs) // 2
    for workers in (1, 2):
        print(f"{mode}: median of {repeats}, {workers} worker(s): "
              f"{median(workers, 'seconds'):.1f} s "
              f"({subjects / median(workers, 'seconds') * 3600:.0f} subjects/hour), span "
              f"{median(workers, 'processing_s'):.1f} s, {median(workers, 'task_s'):.1f} s "
              f"per task, peak worker RSS {median(workers, 'peak_worker_mib'):.0f} MiB",
              flush=True)
    print(f"{mode}: speed-up 1 -> 2 workers from the medians: "
          f"{median(1, 'seconds') / median(2, 'seconds'):.2f}x start to exit "
          f"(per repeat {ratios('seconds')}), "
          f"{median(1, 'processing_s') / median(2, 'processing_s'):.2f}x in the tasks' span "
          f"(per repeat {ratios('processing_s')})", flush=True)


def ceilings() -> None:
    for name, load in (("FFT", _FFT_LOAD), ("element-wise", _ELEMENTWISE_LOAD)):
        print(f"machine: two single-threaded {name} processes do "
              f"{machine_scaling(load):.2f}x the work of one", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--size", default="brain", choices=("brain", "tiny"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved repeats of every run; medians are reported")
    parser.add_argument("--machine-only", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qsmnode-bench-cohort-"))
    try:
        if args.machine_only:
            ceilings()
            return 0
        started = time.perf_counter()
        write_cohort(root / "bids", args.subjects, args.size)
        print(f"cohort: {args.subjects} subjects ({args.size}) written in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes}
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1} of {args.repeats}", flush=True)
            ceilings()
            order = (1, 2) if repeat % 2 == 0 else (2, 1)
            modes = args.modes if repeat % 2 == 0 else args.modes[::-1]
            for mode in modes:
                rows = [run(root / "bids", root / f"out-{mode}-{n}", n, mode) for n in order]
                rows.sort(key=lambda row: row["workers"])
                report(mode, rows, args.subjects)
                print(f"{mode}: speed-up 1 -> 2 workers: "
                      f"{rows[0]['seconds'] / rows[1]['seconds']:.2f}x start to exit, "
                      f"{rows[0]['processing_s'] / rows[1]['processing_s']:.2f}x in the "
                      "tasks' span", flush=True)
                runs[mode].extend(rows)
        if args.repeats > 1:
            for mode in args.modes:
                summary(mode, runs[mode], args.subjects)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
