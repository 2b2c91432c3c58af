"""The durable receiver, against real peers.

dcmtk ``storescu``/``echoscu`` play the scanner; the node runs as ``python -m qsmnode serve`` in
a subprocess on a free loopback port, with its configuration and state in ``tmp_path``.
Payloads no DICOM tool would send (truncated, garbage) go out through pynetdicom, which sends a
file's dataset bytes as they are.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO, StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE

from qsmnode.dicom.headers import MR_IMAGE_STORAGE
from qsmnode.dicom.wire import file_prefix
from qsmnode.node import spool as spool_module
from qsmnode.node.access import CALLING_AE_NOT_RECOGNISED
from qsmnode.node.config import PathsConfig, Settings
from qsmnode.node.receiver import (
    SPOOL_DIRNAME,
    SPOOL_WRITE_FAILED,
    STORE_COMMIT_FAILED,
    SUCCESS,
    Receiver,
)
from qsmnode.node.recovery import recover
from qsmnode.node.spool import MIB, Spool, SpoolError
from qsmnode.node.store import SCHEMA_VERSION, InstanceRecord, Store, StoreError
from tests import nodeutil
from tests.conftest import REPO, require_tool
from tests.nodeutil import (
    Node,
    dataset_bytes,
    send_raw,
)
from tests.tlsutil import certificates

ALLOWED = "SCANNER7T"


# ------------------------------------------------------------------------------------------------
# Helpers





RECEPTION_ONLY = {"tracker": {"quiet_period_s": 600, "max_wait_s": 600}}
"""Reception only: the tracker must not close series while a test looks at them."""


def make_node(nodes: list[Node], root: Path, *, tls: dict[str, object] | None = None,
              **kwargs: Any) -> Node:
    sections: dict[str, dict[str, object]] = dict(RECEPTION_ONLY)
    if tls is not None:
        sections["listener.tls"] = tls
    return nodeutil.make_node(nodes, root, sections=sections, **kwargs)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny simulated Siemens study: 40 slices x 4 echoes x (magnitude, phase) = 320 files."""
    out = tmp_path_factory.mktemp("study")
    result = subprocess.run(
        [sys.executable, "-m", "qsmnode", "simulate", "--size", "tiny", "--style", "siemens",
         "--seed", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    files = sorted((out / "dicom").rglob("*.dcm"))
    assert len(files) == 320
    return files


def by_sop_uid(files: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}


def secondary_capture(source: Path, out: Path) -> Path:
    """A non-MR instance of the same study (as a scanner's screen capture would be)."""
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.save_as(out, enforce_file_format=True)
    return out


# ------------------------------------------------------------------------------------------------
# Units: store, spool


def test_store_records_instances_once_and_series(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store here"):
        Store.in_state_dir(tmp_path, readonly=True)
    with Store.in_state_dir(tmp_path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.path.name == "qsmnode.sqlite3"
        journal = store._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert journal == "wal"

        def record(sop: str, at: float) -> InstanceRecord:
            return InstanceRecord(
                sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_uid="1.2",
                series_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"spool/1.2/1.2.3/{sop}.dcm", size=10, calling_ae=ALLOWED,
                peer_address="127.0.0.1", received_at=at, series_number=5, modality="MR",
            )

        assert store.add_instance(record("1.2.3.1", 100.0))
        assert store.add_instance(record("1.2.3.2", 101.0))
        assert not store.add_instance(record("1.2.3.2", 102.0))  # duplicate: no change
        [series] = store.series()
        assert (series.received_count, series.first_received_at, series.last_received_at,
                series.state) == (2, 100.0, 101.0, "open")
        store.set_expected_count("1.2.3", 2)
        assert store.mark_series_complete("1.2.3", at=103.0)
        assert not store.mark_series_complete("1.2.3")
        assert store.series("complete")[0].expected_count == 2
        assert store.summary() == {"series": 1, "series_open": 0, "series_complete": 1,
                                   "instances": 2, "bytes": 20}
    with Store.in_state_dir(tmp_path, readonly=True) as reader:
        assert [i.sop_instance_uid for i in reader.instances("1.2.3")] == ["1.2.3.1", "1.2.3.2"]


def test_instance_commit_relaxed_only_when_the_file_is_durable(tmp_path: Path) -> None:
    """The receiver's commit skips the WAL fsync (synchronous=NORMAL) for that one transaction;
    every other state change keeps synchronous=FULL."""
    with Store.in_state_dir(tmp_path) as store:
        record = InstanceRecord(
            sop_instance_uid="1.2.3.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            study_uid="1.2", series_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="spool/1.2/1.2.3/1.2.3.1.dcm", size=10, calling_ae=ALLOWED,
            peer_address="127.0.0.1", received_at=100.0)
        assert store.add_instance(record, file_is_durable=True)
        assert not store.add_instance(record, file_is_durable=True)
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
        assert store.count_instances() == 1


def test_spool_paths_are_uids_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError, match="invalid study UID"):
        spool.path_for("../../etc", "1.2", "1.2.3")
    path = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    assert spool.write(path, (b"abc", b"def")) == 6
    assert path.read_bytes() == b"abcdef" and list(spool.instance_files()) == [path]
    (path.parent / ".1.2.3.5.0000.tmp").write_bytes(b"partial")
    assert spool.remove_temp_files() == 1
    assert not Spool(tmp_path / "spool", min_free_bytes=2**62).has_room(1)


# ------------------------------------------------------------------------------------------------
# Units: the C-STORE handler, the spool's failure paths and recovery, without a network


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (value padded to even length)."""
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _mr_dataset(sop_uid: str, *, series_uid: str = "1.2.3.1", pixels: bytes = b"\0" * 64,
                extra: bytes = b"") -> bytes:
    """A minimal MR instance in explicit VR little endian: the UIDs, ``extra``, pixel data."""
    return b"".join((
        _element(0x00080016, b"UI", MR_IMAGE_STORAGE.encode()),
        _element(0x00080018, b"UI", sop_uid.encode()),
        _element(0x00080060, b"CS", b"MR"),
        extra,
        _element(0x0020000D, b"UI", b"1.2.3"),
        _element(0x0020000E, b"UI", series_uid.encode()),
        _element(0x7FE00010, b"OW", pixels),
    ))


EXPLICIT_LE = str(ExplicitVRLittleEndian)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A Receiver that is not listening, with its own store and spool (no disk floor)."""
    state_dir = tmp_path / "state"
    settings = Settings(paths=PathsConfig(state_dir=state_dir))
    with Store.in_state_dir(state_dir) as store:
        yield Receiver(settings, store, Spool(state_dir / SPOOL_DIRNAME))


def _c_store(receiver: Receiver, data: bytes, sop_uid: str,
             syntax: str = EXPLICIT_LE) -> tuple[int, str]:
    """Hand ``data`` to the receiver's C-STORE handler as pynetdicom would; (status, comment)."""
    event = SimpleNamespace(
        request=SimpleNamespace(AffectedSOPClassUID=MR_IMAGE_STORAGE,
                                AffectedSOPInstanceUID=sop_uid, DataSet=BytesIO(data)),
        context=SimpleNamespace(transfer_syntax=syntax),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title=ALLOWED, address="127.0.0.1",
                                                        port=11112)),
    )
    status = receiver.handle_store(event)  # type: ignore[arg-type]
    if isinstance(status, int):
        return status, ""
    return int(status.Status), str(status.get("ErrorComment", ""))


def test_a_resend_with_other_content_keeps_the_first_and_says_so(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    first = _mr_dataset("1.2.3.1.1", pixels=b"\1" * 64)
    assert _c_store(receiver, first, "1.2.3.1.1") == (SUCCESS, "")
    [record] = receiver.store.instances()
    stored = receiver.state_dir / record.path
    assert stored.read_bytes().endswith(first)
    with caplog.at_level(logging.DEBUG, logger="qsmnode.node.receiver"):
        assert _c_store(receiver, first, "1.2.3.1.1") == (SUCCESS, "")  # the same: quiet
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        other = _mr_dataset("1.2.3.1.1", pixels=b"\2" * 64)  # same size, other pixels
        assert _c_store(receiver, other, "1.2.3.1.1") == (SUCCESS, "")
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "duplicate 1.2.3.1.1 from SCANNER7T@127.0.0.1:11112 differs from the stored copy" \
        in warning.getMessage()
    assert "the stored copy is kept" in warning.getMessage()
    assert stored.read_bytes().endswith(first) and receiver.store.count_instances() == 1


def test_spool_write_failures_leave_no_temp_file_and_name_the_cause(
    receiver: Receiver, tmp_path: Path
) -> None:
    spool = receiver.spool
    # a study folder that is not a folder: even the clean-up of the temp file fails
    (spool.root / "1.2.9").write_bytes(b"")
    path = spool.path_for("1.2.9", "1.2.9.1", "1.2.9.1.1")
    with pytest.raises(SpoolError) as failed:
        spool.write(path, (b"abc",))
    assert failed.value.errno == errno.ENOTDIR
    # through the handler: 0xA701 naming the cause, not an internal error
    data = _mr_dataset("1.2.9.1.1", series_uid="1.2.9.1").replace(b"1.2.3\0", b"1.2.9\0")
    assert _c_store(receiver, data, "1.2.9.1.1") == (
        SPOOL_WRITE_FAILED, "spool write failed: Not a directory")

    def chunks() -> Iterator[bytes]:  # a failure that is not an OSError, mid-write
        yield b"abc"
        raise RuntimeError("the payload went away")

    path = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(RuntimeError):
        spool.write(path, chunks())
    assert not path.exists() and not list(spool.root.rglob("*.tmp"))


def test_spool_folders_are_durable_before_an_instance_in_them_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder another association made (and has not fsynced into its parent yet), or that
    an earlier run made and died before syncing: the first write into it syncs its entry and
    its parents' up to the spool before the instance counts as durable."""
    spool = Spool(tmp_path / "spool")
    synced: list[Path] = []
    real = spool_module._fsync_dir
    monkeypatch.setattr(spool_module, "_fsync_dir", lambda p: (synced.append(p), real(p)))
    series = spool.root / "1.2" / "1.2.3"
    series.mkdir(parents=True)  # made, not synced, by someone else
    spool.write(spool.path_for("1.2", "1.2.3", "1.2.3.4"), (b"abc",))
    assert {spool.root, spool.root / "1.2", series} <= set(synced)
    synced.clear()
    spool.write(spool.path_for("1.2", "1.2.3", "1.2.3.5"), (b"abc",))
    assert synced == [series]  # known durable now: only the file's own folder
    synced.clear()
    spool.write(spool.path_for("1.2", "1.2.4", "1.2.4.1"), (b"abc",))  # a new series folder
    assert synced == [spool.root / "1.2", spool.root / "1.2" / "1.2.4"]


def test_recovery_adopts_what_the_receiver_acknowledged(receiver: Receiver) -> None:
    """A crash (or power loss) took the rows: recovery reads each spool file as the receiver
    read it, so an instance that was acknowledged is adopted, never quarantined; a damaged file
    meta is quarantined and the node still starts."""
    # an undefined-length sequence whose defined-length item pydicom cannot parse: the receiver
    # walks past it (not the header) and stores it
    odd_item = b"\xff" * 16
    sequence = (struct.pack("<HH2s2xL", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF)
                + struct.pack("<HHL", 0xFFFE, 0xE000, len(odd_item)) + odd_item
                + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    odd = _mr_dataset("1.2.3.1.1", extra=sequence)
    assert _c_store(receiver, odd, "1.2.3.1.1") == (SUCCESS, "")
    plain = _mr_dataset("1.2.3.1.2")
    assert _c_store(receiver, plain, "1.2.3.1.2") == (SUCCESS, "")
    store, spool, state_dir = receiver.store, receiver.spool, receiver.state_dir
    paths = {r.sop_instance_uid: r.path for r in store.instances()}
    # a damaged file meta (the transfer syntax's VR garbled), as bit rot would leave it
    damaged = spool.path_for("1.2.3", "1.2.3.1", "1.2.3.1.3")
    prefix = file_prefix(MR_IMAGE_STORAGE, "1.2.3.1.3", EXPLICIT_LE, ALLOWED)
    at = prefix.index(b"\x02\x00\x10\x00UI") + 4
    spool.write(damaged, (prefix[:at] + b"\x55\x9a" + prefix[at + 2:],
                          _mr_dataset("1.2.3.1.3")))
    with store.transaction() as db:  # the rows a power loss took
        db.execute("DELETE FROM instances")
        db.execute("DELETE FROM series")

    result = recover(store, spool, state_dir)
    assert (result.adopted, result.quarantined, result.missing) == (2, 1, ())
    records = {r.sop_instance_uid: r for r in store.instances()}
    assert {uid: r.path for uid, r in records.items()} == paths
    assert records["1.2.3.1.1"].series_uid == "1.2.3.1"
    assert records["1.2.3.1.1"].calling_ae == ALLOWED
    assert records["1.2.3.1.1"].size == (state_dir / paths["1.2.3.1.1"]).stat().st_size
    assert (state_dir / "quarantine" / damaged.name).is_file() and not damaged.exists()
    # damaged again (written again, damaged again): the first quarantined copy stays too
    spool.write(damaged, (prefix[:at] + b"\x55\x9a" + prefix[at + 2:],
                          _mr_dataset("1.2.3.1.3")))
    assert recover(store, spool, state_dir).quarantined == 1
    assert {p.name for p in (state_dir / "quarantine").iterdir()} == {
        damaged.name, f"{damaged.stem}.1.dcm"}


def test_a_failed_commit_leaves_a_file_that_recovery_or_a_resend_completes(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0xA702: the file is complete in the spool but has no row. A resend stores it again;
    a restart adopts it. Either way no temporary file, and one row."""
    data = _mr_dataset("1.2.3.1.1")

    def fail(*args: object, **kwargs: object) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(receiver.store, "add_instance", fail)
        status, comment = _c_store(receiver, data, "1.2.3.1.1")
    assert (status, comment) == (STORE_COMMIT_FAILED, "store commit failed")
    path = receiver.spool.path_for("1.2.3", "1.2.3.1", "1.2.3.1.1")
    assert path.read_bytes().endswith(data) and not list(receiver.spool.root.rglob("*.tmp"))
    assert receiver.store.count_instances() == 0
    result = recover(receiver.store, receiver.spool, receiver.state_dir)
    assert (result.adopted, result.quarantined) == (1, 0)
    assert _c_store(receiver, data, "1.2.3.1.1") == (SUCCESS, "")  # the resend: a duplicate
    assert receiver.store.count_instances() == 1


def test_a_row_whose_file_is_gone_gets_the_file_again(receiver: Receiver) -> None:
    data = _mr_dataset("1.2.3.1.1")
    assert _c_store(receiver, data, "1.2.3.1.1") == (SUCCESS, "")
    [record] = receiver.store.instances()
    (receiver.state_dir / record.path).unlink()
    assert _c_store(receiver, data, "1.2.3.1.1") == (SUCCESS, "")
    assert (receiver.state_dir / record.path).read_bytes().endswith(data)
    assert receiver.store.count_instances() == 1


# ------------------------------------------------------------------------------------------------
# Real peers


def test_echo_and_association_refusals(nodes: list[Node], tmp_path: Path) -> None:
    node = make_node(nodes, tmp_path / "node", max_associations=1,
                     senders={ALLOWED: [], "REMOTE7T": ["192.0.2.10"]}).start()
    assert node.echoscu().returncode == 0

    unknown = node.echoscu(calling="INTRUDER")
    assert unknown.returncode != 0
    assert "Calling AE Title Not Recognized" in unknown.stdout + unknown.stderr
    wrong_host = node.echoscu(calling="REMOTE7T")
    assert wrong_host.returncode != 0
    wrong_called = node.echoscu(called="PACS")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr

    # one association at a time: a second is refused while the first is open
    ae = AE(ae_title=ALLOWED)
    ae.add_requested_context("1.2.840.10008.1.1")
    # (only admitted associations count against the limit, not refused or silent connections)
    deadline = time.monotonic() + 10
    held = ae.associate("127.0.0.1", node.port, ae_title="QSMNODE")
    while not held.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
        held = ae.associate("127.0.0.1", node.port, ae_title="QSMNODE")
    assert held.is_established
    try:
        assert node.echoscu().returncode != 0
    finally:
        held.release()
    assert node.echoscu().returncode == 0
    node.stop()

    log = node.log()
    assert "calling AE title 'INTRUDER' is not an allowed sender" in log
    assert "calling AE title 'REMOTE7T' is not allowed from 127.0.0.1" in log
    assert "called AE title 'PACS' is not ours ('QSMNODE')" in log
    assert "local limit exceeded (1 associations)" in log


def test_study_is_stored_as_received_once(
    nodes: list[Node], tmp_path: Path, study: list[Path]
) -> None:
    node = make_node(nodes, tmp_path / "node", store_other_sop_classes=True).start()
    sent = node.storescu("+sd", "+r", study[0].parent.parent)
    assert sent.returncode == 0, sent.stderr
    assert node.count() == 320

    sources = by_sop_uid(study)
    with node.store() as store:
        records = {r.sop_instance_uid: r for r in store.instances()}
        series = store.series()
    assert records.keys() == sources.keys()
    assert {node.state_dir / r.path for r in records.values()} == node.spool_files()
    assert sorted(s.received_count for s in series) == [160, 160]
    for sop_uid, source in sources.items():
        record = records[sop_uid]
        stored = node.state_dir / record.path
        assert dataset_bytes(stored) == dataset_bytes(source), stored  # byte for byte
        assert record.size == stored.stat().st_size and record.calling_ae == ALLOWED
        assert record.peer_address == "127.0.0.1"
    stored = pydicom.dcmread(node.state_dir / records[next(iter(sources))].path)
    original = pydicom.dcmread(next(iter(sources.values())))
    assert stored == original and stored.PixelData == original.PixelData
    assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert stored.file_meta.SourceApplicationEntityTitle == ALLOWED

    again = node.storescu("+sd", "+r", study[0].parent.parent)
    assert again.returncode == 0, again.stderr
    assert node.count() == 320 and len(node.spool_files()) == 320
    # the association's summary is logged after the release that ends storescu
    nodeutil.wait_for(lambda: "0 stored, 320 duplicates" in node.log(), "the duplicates' summary",
             timeout_s=30, log=node.log)

    # another SOP class of the same study is kept when store_other_sop_classes is true
    capture = secondary_capture(study[0], tmp_path / "capture.dcm")
    assert node.storescu(capture).returncode == 0
    assert node.count() == 321

    table = node.status()
    assert table.returncode == 0, table.stderr
    assert "series: 3 (3 open, 0 complete); instances: 321" in table.stdout
    assert re.search(r"^5\s+open\s+160\s", table.stdout, re.MULTILINE), table.stdout
    report = json.loads(node.status("--json").stdout)
    assert report["summary"]["instances"] == 321 and report["schema_version"] == SCHEMA_VERSION
    assert sorted(s["received_count"] for s in report["series"]) == [1, 160, 160]
    node.stop()
    log = node.log()
    patient = str(original.PatientName)
    assert patient and patient not in log and str(original.PatientID) not in log


def test_bad_payloads_fail_with_a_reason_and_the_node_goes_on(
    nodes: list[Node], tmp_path: Path, study: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(nodes, tmp_path / "node").start()
    source = study[7]
    whole = source.read_bytes()
    header_end = len(whole) - len(dataset_bytes(source))
    no_series = pydicom.dcmread(source)
    del no_series.SeriesInstanceUID
    no_series.save_as(tmp_path / "no_series.dcm", enforce_file_format=True)
    cases = {
        "truncated": whole[:-100],
        "cut_in_header": whole[:header_end + 300],
        "garbage": whole[:header_end] + bytes(range(256)) * 8,
        "not_dicom": whole[:header_end] + b"%PDF-1.4 this is not an image at all" * 20,
    }
    files = {}
    for name, data in cases.items():
        files[name] = tmp_path / f"{name}.dcm"
        files[name].write_bytes(data)
    files["no_series"] = tmp_path / "no_series.dcm"
    statuses = send_raw(node.port, files, monkeypatch)
    codes = {name: int(status.Status) for name, status in statuses.items()}
    comments = {name: str(status.get("ErrorComment", "")) for name, status in statuses.items()}
    assert codes == {"truncated": 0xC210, "cut_in_header": 0xC210, "garbage": 0xC210,
                     "not_dicom": 0xC210, "no_series": 0xC220}
    assert comments["truncated"] == "truncated: (7FE0,0010) needs 7616 bytes, 7516 left"
    assert comments["cut_in_header"].startswith("truncated:")
    assert comments["garbage"].startswith("corrupt:")
    assert comments["no_series"] == "SeriesInstanceUID missing"

    # a non-MR instance is accepted but not kept (store_other_sop_classes = false)
    capture = secondary_capture(study[0], tmp_path / "capture.dcm")
    assert node.storescu(capture).returncode == 0
    assert node.echoscu().returncode == 0  # still serving
    assert node.count() == 0 and not node.spool_files()
    assert node.storescu(*study[:2]).returncode == 0
    assert node.count() == 2
    node.stop()
    log = node.log()
    assert "failed with 0xC210: truncated: (7FE0,0010) needs 7616 bytes" in log
    assert "not MR and store_other_sop_classes is false" in log


def test_disk_floor_answers_out_of_resources(
    nodes: list[Node], tmp_path: Path, study: list[Path]
) -> None:
    node = make_node(nodes, tmp_path / "node", min_free_disk_mb=1 << 40).start()
    sent = node.storescu("-v", "--no-halt", *study[:3])
    output = sent.stdout + sent.stderr
    assert output.count("Received Store Response (Refused: OutOfResources)") == 3, output
    assert node.count() == 0 and not node.spool_files()
    assert not list((node.state_dir / "spool").rglob("*.tmp"))
    assert node.echoscu().returncode == 0
    node.stop()
    assert "failed with 0xA700: disk full" in node.log()


def _acknowledged(storescu_output: str) -> list[Path]:
    """Files that storescu -v reports as stored with status Success."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
    return done


def test_sigkill_mid_transfer_loses_nothing_acknowledged(
    nodes: list[Node], tmp_path: Path, study: list[Path]
) -> None:
    node = make_node(nodes, tmp_path / "node").start()
    env = {**os.environ, "TCP_NODELAY": "0"}  # ~25 instances/s: easy to kill mid-transfer
    sender = subprocess.Popen(
        [require_tool("storescu", "dcmtk"), "-v", "-aet", ALLOWED, "-aec", "QSMNODE",
         "127.0.0.1", str(node.port), *map(str, study)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while node.count() < 30:
            assert time.monotonic() < deadline and sender.poll() is None, node.log()
            time.sleep(0.01)
        node.kill()
        output, _ = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    acknowledged = _acknowledged(output)
    # The node commits before it answers, so the last few stored may not have been
    # acknowledged when it died; what matters is that every acknowledged one is stored.
    assert 20 <= len(acknowledged) < 320, output[-2000:]
    assert sender.returncode != 0  # the scanner saw the node go away

    # a crash between rename and commit leaves a complete file the store does not know,
    # and a crash mid-write leaves a temporary file
    sop_uids = by_sop_uid(study)
    last = study[-1]
    assert last not in acknowledged
    meta = pydicom.dcmread(last, stop_before_pixels=True)
    orphan = (node.state_dir / "spool" / meta.StudyInstanceUID / meta.SeriesInstanceUID
              / f"{meta.SOPInstanceUID}.dcm")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(last, orphan)
    temp = orphan.parent / f".{meta.SOPInstanceUID}.0badc0de.tmp"
    temp.write_bytes(last.read_bytes()[:1000])

    node.start()
    # ours, and one of the node's own when the kill came mid-write (on a busy machine)
    assert re.search(r"recovery: [12] temporary files removed", node.log()), node.log()[-3000:]
    assert not temp.exists()
    with node.store() as store:
        records = {r.sop_instance_uid: r for r in store.instances()}
    assert {node.state_dir / r.path for r in records.values()} == node.spool_files()
    assert str(meta.SOPInstanceUID) in records  # the orphan was adopted
    for path in acknowledged:
        sop_uid = next(uid for uid, p in sop_uids.items() if p == path)
        stored = node.state_dir / records[sop_uid].path
        assert dataset_bytes(stored) == dataset_bytes(path)

    resent = node.storescu(*study)  # the scanner retries the whole study
    assert resent.returncode == 0, resent.stderr
    assert node.count() == 320 and len(node.spool_files()) == 320
    node.stop()


def test_rows_lost_with_the_relaxed_commit_are_redone_from_the_spool(
    nodes: list[Node], tmp_path: Path, study: list[Path]
) -> None:
    """The instance rows are committed without fsync (the spool file is the durable record):
    a power loss may take the last of them. Simulate exactly that after a SIGKILL (delete the
    last rows, as an unsynced WAL tail would lose them): at restart every acknowledged instance
    is back in the store, from its spool file, with the bytes as received."""
    node = make_node(nodes, tmp_path / "node").start()
    env = {**os.environ, "TCP_NODELAY": "1"}
    sent = subprocess.run(
        [require_tool("storescu", "dcmtk"), "-v", "-aet", ALLOWED, "-aec", "QSMNODE",
         "127.0.0.1", str(node.port), *map(str, study)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert sent.returncode == 0, sent.stderr
    acknowledged = _acknowledged(sent.stdout + sent.stderr)
    assert len(acknowledged) == len(study)
    node.kill()

    lost = 57
    db = sqlite3.connect(node.state_dir / "qsmnode.sqlite3")
    with db:
        rows = db.execute("SELECT sop_instance_uid, series_uid FROM instances "
                          "ORDER BY received_at DESC, rowid DESC LIMIT ?", (lost,)).fetchall()
        db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?",
                       [(uid,) for uid, _ in rows])
        db.execute("UPDATE series SET received_count = (SELECT count(*) FROM instances "
                   "WHERE instances.series_uid = series.series_uid)")
    db.close()
    assert node.count() == len(study) - lost

    node.start()
    assert f"{lost} spool files added to the store" in node.log()
    with node.store() as store:
        records = {r.sop_instance_uid: r for r in store.instances()}
        assert sum(s.received_count for s in store.series()) == len(study)
    assert len(records) == len(study)
    for sop_uid, path in by_sop_uid(study).items():
        assert dataset_bytes(node.state_dir / records[sop_uid].path) == dataset_bytes(path)
    node.stop()


def test_tls_requires_a_trusted_client_certificate(nodes: list[Node], tmp_path: Path) -> None:
    pem = certificates(tmp_path / "pki")
    node = make_node(nodes, tmp_path / "node", max_associations=1, tls={
        "enabled": True, "cert_file": pem["server_crt"], "key_file": pem["server_key"],
        "ca_file": pem["ca_crt"], "require_client_cert": True,
    }).start()
    trust = ["+cf", str(pem["ca_crt"])]
    trusted = node.echoscu("+tls", str(pem["client_key"]), str(pem["client_crt"]), *trust)
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    rogue = node.echoscu("+tls", str(pem["rogue_key"]), str(pem["rogue_crt"]), *trust)
    assert rogue.returncode != 0
    anonymous = node.echoscu("+tla", *trust)
    assert anonymous.returncode != 0
    assert node.echoscu().returncode != 0  # plain DICOM on the TLS port
    again = node.echoscu("+tls", str(pem["client_key"]), str(pem["client_crt"]), *trust)
    assert again.returncode == 0  # the refusals left the node serving, no association held
    node.stop()
    log = node.log()
    assert log.count("refused TLS connection") == 3
    assert "CERTIFICATE_VERIFY_FAILED" in log
    refused = [e for e in _audit(node) if e["event"] == "connection_refused"]
    assert [e["kind"] for e in refused].count("tls_refused") == 3, refused
    assert "client certificate client" in log


# ------------------------------------------------------------------------------------------------
# The front door under hostile peers: bounded memory and slots before authentication


def _audit(node: Node) -> list[dict[str, Any]]:
    path = node.state_dir / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _proc_status(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status (VmHWM in KiB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _associate_rq(calling: str = ALLOWED, called: str = "QSMNODE",
                  max_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification and MR Image Storage."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    item = MaximumLengthNotification()
    item.maximum_length_received = max_length
    primitive.user_information = [item]
    contexts = []
    for number, uid in enumerate(("1.2.840.10008.1.1", MR_IMAGE_STORAGE)):
        context = build_context(uid, ExplicitVRLittleEndian)
        context.context_id = 2 * number + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.settimeout(60)
    return sock


def _read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU from ``sock``; b"" when the node closed the connection first."""
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return b""
        if not chunk:
            return b""
        data += chunk
    return data


def _closed_by_peer(sock: socket.socket) -> bool:
    """Read until the node closes the connection (True), or 60 s pass (False)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _flood(port: int, declared: int, pdu_type: int, prefix: bytes = b"",
           send: int = 32 * MIB) -> int:
    """Open a connection, send ``prefix``, then a PDU header declaring ``declared`` bytes and
    up to ``send`` bytes of its body; return how many body bytes went out before the node
    closed the connection."""
    sent = 0
    with _connect(port) as sock:
        try:
            if prefix:
                sock.sendall(prefix)
                assert _read_pdu(sock)[:1] == b"\x02"  # A-ASSOCIATE-AC
            sock.sendall(struct.pack(">BBL", pdu_type, 0, declared))
            chunk = b"\x00" * MIB
            while sent < send:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    return sent


def test_an_oversized_association_request_is_refused_unread(
        nodes: list[Node], tmp_path: Path) -> None:
    """Eight connections each declare a 256 MiB A-ASSOCIATE-RQ and send 32 MiB of it: the
    node reads none of it (its peak RSS grows by far less than one of them), audits each with
    the peer's address, and the scanner still gets in."""
    node = make_node(nodes, tmp_path / "node").start()
    assert node.process is not None
    pid = node.process.pid
    assert node.echoscu().returncode == 0
    before = _proc_status(pid, "VmHWM")

    with ThreadPoolExecutor(8) as pool:
        sent = list(pool.map(lambda _: _flood(node.port, 256 * MIB, 0x01), range(8)))
    assert all(n < 32 * MIB for n in sent), sent  # cut short by the node

    def refusals() -> list[dict[str, Any]] | None:
        found = [e for e in _audit(node) if e.get("kind") == "too_large"]
        return found if len(found) >= 8 else None

    refused = nodeutil.wait_for(refusals, "eight refusals in the audit log", 60, 0.1, node.log)
    assert len(refused) == 8
    assert all(e["address"].startswith("127.0.0.1:") and not e["associated"] for e in refused)
    grown_kib = _proc_status(pid, "VmHWM") - before
    assert grown_kib < 16 * 1024, f"peak RSS grew by {grown_kib} KiB"
    assert node.echoscu().returncode == 0
    node.stop()
    log = node.log()
    assert log.count("A-ASSOCIATE-RQ PDU of 268435456 bytes refused unread") == 8
    assert "Traceback" not in log


def test_a_p_data_pdu_beyond_the_negotiated_maximum_is_refused(
        nodes: list[Node], tmp_path: Path) -> None:
    node = make_node(nodes, tmp_path / "node", max_pdu_bytes=65536).start()
    sent = _flood(node.port, 16 * MIB, 0x04, prefix=_associate_rq())
    assert sent < 16 * MIB
    event = nodeutil.wait_for(
        lambda: next((e for e in _audit(node) if e.get("kind") == "too_large"), None),
        "the refusal in the audit log", 60, 0.1, node.log)
    assert ("P-DATA-TF PDU of 16777216 bytes refused unread (the negotiated maximum is 65536)"
            in event["reason"])
    assert node.echoscu().returncode == 0
    node.stop()
    assert "Traceback" not in node.log()


def test_p_data_right_after_the_accept_is_read_before_the_association_is_marked_up() -> None:
    """A scanner sends its first P-DATA as soon as it has the A-ASSOCIATE-AC, which can be
    before pynetdicom's thread marks the association established (a busy machine, four
    scanners at once). The gate bounds that P-DATA by the node's Maximum Length, not by the
    64 KiB allowed before an association; a P-DATA before any request is still refused."""
    from qsmnode.compat import PduGate

    def gate_on(sock: socket.socket) -> tuple[PduGate, list[object]]:
        assoc = SimpleNamespace(is_established=False, requestor=None,
                                dul=SimpleNamespace(socket=SimpleNamespace(socket=sock)))
        refused: list[object] = []
        gate = PduGate(assoc, request_limit=64 * 1024, pdata_limit=256 * 1024,
                       deadline=time.monotonic() + 10, idle_timeout_s=10,
                       on_refuse=refused.append)
        gate.install()
        return gate, refused

    request = _associate_rq()
    pdv = bytes(150_000)
    body = struct.pack(">L", 2 + len(pdv)) + b"\x01\x03" + pdv  # one PDV item
    pdata = struct.pack(">BBL", 0x04, 0, len(body)) + body
    for prefix, accepted in ((request, True), (b"", False)):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            gate, refused = gate_on(ours)
            theirs.sendall(prefix + pdata)
            if prefix:
                header = gate.recv(6)
                assert header[:1] == b"\x01" and len(gate.recv(len(prefix) - 6)) == len(prefix) - 6
            header = gate.recv(6)
            if accepted:
                assert header[:1] == b"\x04" and not refused
                assert len(gate.recv(len(body))) == len(body)
            else:
                assert header == bytearray()
                assert "P-DATA-TF PDU of 150006 bytes refused unread" in refused[0].reason


def test_silent_connections_cannot_lock_the_scanner_out(
        nodes: list[Node], tmp_path: Path) -> None:
    """max_associations (8) silent sockets do not keep the scanner out, nor do more of them:
    beyond the bound the oldest silent one is closed. A request cut short is closed at the
    ACSE timeout (it held its slot for ever before)."""
    node = make_node(nodes, tmp_path / "node", acse_timeout_s=600).start()
    assert node.process is not None
    pid = node.process.pid
    threads = _proc_status(pid, "Threads")
    cut = _connect(node.port)
    cut.sendall(_associate_rq()[:20])  # a request cut short: pynetdicom waited for the rest
    silent = [_connect(node.port) for _ in range(7)]
    # every connection has its association and DUL threads before the scanner comes
    nodeutil.wait_for(lambda: _proc_status(pid, "Threads") >= threads + 16,
                      "the node to take the eight connections", 60, 0.05, node.log)
    try:
        assert node.echoscu().returncode == 0
        silent.append(_connect(node.port))
        silent.append(_connect(node.port))
        assert node.echoscu().returncode == 0
        # the oldest ones were closed to make room, the cut request among them
        assert _closed_by_peer(cut)
        closed = [e for e in _audit(node) if e.get("kind") == "closed"]
        assert closed and "without an association" in closed[0]["reason"]
    finally:
        for sock in [cut, *silent]:
            sock.close()
    node.stop()
    assert "Traceback" not in node.log()


def test_a_request_cut_short_is_closed_at_the_acse_timeout(
        nodes: list[Node], tmp_path: Path) -> None:
    node = make_node(nodes, tmp_path / "node", acse_timeout_s=1).start()
    with _connect(node.port) as sock:
        sock.sendall(_associate_rq()[:20])
        assert _closed_by_peer(sock)
    event = nodeutil.wait_for(
        lambda: next((e for e in _audit(node) if e.get("kind") == "timeout"), None),
        "the timeout in the audit log", 60, 0.1, node.log)
    assert event["address"].startswith("127.0.0.1:")
    node.stop()


def test_hostile_pdus_are_one_line_each_audited_never_a_traceback(
        nodes: list[Node], tmp_path: Path) -> None:
    node = make_node(nodes, tmp_path / "node").start()
    request = _associate_rq()

    # a reset in the middle of a request
    sock = _connect(node.port)
    sock.sendall(request[:40])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    # a request whose items do not decode (pynetdicom: KeyError: 0)
    garbage = request[:74] + b"\x00" * (len(request) - 74)
    with _connect(node.port) as sock:
        sock.sendall(garbage)
        reply = _read_pdu(sock)
        assert reply[:1] == b"\x03", reply  # A-ASSOCIATE-RJ
    # a calling AE title with control characters gets a reject, not an abort
    bad_ae = request[:26] + b"SCAN\nNER\x1b[2J    " + request[42:]
    with _connect(node.port) as sock:
        sock.sendall(bad_ae)
        reply = _read_pdu(sock)
        assert reply[:1] == b"\x03" and reply[9] == CALLING_AE_NOT_RECOGNISED, reply
    # an unknown PDU type
    with _connect(node.port) as sock:
        sock.sendall(b"\x09\x00\x00\x00\x00\x02\x00\x00")
        assert _closed_by_peer(sock)

    kinds = nodeutil.wait_for(
        lambda: (k if len(k := [e["kind"] for e in _audit(node)
                              if e["event"] == "connection_refused"]) >= 4 else None),
        "four refusals in the audit log", 60, 0.1, node.log)
    assert sorted(kinds) == ["bad_ae_title", "reset", "undecodable", "undecodable"], kinds
    assert node.echoscu().returncode == 0
    node.stop()
    log = node.log()
    assert "Traceback" not in log
    assert "ERROR pynetdicom" not in log
    lines = [line for line in log.splitlines() if "connection from 127.0.0.1:" in line
             and ("refused" in line or "lost" in line)]
    assert len(lines) == 4, lines
    assert "calling AE title 'SCAN\\nNER\\x1b[2J' is not valid" in log
    assert "\x1b" not in log


def test_the_node_log_is_one_line_per_record_whatever_the_peer_sent() -> None:
    """A series description with a newline cannot forge a log line; pynetdicom's tracebacks
    become one line naming the exception."""
    from qsmnode.node.logtext import EscapingFormatter

    out = StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    forged = "gre\n2026-12-05 00:00:00,000 ERROR qsmnode: forged\x1b[2J"
    for name in ("qsmnode.node.tracker", "pynetdicom.dul"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.warning("series 1.2.3 (%s) passed over", forged)
            try:
                raise ValueError(f"cannot read {forged}")
            except ValueError:
                logger.exception("failed")
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
    lines = out.getvalue().splitlines()
    assert not any(line.startswith("2026-12-05") for line in lines), lines
    assert "\x1b" not in out.getvalue()
    assert lines[0] == ("WARNING qsmnode.node.tracker: series 1.2.3 (gre\\n2026-12-05 "
                        "00:00:00,000 ERROR qsmnode: forged\\x1b[2J) passed over")
    # the node's own error keeps its traceback, indented
    assert lines[1] == "ERROR qsmnode.node.tracker: failed"
    assert lines[2].startswith("    Traceback")
    pynetdicom_lines = [line for line in lines if line.startswith("ERROR pynetdicom")]
    assert pynetdicom_lines == [
        "ERROR pynetdicom.dul: failed (ValueError: cannot read gre\\n2026-12-05 00:00:00,000 "
        "ERROR qsmnode: forged\\x1b[2J)"]
    assert lines[-1] == pynetdicom_lines[0]
