"""Benchmark: one QSM task alone against two side by side (issue 16, memory traffic).

A cohort worker's throughput from 1 to 2 workers is bounded by how much a QSM task slows down
when another runs beside it: the two share the memory bandwidth. This runs ``run_qsm`` on a
simulated whole-head 1 mm acquisition (the simulator's ``brain`` preset, 160×200×160, 4 echoes)
in fresh processes, each with single-threaded FFTs (``QSMNODE_FFT_WORKERS=1``): one process
alone, then two at once, repeated, and reports per task the wall time, CPU time (user + sys)
and peak RSS, the side-by-side slowdown (two at once against one alone) and the throughput
ratio of two processes against one (``2 · alone / side by side``).

To compare source trees (e.g. a copy of ``qsmnode`` before a change against the working tree),
give each with ``--tree DIR`` (a directory holding a ``qsmnode`` package, put first on
``PYTHONPATH``); the trees alternate within each repeat, so machine load hits them alike.
Medians over the repeats.

Run: ``.venv/bin/python benchmarks/bench_qsm_memory.py [--method single-step-tv|pdf-tv-admm]
[--repeats 3] [--tree DIR ...] [--data DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_input(data: Path, size: str) -> None:
    """The simulated acquisition as ``magnitude.npy``, ``phase.npy`` and ``meta.pkl``."""
    import numpy as np

    from qsmnode.sim.scanner import preset, simulate

    if (data / "meta.pkl").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    gre = simulate(preset(size)).gre
    np.save(data / "magnitude.npy", np.asarray(gre.magnitude, np.float32))
    np.save(data / "phase.npy", np.asarray(gre.phase, np.float32))
    meta = {"te": np.asarray(gre.echo_times_s), "vs": np.asarray(gre.voxel_size_mm),
            "b0": np.asarray(gre.b0_direction), "b0_t": float(gre.field_strength_t)}
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)


def worker(data: Path, method: str) -> None:
    """One task in this process; prints its numbers as one JSON line."""
    import resource

    import numpy as np

    from qsmnode.qsm.engine import METHODS, run_qsm

    with open(data / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    mag = np.load(data / "magnitude.npy")
    phase = np.load(data / "phase.npy")
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_qsm(mag, phase, meta["te"], meta["vs"], meta["b0"], meta["b0_t"],
                  params=METHODS[method])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "wall": time.perf_counter() - t0,
        "cpu": time.process_time() - c0,
        "rss_gib": peak_rss_gib(),
        "minor_faults": usage.ru_minflt,
        "timings": res.quality["timings_s"],
    }))


def peak_rss_gib() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would carry the parent's over from
    the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def launch(tree: Path, data: Path, method: str, n: int) -> list[dict]:
    """``n`` tasks at once, each in its own process; their numbers."""
    env = dict(os.environ, QSMNODE_FFT_WORKERS="1",
               PYTHONPATH=os.pathsep.join([str(tree), env_path()]).rstrip(os.pathsep))
    cmd = [sys.executable, __file__, "--worker", "--data", str(data), "--method", method]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed ({tree})")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def env_path() -> str:
    return os.environ.get("PYTHONPATH", "")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="single-step-tv")
    ap.add_argument("--size", default="brain")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree", action="append", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=Path("/tmp/qsmnode-bench-qsm-memory"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.data, args.method)
        return
    make_input(args.data / args.size, args.size)
    data = args.data / args.size
    trees = args.tree or [REPO]
    runs: dict[Path, dict[str, list]] = {t: {"alone": [], "pair": []} for t in trees}
    print(f"{args.method} on {args.size}, {args.repeats} repeats, {os.cpu_count()} cores, "
          f"load {loadavg()} at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    for rep in range(args.repeats):
        for tree in trees:
            alone = launch(tree, data, args.method, 1)
            pair = launch(tree, data, args.method, 2)
            runs[tree]["alone"] += alone
            runs[tree]["pair"].append(pair)
            walls = " / ".join(f"{r['wall']:.1f}" for r in pair)
            print(f"  repeat {rep + 1} {tree}: alone {alone[0]['wall']:.1f} s, side by side "
                  f"{walls} s (load {loadavg()})", flush=True)
    med = statistics.median
    print(f"\nmedians (load {loadavg()} at {time.strftime('%H:%M:%S', time.gmtime())} UTC):")
    print("| tree | alone: wall, CPU | side by side: wall, CPU per task | slowdown | "
          "2-process throughput | peak RSS |")
    print("|---|---|---|---|---|---|")
    for tree in trees:
        alone = runs[tree]["alone"]
        pair_walls = [sum(r["wall"] for r in p) / 2 for p in runs[tree]["pair"]]
        # throughput of a pair: two tasks in the time the slower of them took
        pair_spans = [max(r["wall"] for r in p) for p in runs[tree]["pair"]]
        a_wall = med([r["wall"] for r in alone])
        p_cpu = med([r["cpu"] for p in runs[tree]["pair"] for r in p])
        rss = max(r["rss_gib"] for r in alone)
        print(f"| {tree} | {a_wall:.1f} s, {med([r['cpu'] for r in alone]):.1f} s | "
              f"{med(pair_walls):.1f} s, {p_cpu:.1f} s | {med(pair_walls) / a_wall - 1:+.0%} | "
              f"{2 * a_wall / med(pair_spans):.2f}× | {rss:.2f} GiB |")
        steps = alone[0]["timings"]
        print("    per step alone (median wall s): " + ", ".join(
            f"{k} {med([r['timings'][k] for r in alone]):.2f}" for k in steps))


if __name__ == "__main__":
    main()
