"""Helpers for tests that run the node as a real peer: a ``qsmnode serve`` subprocess with its own
configuration and state in ``tmp_path``, dcmtk ``storescu`` as the scanner, deadline-based
waits, simulated studies, the tracker's settings, clock, records and spool for in-process tests,
and job functions with test hooks.

Test hooks never live in the product: :func:`hooked_job` is a job function of this module, and
a node that should use it is started with ``python -m tests.nodeutil --config FILE
--job-function tests.nodeutil:hooked_job`` (the same :func:`qsmnode.node.service.main` as
``qsmnode serve``, with another job function). What it does per study comes from the
``QSMNODE_TEST_HOOKS`` environment variable of the node (JSON, see :func:`hooked_job`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
from pynetdicom import AE, _config

from qsmnode.demo.pacs import free_port
from qsmnode.node.config import PathsConfig, PipelineConfig, RulesConfig, Settings, TrackerConfig
from qsmnode.node.receiver import SPOOL_DIRNAME
from qsmnode.node.recovery import recover
from qsmnode.node.spool import Spool
from qsmnode.node.store import InstanceRecord, Store, StoreError
from tests.conftest import REPO, require_tool

ALLOWED = "SCANNER7T"
HOOKS_ENV = "QSMNODE_TEST_HOOKS"
SCRIPT_ENV = "QSMNODE_TEST_SCRIPT"
MR = "1.2.840.10008.5.1.4.1.1.4"
T = TypeVar("T")



def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def wait_for(check: Callable[[], T], what: str, timeout_s: float = 60.0,
             interval_s: float = 0.1, log: Callable[[], str] | None = None) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout_s`` naming
    ``what`` (and the tail of ``log()``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log()[-4000:] if log is not None else ""
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}\n{tail}")
        time.sleep(interval_s)


class Node:
    """A node in a subprocess, with its own config and state under ``root``.

    ``sections`` adds TOML tables (``{"tracker": {"quiet_period_s": 1}}``, ``{"listener.tls":
    {...}}``); ``job_function`` starts it through this module with that job function; ``env``
    adds environment variables; ``senders`` maps allowed calling AE titles to their hosts.
    """

    def __init__(self, root: Path, *, sections: dict[str, dict[str, object]] | None = None,
                 job_function: str | None = None, env: dict[str, str] | None = None,
                 senders: dict[str, list[str]] | None = None, **listener: object) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.state_dir = root / "state"
        self.config = root / "qsmnode.toml"
        self.log_path = root / "node.log"
        self.job_function = job_function
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        settings = {"host": "127.0.0.1", "port": self.port, "min_free_disk_mb": 1,
                    "acse_timeout_s": 5, **listener}
        lines = ["[paths]", f"state_dir = {toml_value(self.state_dir)}", "", "[listener]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
        for ae_title, hosts in (senders or {ALLOWED: []}).items():
            lines += ["", "[[listener.allowed_senders]]", f"ae_title = {toml_value(ae_title)}",
                      f"hosts = {toml_value(hosts)}"]
        tables: dict[str, dict[str, object]] = {"http": {"port": 0},
                                                "logging": {"level": "INFO"}}
        for name, values in (sections or {}).items():
            tables[name] = {**tables.get(name, {}), **values}
        for name, values in tables.items():
            lines += ["", f"[{name}]"]
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        self.config.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------------------- the process

    def start(self) -> Node:
        """Start the node and wait until it listens (a restart appends to the same log)."""
        offset = len(self.log())
        if self.job_function is None:
            command = [sys.executable, "-m", "qsmnode", "serve", "--config", str(self.config)]
        else:
            command = [sys.executable, "-m", "tests.nodeutil", "--config", str(self.config),
                       "--job-function", self.job_function]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab"), cwd=REPO,
            env={**os.environ, **self.env},
        )
        process = self.process
        wait_for(lambda: "listening as" in self.log()[offset:] or process.poll() is not None,
                 "the node to start", 60, 0.05, self.log)
        if process.poll() is not None:
            pytest.fail(f"the node did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM: the node must exit cleanly, with status 0."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0, self.log()[-4000:]
        self.process = None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    # ------------------------------------------------------------------------------- the store

    def store(self) -> Store:
        return Store.in_state_dir(self.state_dir, readonly=True)

    def read(self, reader: Callable[[Store], T], default: T) -> T:
        """``reader(store)``, or ``default`` while the store cannot be read yet."""
        try:
            with self.store() as store:
                return reader(store)
        except (StoreError, sqlite3.Error):
            return default

    def count(self) -> int:
        return self.read(lambda s: s.count_instances(), 0)

    def jobs_in(self, *states: str) -> list[Any]:
        return self.read(lambda s: [j for j in s.jobs() if j.state in states], [])

    def wait_jobs(self, n: int, states: tuple[str, ...] = ("done", "failed"),
                  timeout_s: float = 90.0) -> list[Any]:
        """Wait until ``n`` jobs exist and all are in ``states``; return them."""
        def settled() -> list[Any] | None:
            jobs = self.read(lambda s: s.jobs(), [])
            return jobs if len(jobs) == n and all(j.state in states for j in jobs) else None

        return wait_for(settled, f"{n} jobs in {states}", timeout_s, 0.2, self.log)

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qsmnode", "status", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )

    def status_json(self) -> dict[str, Any]:
        done = self.status("--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------------------ the sender

    def spool_files(self) -> set[Path]:
        return set((self.state_dir / "spool").glob("*/*/*.dcm"))

    def storescu_command(self, *args: str | Path, calling: str = ALLOWED) -> list[str]:
        return [require_tool("storescu", "dcmtk"), "-aet", calling, "-aec", "QSMNODE",
                "127.0.0.1", str(self.port), *map(str, args)]

    def storescu(self, *args: str | Path, calling: str = ALLOWED, nodelay: bool = True,
                 ) -> subprocess.CompletedProcess[str]:
        # dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 (a delayed ACK per instance)
        env = {**os.environ, "TCP_NODELAY": "1" if nodelay else "0"}
        return subprocess.run(self.storescu_command(*args, calling=calling), capture_output=True,
                              text=True, timeout=180, env=env)

    def echoscu(self, *args: str, calling: str = ALLOWED, called: str = "QSMNODE",
                ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [require_tool("echoscu", "dcmtk"), "-aet", calling, "-aec", called, *args,
             "127.0.0.1", str(self.port)],
            capture_output=True, text=True, timeout=60,
        )




def make_node(nodes: list[Node], root: Path, **kwargs: Any) -> Node:
    node = Node(root, **kwargs)
    nodes.append(node)
    return node


# ------------------------------------------------------------------------------------------------
# Raw sends


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part 10 file (everything after the file meta), as stored."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length:]


def send_raw(port: int, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
             ) -> dict[str, pydicom.Dataset]:
    """C-STORE each file's dataset bytes unparsed (pynetdicom's chunked send); name -> status."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    first = next(iter(files.values()))
    meta = pydicom.dcmread(first, stop_before_pixels=True).file_meta
    ae = AE(ae_title=ALLOWED)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="QSMNODE")
    assert assoc.is_established
    try:
        return {name: assoc.send_c_store(path) for name, path in files.items()}
    finally:
        assoc.release()


