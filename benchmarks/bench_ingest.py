"""Benchmark: DICOM ingest rate of ``qsmnode serve`` against dcmtk ``storescp``.

Both receivers run in turn on this machine and receive the same study from dcmtk ``storescu``
over loopback (``TCP_NODELAY=1``: without it dcmtk waits for a delayed ACK on every instance,
whatever the receiver). The default study is the realistic 7T slab (Siemens style, magnitude
and phase, 4 echoes: 640 files of 320x320, about 206 kB each), simulated once into a cache
folder; ``--study`` sends another folder instead.

Each run starts a fresh receiver with an empty output/state folder (so nothing is a duplicate)
and times ``storescu`` from start to exit (association, every C-STORE and its response,
release). The receivers take turns run by run, so a machine whose load changes treats them
alike; the best run of each is reported: instances/s, MB/s (file bytes), the ratio
qsmnode/storescp, and the peak resident memory of the listener process while it received
(``/proc/<pid>/status`` VmRSS sampled every 10 ms; VmHWM, the peak over the process's life,
is also given), and the CPU time the receiver process used per instance (user + system, from
``/proc/<pid>/stat``): on a shared machine the CPU per instance moves much less with the load
than the wall time does.

``qsmnode serve`` keeps its durability: each instance is fsynced, renamed, its folder fsynced
and its SQLite row committed before 0x0000 is returned (the row without fsync: the spool file
is the durable record, see :mod:`qsmnode.node.store`). ``storescp`` does not fsync. Two
references help read the ratio:

- ``--reference``: a pynetdicom Storage SCP whose handler does nothing (pynetdicom's defaults,
  the same PDU size), i.e. the ceiling of any receiver built on pynetdicom here; and the same
  with pynetdicom's polling sleeps shortened (``pnd-nopoll``, by swapping a module's ``time``:
  an experiment, not something the node does), i.e. the ceiling without them;
- the *durable-write floor* (always): the spool write (temporary file, fsync, rename, folder
  fsync) and store commit of each instance of the study, without the network, i.e. what
  durability alone costs on this disk.

By default the node's tracker has a long quiet period and its rules match no 7T study, so no
job runs and only reception is measured; ``--process`` keeps the default rules (the study is
grouped and loaded by a worker after it arrived; reception is timed the same way).

Run: ``.venv/bin/python benchmarks/bench_ingest.py [--runs 5] [--reference] [--study DIR]``.
``--pdu 131072`` lets both receivers take dcmtk's largest PDUs (the node's own default is
256 KiB); ``--work /dev/shm`` leaves the disk out (what remains is the CPU side).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALLING_AE = "SCANNER7T"
CALLED_AE = "QSMNODE"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "qsmnode-bench"
DCMTK_MAX_PDU = 131072  # storescp accepts at most this

# A pynetdicom Storage SCP that accepts everything and does nothing with it: argv port, PDU,
# AE title, and "nopoll" to shorten pynetdicom's polling sleeps (an experiment for this
# benchmark only: the acceptor's reactor sleeps 1 ms per turn, in module code no setting
# reaches, so its module's ``time`` is swapped for one whose sleeps last at most 50 µs; the
# DUL's turn is shortened to 0.2 ms as the node does).
_EMPTY_SCP = """
import sys, time
import pynetdicom.association
from pynetdicom import AE, StoragePresentationContexts, evt
nopoll = sys.argv[4] == "nopoll"
if nopoll:
    class ShortSleeps:
        def __getattr__(self, name):
            return getattr(time, name)
        @staticmethod
        def sleep(seconds):
            time.sleep(min(seconds, 0.00005))
    pynetdicom.association.time = ShortSleeps()
def opened(event):
    if nopoll:
        event.assoc.dul._run_loop_delay = 0.0002
ae = AE(ae_title=sys.argv[3])
ae.maximum_pdu_size = int(sys.argv[2])
for context in StoragePresentationContexts:
    ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000),
                              (evt.EVT_CONN_OPEN, opened)])
