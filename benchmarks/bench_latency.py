"""Latency of the whole node on the realistic 7T M1 slab: from the last image received to the
last derived object acknowledged by the PACS, by stage (issue 7).

It runs ``qsmnode demo`` (a real ``qsmnode serve``, Orthanc as the PACS when installed, the
anatomy phantom slab sent by C-STORE) and reads the timings it records. Usage::

    .venv/bin/python benchmarks/bench_latency.py [--size slab|small-slab] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="slab", choices=("slab", "small-slab"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="qsmnode-bench-latency-"))
    report = out.with_name(out.name + ".json")
    done = subprocess.run(
        [sys.executable, "-m", "qsmnode", "demo", "--out", str(out), "--size", args.size,
         "--report-json", str(report)],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if done.returncode != 0:
        print(f"the demo failed (exit {done.returncode})", file=sys.stderr)
        return 1
    data = json.loads(report.read_text())
    print()
    print(f"| stage ({args.size}, {data['scan']['files']} images) | seconds |")
    print("|---|---|")
    for name, seconds in data["latency"].items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