# ------------------------------------------------------------------------------------------------
# Simulated studies


SMALL_SCAN = {"shape": (24, 28, 12), "voxel_size_mm": (7.0, 7.0, 12.0),
              "echo_times_s": (0.005, 0.0105, 0.016)}
"""The tiny preset's field of view on a coarse grid: 12 slices, 3 echoes (72 classic files)."""


@functools.cache
def small_simulation() -> Any:
    from qsmnode.sim.scanner import preset, simulate

    return simulate(preset("tiny", **SMALL_SCAN))  # type: ignore[arg-type]


QSM_SCAN = {"shape": (56, 68, 12), "voxel_size_mm": (3.0, 3.0, 12.0),
            "echo_times_s": (0.005, 0.0105, 0.016)}
"""The same field of view, slices, echoes and files as :data:`SMALL_SCAN`, on the tiny
preset's 3 mm in-plane grid: for the tests that run the real QSM and deliver it. On the
7 mm grid single-step TV's χ map is nearly flat (1st..99th percentile spread 0.00095 ppm,
below any plausibility floor that means something); here it spans 0.037 ppm
(:data:`qsmnode.qsm.quality.CHI_RANGE_FLOOR_PPM`)."""


@functools.cache
def qsm_simulation() -> Any:
    from qsmnode.sim.scanner import preset, simulate

    return simulate(preset("tiny", **QSM_SCAN))  # type: ignore[arg-type]


def write_study(out: Path, style: str, seed: int) -> list[Path]:
    """The small simulated acquisition written as ``style`` with study seed ``seed``."""
    from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom

    return write_dicom(small_simulation().gre, out, style, SimStudyInfo(seed=seed))


def write_qsm_study(out: Path, style: str, seed: int) -> list[Path]:
    """:func:`write_study` on the :data:`QSM_SCAN` grid (for the real QSM pipeline)."""
    from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom

    return write_dicom(qsm_simulation().gre, out, style, SimStudyInfo(seed=seed))


def study_uid(seed: int) -> str:
    from qsmnode.sim.vendor_dicom import SimStudyInfo

    return SimStudyInfo(seed=seed).study_instance_uid


# ------------------------------------------------------------------------------------------------
# The tracker and the store in-process: settings, a controlled clock, records and a spool