"""


# ------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} is not installed: run `sudo apt-get install dcmtk`")
    return path


def wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the receiver exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:g} s")


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the resident memory of a process every ``interval_s`` in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak_kib = proc_status_kib(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))


# --------------------------------------------------------------------------------------- study


def study_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_dicom(p))
    if not files:
        sys.exit(f"no DICOM files under {folder}")
    return files


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def simulated_study(cache: Path, size: str, style: str) -> Path:
    """The simulated study's DICOM folder, simulating it into ``cache`` the first time."""
    marker = cache / "complete.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("size") == size and info.get("style") == style:
            return cache / "sim" / "dicom"
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    print(f"simulating the {size} study ({style}) into {cache} (once; about 40 s for the slab)",
          flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qsmnode", "simulate", "--size", size, "--style",
                    style, "--out", str(cache / "sim")], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    for other in ("truth", "nifti"):  # only the DICOM files are sent
        shutil.rmtree(cache / "sim" / other, ignore_errors=True)
    marker.write_text(json.dumps({"size": size, "style": style}))
    print(f"simulated in {time.perf_counter() - started:.0f} s", flush=True)
    return cache / "sim" / "dicom"


# ------------------------------------------------------------------------------------ one run


@dataclass
class Run:
    seconds: float
    received: int
    peak_rss_kib: int
    hwm_kib: int
    idle_rss_kib: int
    cpu_s: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(port: int, files: list[Path]) -> float:
    """Send ``files`` with storescu in one association; return its wall time."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    command = [tool("storescu"), "-aet", CALLING_AE, "-aec", CALLED_AE, "127.0.0.1", str(port),
               *map(str, files)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def measure(process: subprocess.Popen[bytes], port: int,
            files: list[Path]) -> tuple[float, int, int, int, float]:
    """(seconds, peak RSS while receiving, VmHWM, RSS before (KiB), CPU seconds used)."""
    idle = proc_status_kib(process.pid, "VmRSS")
    cpu_before = cpu_seconds(process.pid)
    with RssSampler(process.pid) as sampler:
        seconds = send(port, files)
    cpu = cpu_seconds(process.pid) - cpu_before
    return seconds, sampler.peak_kib, proc_status_kib(process.pid, "VmHWM"), idle, cpu


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_storescp(files: list[Path], work: Path, pdu: int) -> Run:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [tool("storescp"), "-aet", CALLED_AE, "--max-pdu", str(pdu), "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
        stderr=(work / "storescp.log").open("wb"),
    )
    try:
        wait_port(port, process)
        seconds, peak, hwm, idle, cpu = measure(process, port, files)
        received = sum(1 for p in out.iterdir() if p.is_file())
    finally:
        stop(process)
    return Run(seconds, received, peak, hwm, idle, cpu)


def run_reference(files: list[Path], work: Path, pdu: int, nopoll: bool = False) -> Run:
    """pynetdicom with a handler that does nothing (counts as received when storescu
    succeeded: each C-STORE got its Success); ``nopoll``: with its polling sleeps shortened."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", _EMPTY_SCP, str(port), str(pdu), CALLED_AE,
         "nopoll" if nopoll else "stock"], cwd=work,
        stdout=subprocess.DEVNULL, stderr=(work / "reference.log").open("wb"),
    )
    try:
        wait_port(port, process)
        seconds, peak, hwm, idle, cpu = measure(process, port, files)
    finally:
        stop(process)
    return Run(seconds, len(files), peak, hwm, idle, cpu)


def node_config(work: Path, port: int, pdu: int, process_jobs: bool) -> Path:
    lines = [
        "[paths]", f"state_dir = {json.dumps(str(work / 'state'))}", "",
        "[listener]", 'host = "127.0.0.1"', f"port = {port}", f'ae_title = "{CALLED_AE}"',
        f"max_pdu_bytes = {pdu}", "min_free_disk_mb = 64", "",
        "[[listener.allowed_senders]]", f'ae_title = "{CALLING_AE}"', "hosts = []", "",
        "[http]", "port = 0", "",
        "[logging]", 'level = "INFO"', "",
    ]
    if not process_jobs:
        # only reception: nothing completes by quiet period during the run, and no rule
        # matches a 7T study, so no job runs
        lines += ["[tracker]", "quiet_period_s = 3600", "max_wait_s = 7200", "",
                  "[rules]", "field_strengths_t = [1.5]", ""]
    path = work / "qsmnode.toml"
    path.write_text("\n".join(lines))
    return path


