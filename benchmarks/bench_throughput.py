"""Throughput under the four-scanner load (issue 7): four scanners (dcmtk ``storescu``) send
four studies of the realistic 7T M1 slab at once to one node (2 worker processes on this 2-core
machine), which processes them and delivers everything to Orthanc. Reports studies per hour
and each study's latency from its last image received to its last derived object
acknowledged.

The four studies are the same simulated scan written with four study identities (the work per
study is the same as for four different heads). Usage::

    .venv/bin/python benchmarks/bench_throughput.py [--size slab|small-slab] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from qsmnode.demo.pacs import start_pacs
from qsmnode.demo.run import NODE_AE, SCANNER_AE, NodeProcess, until
from qsmnode.sim.anatomy import simulate_anatomy
from qsmnode.sim.scanner import preset
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom

SEEDS = (101, 102, 103, 104)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="slab", choices=("slab", "small-slab"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qsmnode-bench-throughput-"))
    sim = simulate_anatomy(replace(preset(args.size), seed=7), pose_seed=1,
                           als={"left_hand": 0.03})
    studies = {seed: write_dicom(sim.gre, root / "scanner" / str(seed), "siemens",
                                 SimStudyInfo(seed=seed)) for seed in SEEDS}
    del sim
    pacs = start_pacs("auto", root / "pacs")
    node = NodeProcess(root / "node", pacs, workers=args.workers)
    try:
        node.start()
        storescu = shutil.which("storescu")
        if storescu is None:
            raise SystemExit("dcmtk storescu is not installed (Debian package dcmtk)")
        # dcmtk storescu plays the four scanners, one process each (pynetdicom SCUs in threads
        # of one process can miss responses: pydicom/pynetdicom#842)
        env = {**os.environ, "TCP_NODELAY": "1"}
        started = time.time()
        senders = [subprocess.Popen([storescu, "-aet", SCANNER_AE, "-aec", NODE_AE, "127.0.0.1",
                                     str(node.port), *map(str, files)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for files in studies.values()]
        for sender in senders:
            output, _ = sender.communicate(timeout=600)
            if sender.returncode != 0:
                raise SystemExit(f"storescu failed: {output[-2000:]}")
        received = time.time()

        def all_delivered() -> bool:
            jobs = node.read(lambda s: s.jobs()) or []
            if len(jobs) < len(SEEDS) or any(j.state == "failed" for j in jobs):
                if any(j.state == "failed" for j in jobs):
                    raise SystemExit(f"a job failed: {[j.last_error for j in jobs]}")
                return False
            counts = node.read(lambda s: s.counts().get("sends", {})) or {}
            done = all(j.state == "done" for j in jobs)
            return done and counts.get("sent", 0) == sum(counts.values()) > 0

        until(all_delivered, 3600, "every study to be delivered", node, interval_s=1.0)
        finished = time.time()
        latencies = node.read(_latencies) or {}
    finally:
        node.stop()
        pacs.stop()
    hours = (finished - started) / 3600
    print(f"{len(SEEDS)} studies of {args.size} ({len(studies[SEEDS[0]])} images each), "
          f"{args.workers} workers")
    print(f"sent in {received - started:.1f} s; all delivered {finished - started:.1f} s "
          f"after the first image")
    print(f"throughput: {len(SEEDS) / hours:.1f} studies per hour")
    for study, seconds in sorted(latencies.items()):
        print(f"  study …{study[-8:]}: last image → last object acknowledged {seconds:.1f} s")
    shutil.rmtree(root, ignore_errors=True)
    return 0


def _latencies(store: object) -> dict[str, float]:
    from qsmnode.node.store import Store

    assert isinstance(store, Store)
    last_image: dict[str, float] = {}
    for series in store.series():
        last_image[series.study_uid] = max(last_image.get(series.study_uid, 0.0),
                                           series.last_received_at)
    study_of = {r.sop_instance_uid: r.study_uid for r in store.outbox()}
    last_ack: dict[str, float] = {}
    for send in store.sends():
        if send.sent_at is not None:
            study = study_of[send.sop_instance_uid]
            last_ack[study] = max(last_ack.get(study, 0.0), send.sent_at)
    return {study: last_ack[study] - last_image[study] for study in last_ack}


if __name__ == "__main__":
    raise SystemExit(main())