def settings_for(state_dir: Path, quiet: float = 1.0, max_wait: float = 10.0,
                 **rules: object) -> Settings:
    """Settings for the tracker and job tests: their jobs only load and check (no QSM)."""
    return dataclasses.replace(
        Settings(), paths=PathsConfig(state_dir=state_dir),
        tracker=TrackerConfig(quiet_period_s=quiet, max_wait_s=max_wait),
        rules=RulesConfig(**rules),  # type: ignore[arg-type]
        pipeline=PipelineConfig(qsm=False),
    )


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def add(store: Store, sop: str, series: str, at: float, *, study: str = "1.2.1",
        sop_class: str = MR, iia: int | None = None) -> None:
    store.add_instance(InstanceRecord(
        sop_instance_uid=sop, sop_class_uid=sop_class, study_uid=study, series_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"spool/{study}/{series}/{sop}.dcm",
        size=1, calling_ae="SCANNER7T", peer_address="127.0.0.1", received_at=at,
        images_in_acquisition=iia,
    ))


def ingest(state_dir: Path, store: Store, files: list[Path], at: float) -> None:
    """Put files in the spool as the receiver would, and record them (received ``at``)."""
    spool = Spool(state_dir / SPOOL_DIRNAME)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        target = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        os.utime(target, (at, at))
    recover(store, spool, state_dir)


# ------------------------------------------------------------------------------------------------
# A job function with test hooks


def hooked_job(spec: Any) -> dict[str, Any]:
    """The default job function, after the hooks set for the spec's study.

    ``$QSMNODE_TEST_HOOKS`` maps a study UID to hooks, applied in this order:
    ``{"marker": PATH}`` appends ``<pid> <job id> <attempt>`` to PATH at the start;
    ``{"exit": N}`` ends the process at once with status N (a crash);
    ``{"allocate_mb": N}`` allocates and touches N MiB (to exceed the memory budget);
    ``{"delay_s": S}`` sleeps S seconds before the real work (only in attempts up to
    ``"slow_attempts"`` when that is given);
    ``{"raise": TEXT}`` raises ``ValueError(TEXT)`` (a job function's own error);
    ``{"enospc_while": PATH}`` raises ``OSError(ENOSPC)`` while PATH exists (a full disk);
    ``{"raise_quoting": [KEYWORD, ...]}`` logs and raises a ``ValueError`` quoting those
    attributes' values in the first file, as a library does with a value it cannot use.
    """
    import numpy as np

    from qsmnode.node.jobs import execute_job

    hooks = json.loads(os.environ.get(HOOKS_ENV, "{}")).get(spec.study_uid, {})
    if "marker" in hooks:
        with open(hooks["marker"], "a") as marker:
            marker.write(f"{os.getpid()} {spec.job_id} {spec.attempt}\n")
    if "exit" in hooks:
        os._exit(int(hooks["exit"]))
    if "allocate_mb" in hooks:
        block = np.ones(int(hooks["allocate_mb"]) * 1024 * 1024 // 8)
        del block
    if "delay_s" in hooks and spec.attempt <= int(hooks.get("slow_attempts", spec.attempt)):
        time.sleep(float(hooks["delay_s"]))
    if "raise" in hooks:
        raise ValueError(hooks["raise"])
    if "raise_quoting" in hooks:
        import logging

        import pydicom

        ds = pydicom.dcmread(spec.files[0], stop_before_pixels=True)
        quoted = ", ".join(repr(str(ds.get(k, ""))) for k in hooks["raise_quoting"])
        logging.getLogger("highdicom").warning("cannot use %s", quoted)
        raise ValueError(f"Unable to convert {quoted} to 'DA' object")
    if "enospc_while" in hooks and os.path.exists(hooks["enospc_while"]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return execute_job(spec)


def scripted_job(spec: Any) -> dict[str, Any]:
    """A job function for the worker pool's tests (no pipeline).

    ``$QSMNODE_TEST_SCRIPT`` is ``{"marker_dir": DIR, "actions": [...]}``: each run appends
    ``<pid> <attempt>`` to ``DIR/<job id>`` and does the action of its run number (0-based;
    "ok" past the list): "ok" returns at once, "sigterm"/"sigkill" kill this process with that
    signal, "hang" ignores SIGTERM and sleeps, "sleep:S" sleeps S seconds then returns,
    "sigkill:S" sleeps S seconds then kills this process with SIGKILL. ``"actions"`` may also
    map a job id (as text) to its own list.
    """
    hooks = json.loads(os.environ.get(SCRIPT_ENV, "{}"))
    marker = Path(hooks["marker_dir"]) / str(spec.job_id)
    runs = len(marker.read_text().splitlines()) if marker.exists() else 0
    with open(marker, "a") as out:
        out.write(f"{os.getpid()} {spec.attempt}\n")
    actions = hooks.get("actions", [])
    if isinstance(actions, dict):
        actions = actions.get(str(spec.job_id), [])
    action = actions[runs] if runs < len(actions) else "ok"
    action, _, seconds = action.partition(":")
    time.sleep(float(seconds or 0))
    if action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    elif action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    return {"run": runs}


def _main() -> int:
    from qsmnode.node.service import main

    parser = argparse.ArgumentParser(description="qsmnode serve with another job function")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--job-function", required=True)
    args = parser.parse_args()
    return main(args.config, job_function=args.job_function)


if __name__ == "__main__":
    raise SystemExit(_main())