def stored_instances(state_dir: Path) -> int:
    from qsmnode.node.store import Store

    with Store.in_state_dir(state_dir, readonly=True) as store:
        return store.count_instances()


def run_qsmnode(files: list[Path], work: Path, pdu: int, process_jobs: bool) -> Run:
    port = free_port()
    config = node_config(work, port, pdu, process_jobs)
    log_path = work / "node.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "qsmnode", "serve", "--config", str(config)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=log_path.open("wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while "listening as" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        seconds, peak, hwm, idle, cpu = measure(process, port, files)
        received = stored_instances(work / "state")
    finally:
        stop(process)
    if process.returncode not in (0, None):
        print(f"warning: the node exited with {process.returncode}:\n"
              f"{log_path.read_text(errors='replace')[-3000:]}")
    return Run(seconds, received, peak, hwm, idle, cpu)


def durable_write_floor(files: list[Path], work: Path) -> float:
    """Seconds to keep every instance durably as the receiver does (spool write with its
    fsyncs and rename, then the store commit), without the network or parsing."""
    from pydicom.filereader import read_file_meta_info

    from qsmnode.dicom.wire import DatasetError, dataset_offset, file_prefix, inspect_dataset
    from qsmnode.node.spool import Spool
    from qsmnode.node.store import InstanceRecord, Store

    prepared = []
    for path in files:
        data = path.read_bytes()
        meta = read_file_meta_info(path)
        syntax = str(meta.TransferSyntaxUID)
        try:
            payload = data[dataset_offset(data):]
        except DatasetError:
            sys.exit(f"{path}: no File Meta Information Group Length")
        header = inspect_dataset(payload, syntax)
        assert header.sop_instance_uid and header.study_uid and header.series_uid
        prefix = file_prefix(str(meta.MediaStorageSOPClassUID), header.sop_instance_uid,
                             syntax, CALLING_AE)
        prepared.append((header, syntax, prefix, payload))
    state = work / "state"
    spool = Spool(state / "spool")
    with Store.in_state_dir(state) as store:
        started = time.perf_counter()
        for header, syntax, prefix, payload in prepared:
            assert header.study_uid and header.series_uid and header.sop_instance_uid
            target = spool.path_for(header.study_uid, header.series_uid,
                                    header.sop_instance_uid)
            size = spool.write(target, (prefix, payload))
            store.add_instance(InstanceRecord(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid or "", study_uid=header.study_uid,
                series_uid=header.series_uid, transfer_syntax_uid=syntax,
                path=target.relative_to(state).as_posix(), size=size, calling_ae=CALLING_AE,
                peer_address="127.0.0.1", received_at=time.time(),
                series_number=header.series_number, instance_number=header.instance_number,
                number_of_frames=header.number_of_frames,
                images_in_acquisition=header.images_in_acquisition,
                modality=header.modality, series_description=header.series_description,
            ), file_is_durable=True)  # as the receiver records it
        return time.perf_counter() - started


