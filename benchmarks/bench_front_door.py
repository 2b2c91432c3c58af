"""The receiver's front door under hostile peers (issue 14).

1. Peak memory: eight connections each declare a 256 MiB A-ASSOCIATE-RQ and send up to
   ``--flood-mib`` of it; the node's peak RSS (VmHWM of its process) before and after.
2. Lockout under slot-holding: ``max_associations`` (8) silent sockets, each reopened as soon
   as the node closes it, for ``--hold-s`` seconds, while a scanner (pynetdicom C-ECHO) tries
   to associate every 0.25 s; reports the echoes that failed and the longest time the scanner
   was kept out.

``--repo DIR`` runs the node from another checkout (e.g. an older commit, for a before/after).
Usage::

    .venv/bin/python benchmarks/bench_front_door.py [--repo DIR] [--flood-mib 256] [--hold-s 40]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pynetdicom import AE

REPO = Path(__file__).resolve().parents[1]
SCANNER, NODE = "SCANNER7T", "QSMNODE"
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def start_node(repo: Path, root: Path, port: int) -> subprocess.Popen[bytes]:
    config = root / "qsmnode.toml"
    config.write_text(
        f'[paths]\nstate_dir = "{root / "state"}"\n\n[listener]\nhost = "127.0.0.1"\n'
        f"port = {port}\nmin_free_disk_mb = 1\n\n[[listener.allowed_senders]]\n"
        f'ae_title = "{SCANNER}"\n\n[http]\nport = 0\n\n[tracker]\nquiet_period_s = 600\n')
    log = (root / "node.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "qsmnode", "serve", "--config",
                                str(config)], cwd=repo, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 60
    while "listening as" not in (root / "node.log").read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the node did not start:\n" + (root / "node.log").read_text())
        time.sleep(0.05)
    return process


def echo(port: int) -> bool:
    ae = AE(ae_title=SCANNER)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE)
    if not assoc.is_established:
        return False
    ok = bool(assoc.send_c_echo())
    assoc.release()
    return ok


def flood(port: int, send_bytes: int) -> int:
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        try:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 256 * MIB))
            chunk = b"\0" * MIB
            while sent < send_bytes:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    return sent


def peak_memory(port: int, pid: int, flood_mib: int) -> None:
    before = status_kib(pid, "VmHWM")
    with ThreadPoolExecutor(8) as pool:
        sent = list(pool.map(lambda _: flood(port, flood_mib * MIB), range(8)))
    time.sleep(1.0)
    after = status_kib(pid, "VmHWM")
    print(f"peak RSS: {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after 8 "
          f"connections declaring 256 MiB (sent {min(sent) / MIB:.0f}-{max(sent) / MIB:.0f} "
          f"MiB each before the node closed them); scanner echo after: {echo(port)}")


def lockout(port: int, hold_s: float, holders: int = 8) -> None:
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.settimeout(0.5)
                    while not stop.is_set():
                        try:
                            if not sock.recv(1):
                                break  # the node closed it: reopen at once
                        except TimeoutError:
                            continue
            except OSError:
                time.sleep(0.01)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(holders)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    results: list[tuple[float, bool]] = []
    end = time.monotonic() + hold_s
    while time.monotonic() < end:
        results.append((time.monotonic(), echo(port)))
        time.sleep(0.25)
    stop.set()
    longest, since = 0.0, None
    for at, ok in results:
        if not ok and since is None:
            since = at
        elif ok and since is not None:
            longest, since = max(longest, at - since), None
    if since is not None:
        longest = max(longest, results[-1][0] - since)
    failed = sum(not ok for _, ok in results)
    print(f"slot-holding by {holders} sockets for {hold_s:g} s: {failed} of {len(results)} "
          f"scanner echoes failed; longest lockout {longest:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--flood-mib", type=int, default=256)
    parser.add_argument("--hold-s", type=float, default=40.0)
    args = parser.parse_args()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    root = Path(tempfile.mkdtemp(prefix="qsmnode-bench-front-door-"))
    port = free_port()
    node = start_node(args.repo.resolve(), root, port)
    try:
        peak_memory(port, node.pid, args.flood_mib)
        lockout(port, args.hold_s)
    finally:
        node.terminate()
        node.wait(timeout=60)
    print(f"node log: {root / 'node.log'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