# ------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, help="send this folder's DICOM files instead")
    parser.add_argument("--size", default="slab", help="simulated study size (default: slab)")
    parser.add_argument("--style", default="siemens", help="simulated vendor style")
    parser.add_argument("--cache", type=Path, help=f"simulation cache (default: under "
                        f"{DEFAULT_CACHE})")
    parser.add_argument("--runs", type=int, default=5, help="transfers per receiver (best kept)")
    parser.add_argument("--pdu", type=int, default=16384,
                        help="maximum PDU size both receivers offer (default: dcmtk's 16384; "
                        f"at most {DCMTK_MAX_PDU})")
    parser.add_argument("--only", choices=("storescp", "qsmnode"), help="run one receiver")
    parser.add_argument("--reference", action="store_true",
                        help="also run a pynetdicom SCP whose handler does nothing, as is "
                        "and with its polling sleeps shortened")
    parser.add_argument("--process", action="store_true",
                        help="let the node group and load the study after it arrived")
    parser.add_argument("--work", type=Path, help="where receivers write (default: a temp dir;"
                        " put it on the spool's file system to measure that disk)")
    args = parser.parse_args()
    if not 4096 <= args.pdu <= DCMTK_MAX_PDU:
        parser.error(f"--pdu must be 4096-{DCMTK_MAX_PDU} (storescp's range)")

    if args.study is not None:
        folder = args.study
    else:
        cache = args.cache or DEFAULT_CACHE / f"{args.size}-{args.style}"
        folder = simulated_study(cache, args.size, args.style)
    files = study_files(folder)
    total_bytes = sum(p.stat().st_size for p in files)
    for path in files:  # warm the page cache so the sender never waits for the disk
        path.read_bytes()
    print(f"study: {len(files)} files, {total_bytes / 1e6:.1f} MB "
          f"({total_bytes / len(files) / 1e3:.0f} kB each) from {folder}")
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, PDU {args.pdu}, "
          f"best of {args.runs}, load average at start {os.getloadavg()[0]:.1f}")

    receivers = [r for r in ("storescp", "qsmnode") if args.only in (None, r)]
    if args.reference:
        receivers += ["pynetdicom", "pnd-nopoll"]
    runs: dict[str, list[Run]] = {name: [] for name in receivers}
    for n in range(args.runs):
        for name in receivers:
            with tempfile.TemporaryDirectory(dir=args.work, prefix=f"bench-{name}-") as tmp:
                work = Path(tmp)
                if name == "storescp":
                    run = run_storescp(files, work, args.pdu)
                elif name in ("pynetdicom", "pnd-nopoll"):
                    run = run_reference(files, work, args.pdu, nopoll=name == "pnd-nopoll")
                else:
                    run = run_qsmnode(files, work, args.pdu, args.process)
            status = "" if run.received == len(files) else f"  (ONLY {run.received} received)"
            print(f"  run {n + 1} {name:10s} {run.seconds:6.2f} s "
                  f"{len(files) / run.seconds:6.0f} inst/s  "
                  f"peak RSS {run.peak_rss_kib / 1024:6.1f} MiB  "
                  f"CPU {1e3 * run.cpu_s / len(files):5.2f} ms/instance{status}", flush=True)
            runs[name].append(run)
    with tempfile.TemporaryDirectory(dir=args.work, prefix="bench-floor-") as tmp:
        floor = min(durable_write_floor(files, Path(tmp)) for _ in range(2))

    print(f"\nload average at end {os.getloadavg()[0]:.1f}\n")
    print(f"{'receiver':12s} {'best':>7s} {'median':>7s} {'inst/s':>7s} {'MB/s':>6s} "
          f"{'RSS idle':>9s} {'RSS peak':>9s} {'VmHWM':>8s} {'CPU ms/inst':>12s}")
    best: dict[str, Run] = {}
    for name, done in runs.items():
        complete = sorted((r for r in done if r.received == len(files)), key=lambda r: r.seconds)
        if not complete:
            print(f"{name:12s} no complete run")
            continue
        best[name] = run = complete[0]
        median = complete[len(complete) // 2].seconds
        print(f"{name:12s} {run.seconds:6.2f}s {median:6.2f}s {len(files) / run.seconds:7.0f} "
              f"{total_bytes / 1e6 / run.seconds:6.1f} {run.idle_rss_kib / 1024:8.1f}M "
              f"{max(r.peak_rss_kib for r in complete) / 1024:8.1f}M "
              f"{max(r.hwm_kib for r in complete) / 1024:7.1f}M "
              f"{1e3 * min(r.cpu_s for r in complete) / len(files):12.2f}")
    print(f"{'durable write':12s} {floor:6.2f}s {'':7s} {len(files) / floor:7.0f} "
          f"{total_bytes / 1e6 / floor:6.1f}   (spool fsyncs + store commit alone, "
          f"{1e3 * floor / len(files):.2f} ms per instance)")
    if "storescp" in best:
        for name in ("qsmnode", "pynetdicom", "pnd-nopoll"):
            if name in best:
                ratio = best["storescp"].seconds / best[name].seconds
                goal = " (goal: at least 0.5)" if name == "qsmnode" else ""
                print(f"\n{name} / storescp rate: {ratio:.2f}{goal}", end="")
        print()


if __name__ == "__main__":
    main()
