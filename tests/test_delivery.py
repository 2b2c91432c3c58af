"""Delivery of the derived objects: the outbox, the store's sends, the sender against Debian's
Orthanc (and a TLS peer), ``qsmnode status`` / ``resend`` and ``qsmnode process``; then the sender's
rules on edge cases against a tiny in-process SCP with a fake clock (DIMSE warning statuses,
peers that never answer, down destinations, store errors and crashes mid-batch, TLS failures).

The derived objects come from the small simulated study's ground truth
(:mod:`tests.deliveryutil`) until the pipeline makes them itself: 30 objects in 7 series (QSM
and R2* Parametric Maps, 12 + 12 derived MR images, SEG, SR, 2 key images). Waits are
deadlines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from qsmnode.dicom.load import LoadedAcquisition, load_folder
from qsmnode.node import sender as sender_module
from qsmnode.node import spool as spool_module
from qsmnode.node.association import (
    AssociationFailed,
    OutgoingFile,
    Peer,
    describe_rejection,
    send_over_association,
)
from qsmnode.node.config import ClientTLSConfig, ConfigError, Settings, load_settings
from qsmnode.node.outbox import Outbox, write_datasets
from qsmnode.node.sender import Sender, backoff_s
from qsmnode.node.store import SCHEMA_VERSION, OutboxRecord, SendOutcome, Store
from tests.conftest import REPO, require_tool
from tests.deliveryutil import (
    DroppingStoreSCP,
    add_destination,
    delivery,
    kill,
    orthanc_series,
    orthanc_study_uids,
    rejecting_peer,
    settings_for,
    slow_requestor,
    truth_process,
    wait_delivered,
)
from tests.derivedutil import dciodvfy_errors
from tests.nodeutil import (
    Node,
    free_port,
    make_node,
    study_uid,
    wait_for,
    write_study,
)
from tests.orthanc import Orthanc

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

SEED = 71
JOB = "tests.deliveryutil:truth_job"
QUICK = {"tracker": {"quiet_period_s": 1, "max_wait_s": 120},
         "sender": {"retry_initial_s": 0.5, "retry_max_s": 2}}
SERIES_COUNTS = {501: 1, 502: 12, 503: 1, 504: 12, 505: 1, 506: 1, 507: 2, 508: 1}
"""Instances per derived series (series numbers 100 × 5 + n: the source series are 5 and 6);
508 is the key object selection."""
N_DERIVED = sum(SERIES_COUNTS.values())


# ------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    write_study(folder, "siemens", SEED)
    return folder


@pytest.fixture(scope="module")
def derived(source: Path) -> list[Dataset]:
    (loaded,) = load_folder(source)
    assert isinstance(loaded, LoadedAcquisition)
    files = [str(p) for p in sorted(source.rglob("*")) if p.is_file()]
    _, datasets = truth_process(loaded, files)
    assert len(datasets) == N_DERIVED
    return datasets















def cli(*args: str | Path, module: str = "qsmnode") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=180, cwd=REPO)


# ------------------------------------------------------------------------------------------------
# outbox and store (no network)


def test_outbox_files_are_durable_and_recorded_before_any_send(
    tmp_path: Path, derived: list[Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: (synced.append(fd),
                                                             real_fsync(fd))[1])
    with Store.in_state_dir(state) as store:
        outbox = Outbox(state)
        real_record = store.record_outbox

        def record(records: list[OutboxRecord], destinations: list[str], now: float) -> int:
            # every file is complete, in place and fsynced before the store learns of it
            assert store.sends() == []
            for r in records:
                path = state / r.path
                assert path.is_file() and path.stat().st_size == r.size
                assert pydicom.dcmread(path).SOPInstanceUID == r.sop_instance_uid
            assert len(synced) >= 2 * len(records)  # each file and its folder
            return real_record(records, destinations, now)

        monkeypatch.setattr(store, "record_outbox", record)
        records = outbox.add(store, derived[:5], ["pacs", "archive"], now=100.0)
        assert [r.sop_instance_uid for r in records] == [d.SOPInstanceUID for d in derived[:5]]
        for r, ds in zip(records, derived[:5], strict=True):
            assert r.path == (f"outbox/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/"
                              f"{ds.SOPInstanceUID}.dcm")
            assert r.sop_class_uid == ds.SOPClassUID and r.job_id is None
        sends = store.sends()
        assert len(sends) == 10 and {s.state for s in sends} == {"pending"}
        assert {s.destination for s in sends} == {"pacs", "archive"}
        assert not list(outbox.root.rglob("*.tmp"))

        # a crash between writing and recording: the unrecorded file and temporaries go
        stray = outbox.write(derived[5:6], now=101.0)[0]
        (outbox.root / "1.2" / "3.4").mkdir(parents=True)
        (outbox.root / "1.2" / "3.4" / ".5.6.abcd.tmp").write_bytes(b"half")
        assert outbox.recover(store) == (1, 1)
        assert not (state / stray.path).exists()
        assert all((state / r.path).is_file() for r in records)


def test_store_sends_outcomes_backoff_and_requeue(tmp_path: Path) -> None:
    def record(sop: str, study: str = "1.2.3") -> OutboxRecord:
        return OutboxRecord(sop, "1.2.840.10008.5.1.4.1.1.4", study, "1.2.3.9",
                            "1.2.840.10008.1.2.1", f"outbox/{study}/1.2.3.9/{sop}.dcm", 10, 1.0)

    with Store.in_state_dir(tmp_path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.record_outbox([record("9.1"), record("9.2"), record("9.3", "1.2.4")],
                                   ["a", "b"], 10.0) == 6
        assert len(store.due_sends(10.0, ["a"])) == 3 and store.due_sends(9.0, ["a"]) == []
        store.record_send_outcomes([
            SendOutcome("9.1", "a", True, 0),
            SendOutcome("9.2", "a", False, 0xA700, "0xA700 (out of resources)", 20.0),
            SendOutcome("9.3", "a", False, None, "gone", 20.0, give_up=True),
        ], 11.0)
        assert [d.sop_instance_uid for d in store.due_sends(15.0, ["a"])] == []
        assert [d.sop_instance_uid for d in store.due_sends(20.0, ["a"])] == ["9.2"]
        assert store.next_send_at(["a"]) == 20.0 and store.next_send_at(["b"]) == 10.0
        (a, b) = store.delivery()
        assert (a.destination, a.pending, a.sent, a.failed, a.attempts, a.retries) == (
            "a", 1, 1, 1, 3, 0)
        assert a.last_error in ("gone", "0xA700 (out of resources)") and a.next_try_at == 20.0
        assert (b.pending, b.sent, b.attempts) == (3, 0, 0)
        assert store.counts()["sends"] == {"pending": 4, "sent": 1, "failed": 1}

        # a job's results are recorded with the job's end, or not at all
        assert not store.finish_job(99, "me", {}, 12.0, outbox=[record("9.4")],
                                    destinations=["a"])
        assert store.outbox(study_uid="1.2.3") == [record("9.1"), record("9.2")]

        # the same instance recorded again keeps its sends; a failed one is queued again
        assert store.record_outbox([record("9.1"), record("9.3", "1.2.4")], ["a"], 30.0) == 1
        assert {(s.sop_instance_uid, s.state) for s in store.sends(destination="a")} == {
            ("9.1", "sent"), ("9.2", "pending"), ("9.3", "pending")}

        # resend: a study's sends (sent ones too), plus destinations added since
        assert store.requeue_sends(40.0, study_uid="1.2.3", destinations=["a", "b", "c"]) == 6
        study = store.sends(study_uid="1.2.3")
        assert len(study) == 6 and {(s.state, s.attempts) for s in study} == {("pending", 0)}
        store.record_send_outcomes([SendOutcome("9.3", "a", False, None, "x", 50.0, True)], 41)
        assert store.requeue_sends(42.0, failed_only=True) == 1
        assert store.sends(state="failed") == []


def test_backoff_doubles_to_its_ceiling_and_rejections_read_in_words() -> None:
    assert [backoff_s(n, 10, 3600) for n in (1, 2, 3, 4, 9, 10, 50)] == [
        10, 20, 40, 80, 2560, 3600, 3600]
    assert all(10 <= backoff_s(1, 10, 3600, 0.1) <= 11 for _ in range(50))
    assert backoff_s(12, 10, 3600, 0.1) == 3600

    class Rejection:
        result, result_source, diagnostic = 1, 1, 3
        reason_str = "Calling AE title not recognised"

    assert describe_rejection(Rejection()) == (
        "calling AE title not recognised (permanent rejection by the service user; result 1, "
        "source 1, diagnostic 3)")


@pytest.mark.parametrize("slow", [False, True], ids=["", "requestor-slower-than-the-close"])
def test_a_rejection_reads_as_a_rejection(slow: bool, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when pynetdicom's requesting thread looks only after the rejection has closed the
    connection (it then reads the association as aborted)."""
    if slow:
        slow_requestor(monkeypatch)
    path = tmp_path / "1.dcm"
    pydicom.dcmwrite(path, tiny_instance(1), enforce_file_format=True)
    files = [sender_module.OutgoingFile(path, path, MR_IMAGE, ExplicitVRLittleEndian)]
    with rejecting_peer("STORE") as port:
        peer = Peer("x", "NOTSTORE", "127.0.0.1", port, "QSMNODE")
        with pytest.raises(AssociationFailed) as caught:
            send_over_association(peer, files, timeout_s=30)
    assert caught.value.rejected
    assert str(caught.value).startswith("association rejected by NOTSTORE@127.0.0.1:")
    assert "called AE title not recognised (permanent rejection" in str(caught.value)


def test_connection_refused_and_tls(tmp_path: Path, derived: list[Dataset]) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.presentation import build_context

    from tests.tlsutil import certificates

    paths = write_datasets(derived[:3], tmp_path / "files")
    files = [OutgoingFile(p, p, str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
             for p, d in zip(paths, derived[:3], strict=True)]
    port = free_port()
    with pytest.raises(AssociationFailed, match=r"cannot connect to STORE@127\.0\.0\.1:"
                       rf"{port}: .*Connection refused") as refused:
        send_over_association(Peer("x", "STORE", "127.0.0.1", port), files)
    assert not refused.value.rejected

    pem = certificates(tmp_path / "pki")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pem["ca_crt"])
    server_context.load_cert_chain(pem["server_crt"], pem["server_key"])
    server_context.verify_mode = ssl.CERT_REQUIRED
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    scp = AE(ae_title="STORE")
    scp.supported_contexts = [build_context(f.sop_class_uid, f.transfer_syntax_uid)
                              for f in files]
    server = scp.start_server(("127.0.0.1", port), block=False, ssl_context=server_context,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        tls = ClientTLSConfig(True, pem["ca_crt"], pem["client_crt"], pem["client_key"])
        results = send_over_association(
            Peer("x", "STORE", "127.0.0.1", port, "QSMNODE", tls), files)
        assert all(r.ok for r in results.values()) and len(results) == 3
        assert received == [str(d.SOPInstanceUID) for d in derived[:3]]
        untrusted = ClientTLSConfig(True, pem["rogue_crt"], pem["client_crt"],
                                    pem["client_key"])
        with pytest.raises(AssociationFailed, match="CERTIFICATE_VERIFY_FAILED"):
            send_over_association(
                Peer("x", "STORE", "127.0.0.1", port, "QSMNODE", untrusted), files)
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------------
# the sender against Orthanc, in process


@pytest.mark.slow
def test_orthanc_killed_mid_association_gets_everything_exactly_once(
    tmp_path: Path, derived: list[Dataset], orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom.association import Association

    orthanc.start()
    peer = Peer("pacs", orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)
    state = tmp_path / "state"
    now = [1000.0]
    with Store.in_state_dir(state) as store:
        Outbox(state).add(store, derived, ["pacs"], now=now[0])
        sender = Sender(settings_for(state, peer), store, clock=lambda: now[0], jitter=0,
                        timeout_s=10)
        real_send = Association.send_c_store
        calls = [0]

        def send_then_crash(self: Association, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 11:  # Orthanc dies with 10 instances stored
                assert orthanc.process is not None
                orthanc.process.send_signal(signal.SIGKILL)
                orthanc.process.wait()
            return real_send(self, *args, **kwargs)

        monkeypatch.setattr(Association, "send_c_store", send_then_crash)
        assert sender.step()
        monkeypatch.setattr(Association, "send_c_store", real_send)
        sends = store.sends()
        assert Counter(s.state for s in sends) == {"sent": 10, "pending": N_DERIVED - 10}
        lost = [s for s in sends if s.state == "pending"]
        assert {(s.attempts, s.next_try_at) for s in lost} == {(1, now[0] + 1.0)}
        assert all("no response" in s.last_error or "association was lost" in s.last_error
                   for s in lost)

        kill(orthanc)
        assert not sender.step()  # not due yet
        now[0] += 1.0
        assert sender.step()  # Orthanc is down: connection refused, retried later
        assert {(s.attempts, s.next_try_at) for s in store.sends(state="pending")} == {
            (2, now[0] + 2.0)}
        orthanc.start()
        now[0] += 2.0
        assert sender.step()
        (summary,) = store.delivery()
        assert (summary.sent, summary.pending, summary.failed) == (N_DERIVED, 0, 0)
        assert summary.retries == 2 * (N_DERIVED - 10) and summary.max_attempts == 3
    assert len(orthanc.instances()) == N_DERIVED
    assert orthanc_series(orthanc) == SERIES_COUNTS


# ------------------------------------------------------------------------------------------------
# the node


@pytest.mark.slow
def test_node_delivers_everything_once_into_the_source_study_when_the_pacs_is_back(
    nodes: list[Node], tmp_path: Path, source: Path, orthanc: Orthanc
) -> None:
    node = make_node(nodes, tmp_path / "node", sections=QUICK, job_function=JOB)
    add_destination(node, orthanc)  # Orthanc is not started yet: the PACS is down
    node.start()
    assert node.storescu("+sd", "+r", source).returncode == 0
    (job,) = node.wait_jobs(1)
    assert job.state == "done", job.last_error

    def retried() -> dict[str, Any] | None:
        d = delivery(node)
        return d if d["pending"] == N_DERIVED and d["retries"] >= N_DERIVED else None

    down = wait_for(retried, "a retry of every send", 30, 0.25, node.log)
    assert "cannot connect to ORTHANC@127.0.0.1" in down["last_error"]
    assert "Connection refused" in down["last_error"] and down["sent"] == 0

    # the outbox holds the job's results, recorded with the job; its folder's copies are gone
    with node.store() as store:
        records = store.outbox(job_id=job.id)
    assert len(records) == N_DERIVED
    assert all((node.state_dir / r.path).is_file() for r in records)
    assert not (node.state_dir / "jobs" / str(job.id) / "attempt-1" / "derived").exists()

    orthanc.start()
    summary = wait_delivered(node, N_DERIVED, 30)
    assert summary["retries"] >= N_DERIVED and summary["max_attempts"] >= 3
    assert summary["last_error"] is None
    assert summary["peer"] == f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    assert orthanc_study_uids(orthanc) == {study_uid(SEED)}
    assert orthanc_series(orthanc) == SERIES_COUNTS
    uids = set(orthanc.instances())
    assert len(uids) == N_DERIVED

    # sending again (resend) creates no duplicates: same UIDs, same instance count
    resent = cli("resend", "--study", study_uid(SEED), "--config", node.config)
    assert resent.returncode == 0, resent.stderr
    assert f"{N_DERIVED} sends queued again" in resent.stdout
    summary = wait_delivered(node, N_DERIVED, 30)
    assert (summary["attempts"], summary["retries"]) == (N_DERIVED, 0)  # reset, one try each
    assert set(orthanc.instances()) == uids and orthanc_series(orthanc) == SERIES_COUNTS
    table = node.status()
    assert table.returncode == 0 and f"outbox: {N_DERIVED} derived instances" in table.stdout
    assert "pacs" in table.stdout and "ORTHANC@127.0.0.1" in table.stdout
    node.stop()
    assert f"sender: pacs: {N_DERIVED} of {N_DERIVED} instances sent" in node.log()


@pytest.mark.slow
def test_refused_ae_title_stays_queued_and_is_delivered_after_the_fix_and_a_restart(
    nodes: list[Node], tmp_path: Path, source: Path
) -> None:
    require_tool("Orthanc", "orthanc")
    strict = Orthanc(tmp_path / "orthanc", accept_unknown=False).start()
    try:
        node = make_node(nodes, tmp_path / "node", sections=QUICK, job_function=JOB)
        add_destination(node, strict)
        node.start()
        assert node.storescu("+sd", "+r", source).returncode == 0
        node.wait_jobs(1)

        def refused() -> dict[str, Any] | None:
            # a first try may time out instead (a loaded machine, Orthanc still starting):
            # that is retried like any failure; the refusal is what must be reported
            d = delivery(node)
            return d if "association rejected" in (d["last_error"] or "") and d["retries"] >= 1 \
                else None

        status = wait_for(refused, "the refusal in the status", 30, 0.25, node.log)
        assert "association rejected by ORTHANC@127.0.0.1" in status["last_error"]
        assert "calling AE title not recognised" in status["last_error"]
        assert "permanent rejection" in status["last_error"]
        assert (status["pending"], status["sent"], status["failed"]) == (N_DERIVED, 0, 0)
        assert strict.instances() == []
        table = node.status()
        assert "calling AE title not recognised" in table.stdout
        node.stop()  # the sends stay queued in the store

        # the fix: Orthanc now knows the node's AE title
        kill(strict)
        config = json.loads(strict.config_path.read_text())
        config["DicomModalities"] = {"qsmnode": ["QSMNODE", "127.0.0.1", node.port]}
        strict.config_path.write_text(json.dumps(config))
        strict.start()
        node.start()  # pending sends resume after the restart
        summary = wait_delivered(node, N_DERIVED, 30)
        assert summary["retries"] >= N_DERIVED
        assert orthanc_series(strict) == SERIES_COUNTS
        assert orthanc_study_uids(strict) == {study_uid(SEED)}
        node.stop()
    finally:
        kill(strict)


# ------------------------------------------------------------------------------------------------
# qsmnode process


@pytest.mark.slow
def test_process_writes_valid_files_and_sends_them_without_duplicates(
    tmp_path: Path, source: Path, orthanc: Orthanc
) -> None:
    orthanc.start()
    target = f"127.0.0.1:{orthanc.dicom_port}:{orthanc.ae_title}"
    first = cli("process", source, "--out", tmp_path / "out1", "--send", target,
                module="tests.deliveryutil")
    assert first.returncode == 0, first.stderr
    assert f"sent {N_DERIVED} of {N_DERIVED}" in first.stdout
    files = sorted((tmp_path / "out1").rglob("*.dcm"))
    assert len(files) == N_DERIVED
    assert {f.parent.parent.name for f in files} == {study_uid(SEED)}
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    by_modality = {h.Modality: f for h, f in zip(headers, files, strict=True)}
    for modality in ("SEG", "SR"):
        assert dciodvfy_errors(by_modality[modality]) == [], modality
    pm = next(f for h, f in zip(headers, files, strict=True)
              if h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30")
    assert dciodvfy_errors(pm) == []
    assert len(orthanc.instances()) == N_DERIVED
    assert orthanc_series(orthanc) == SERIES_COUNTS

    # a configured destination by name, the same input again: same UIDs, no duplicates
    config = tmp_path / "qsmnode.toml"
    config.write_text(
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\n\n[[destinations]]\nname = "pacs"\n'
        f'ae_title = "{orthanc.ae_title}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n')
    second = cli("process", source, "--out", tmp_path / "out2", "--send", "pacs", "--config",
                 config, module="tests.deliveryutil")
    assert second.returncode == 0, second.stderr
    assert ({f.relative_to(tmp_path / "out2") for f in (tmp_path / "out2").rglob("*.dcm")}
            == {f.relative_to(tmp_path / "out1") for f in files})
    assert len(orthanc.instances()) == N_DERIVED

    unknown = cli("process", source, "--out", tmp_path / "out3", "--send", "nowhere",
                  "--config", config)
    assert unknown.returncode == 2 and "not a configured destination (pacs)" in unknown.stderr


def test_process_send_resumes_after_a_dropped_association(tmp_path: Path, source: Path,
                                                          ) -> None:
    peer = DroppingStoreSCP(drop_at=10, drops=1)
    try:
        done = cli("process", source, "--out", tmp_path / "out", "--send",
                   f"127.0.0.1:{peer.port}:QSMNODE", module="tests.deliveryutil")
    finally:
        peer.close()
    assert done.returncode == 0, done.stderr
    assert (f"sent {N_DERIVED} of {N_DERIVED}" in done.stdout
            and "(2 associations: resumed after a lost one)" in done.stdout), done.stdout
    written = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in (tmp_path / "out").rglob("*.dcm")}
    assert peer.stored == written and len(written) == N_DERIVED


@pytest.mark.slow
def test_process_command_runs_the_pipeline(tmp_path: Path) -> None:
    """``qsmnode process`` itself, with the real pipeline: QSM, the M1 analysis and every
    derived object, written as files; sending them to nobody is a clear error, and the files
    stay written. (One run: its success with a PACS that answers is the OHIF and fresh-clone
    tests'.)"""
    from tests.nodeutil import write_qsm_study

    source = tmp_path / "source"  # the grid the real QSM gives a real χ map on
    write_qsm_study(source, "siemens", SEED)
    done = cli("process", source, "--out", tmp_path / "out", "--send",
               f"127.0.0.1:{free_port()}:PACS")
    written = [p for p in (tmp_path / "out").rglob("*.dcm")]
    assert f"series 5, 6: {len(written)} derived objects written" in done.stdout, done.stderr
    classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in written}
    # This toy study (12 mm slices) is too coarse for a reliable M1 analysis: the maps are
    # written, and the reason is said, not skipped in silence (the M1 analysis either cannot
    # run, or runs and its quality checks fail: since the PDF + TV-ADMM default the QSM mask
    # covers M1 and the analysis runs)
    assert {PARAMETRIC_MAP, MR_IMAGE, SECONDARY_CAPTURE} <= classes
    assert ("the M1 analysis could not run" in done.stderr
            or ("M1 quality check" in done.stderr and "no z-score is reported" in done.stderr)), \
        done.stderr
    assert done.returncode == 1 and "not sent to" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_resend_needs_a_store_and_a_known_study(tmp_path: Path) -> None:
    config = tmp_path / "qsmnode.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    none = cli("resend", "--all-failed", "--config", config)
    assert none.returncode == 2 and "no store here" in none.stderr
    with Store.in_state_dir(tmp_path / "state"):
        pass
    unknown = cli("resend", "--study", "1.2.3", "--config", config)
    assert unknown.returncode == 1 and "no derived instances of study 1.2.3" in unknown.stderr
    ok = cli("resend", "--all-failed", "--config", config)
    assert ok.returncode == 0 and "0 sends queued again" in ok.stdout
    assert cli("resend", "--config", config).returncode == 2  # --study or --all-failed


# ================================================================================================
# the sender and the outbox against a tiny in-process pynetdicom SCP (or a port nothing
# listens on), with a fake clock: fast, no Orthanc, no pipeline. Each test pins one rule of
# the PACS administrator: nothing is lost, the PACS is never flooded (bounded associations
# and retries, no duplicate storms), and every failure has a clear reason in the log, never
# a traceback.

STUDY = "1.2.826.0.1.3680043.99.1"
SERIES = "1.2.826.0.1.3680043.99.1.1"


def tiny_instance(n: int, sop_class: str = MR_IMAGE) -> Dataset:
    """A tiny derived instance (no pixel data: the SCPs here do not look)."""
    sop = f"{SERIES}.{n}"
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 501, n
    ds.PatientID = "SENDER"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def slow_retry_settings(state_dir: Path, *peers: Peer, **sender: float) -> Settings:
    """Slow retries (10 s, at most an hour) unless given: the tests step the clock."""
    return settings_for(state_dir, *peers,
                        **{"retry_initial_s": 10.0, "retry_max_s": 3600.0, **sender})


@dataclass
class SCP:
    """An in-process storage SCP: ``answer(sop_uid)`` gives the status (default success) or
    ``None`` (never answer: sleep ``hang_s``)."""

    port: int
    received: list[str] = field(default_factory=list)
    associations: int = 0
    answer: Callable[[str], int | None] = lambda sop: 0
    hang_s: float = 2.0


@contextlib.contextmanager
def scp(classes: tuple[str, ...] = (MR_IMAGE, PARAMETRIC_MAP)) -> Iterator[SCP]:
    from pynetdicom import AE, evt

    state = SCP(free_port())

    def on_store(event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        status = state.answer(sop)
        if status is None:
            time.sleep(state.hang_s)
            return 0xA700
        state.received.append(sop)
        return status

    def on_accepted(event: Any) -> None:
        state.associations += 1

    ae = AE(ae_title="STORE")
    for uid in classes:
        ae.add_supported_context(uid, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", state.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store),
                                           (evt.EVT_ACCEPTED, on_accepted)])
    try:
        yield state
    finally:
        server.shutdown()


def peer_at(port: int, name: str = "pacs") -> Peer:
    return Peer(name, "STORE", "127.0.0.1", port)


def queue(state: Path, store: Store, datasets: list[Dataset], destinations: list[str],
          now: float = 1000.0) -> None:
    Outbox(state).add(store, datasets, destinations, now=now)


def states(store: Store, destination: str = "pacs") -> dict[str, str]:
    return {s.sop_instance_uid.rsplit(".", 1)[1]: s.state
            for s in store.sends(destination=destination)}


# ------------------------------------------------------------------------------------------------
# DIMSE statuses


def test_every_warning_status_counts_as_delivered(tmp_path: Path) -> None:
    """PS3.7 Annex C: 0001, 0107, 0116 and Bxxx are warnings: the PACS stored the object.
    Treating them as failures resends a stored object every backoff period, forever."""
    codes = {"1": 0x0000, "2": 0x0107, "3": 0x0116, "4": 0x0001, "5": 0xB00A, "6": 0xB007,
             "7": 0xA900, "8": 0xC000, "9": 0x0111}  # 0111: the PACS holds it already
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        server.answer = lambda sop: codes[sop.rsplit(".", 1)[1]]
        queue(tmp_path, store, [tiny_instance(int(n)) for n in codes], ["pacs"])
        sender = Sender(slow_retry_settings(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5)
        assert sender.step()
        got = states(store)
        assert got == {"1": "sent", "2": "sent", "3": "sent", "4": "sent", "5": "sent",
                       "6": "sent", "7": "pending", "8": "pending", "9": "sent"}
        refused = {s.sop_instance_uid.rsplit(".", 1)[1]: s for s in store.sends(state="pending")}
        assert "0xA900" in (refused["7"].last_error or "")
        assert "0xC000" in (refused["8"].last_error or "")
        now[0] += 12
        assert sender.step()
        assert sorted(server.received) == sorted([f"{SERIES}.{n}" for n in codes]
                                                 + [f"{SERIES}.7", f"{SERIES}.8"])


# ------------------------------------------------------------------------------------------------
# one bad object must not stop the others, nor make the sender loop


def test_unreadable_outbox_file_fails_alone_without_resending_the_batch(tmp_path: Path) -> None:
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [tiny_instance(n) for n in (1, 2, 3)], ["pacs"])
        (record,) = [r for r in store.outbox() if r.sop_instance_uid.endswith(".2")]
        (tmp_path / record.path).write_bytes(b"not a DICOM file at all" * 10)
        sender = Sender(slow_retry_settings(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5)
        assert sender.step()
        assert states(store) == {"1": "sent", "2": "pending", "3": "sent"}
        (bad,) = store.sends(state="pending")
        assert bad.attempts == 1 and bad.next_try_at >= now[0] + 10
        assert "cannot send" in (bad.last_error or "") and str(record.path) in bad.last_error
        assert not sender.step()  # nothing due: no new association, no resend
        assert sorted(server.received) == [f"{SERIES}.1", f"{SERIES}.3"]
        assert server.associations == 1


def test_object_the_peer_never_answers_does_not_block_the_others(tmp_path: Path) -> None:
    """A PACS that hangs (or aborts) on one object: the next try must not start with that
    object again, or the objects behind it are never delivered."""
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        server.answer = lambda sop: None if sop.endswith(".1") else 0
        server.hang_s = 1.5
        queue(tmp_path, store, [tiny_instance(n) for n in (1, 2, 3, 4)], ["pacs"])
        sender = Sender(slow_retry_settings(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=0.5, jitter=0)
        assert sender.step()
        assert states(store) == {"1": "pending", "2": "pending", "3": "pending",
                                 "4": "pending"}
        errors = {s.sop_instance_uid.rsplit(".", 1)[1]: s.last_error
                  for s in store.sends()}
        assert "no response" in (errors["1"] or "")
        now[0] += 10
        assert sender.step()
        assert states(store) == {"1": "pending", "2": "sent", "3": "sent", "4": "sent"}
        assert sorted(server.received) == [f"{SERIES}.{n}" for n in (2, 3, 4)]


# ------------------------------------------------------------------------------------------------
# a destination that is down: bounded association attempts


def _count_associations(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []
    real = sender_module.send_over_association

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(sender_module, "send_over_association", counting)
    return calls


def test_down_destination_gets_one_association_per_retry_not_one_per_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a jitter drawn per send, the sends of one failed batch come due at different times
    and each gets its own association: N sends, N connection attempts per backoff period."""
    calls = _count_associations(monkeypatch)
    now = [1000.0]
    with Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [tiny_instance(n) for n in range(1, 41)], ["pacs"])
        sender = Sender(slow_retry_settings(tmp_path, peer_at(free_port())), store,
                        clock=lambda: now[0])  # the default jitter
        assert sender.step()
        assert len({s.next_try_at for s in store.sends()}) == 1  # the batch stays one batch
        while now[0] < 1100:
            now[0] += 0.25
            sender.step()
        # tries at 1000, ~1010, ~1031, ~1073 (10, 20, 40 s plus at most 10 %)
        assert len(calls) == 4
        assert {s.attempts for s in store.sends()} == {4}


def test_sends_due_at_scattered_times_share_the_next_try_of_a_down_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends queued at different times (several jobs during an outage) to a destination that
    refuses associations: once a try fails, the others wait for the next one instead of each
    opening its own association; a resend (attempts reset) is tried at once."""
    calls = _count_associations(monkeypatch)
    now = [1000.0]
    with Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [tiny_instance(n) for n in range(1, 11)], ["pacs"])
        for _ in range(5):  # five failed tries each, due 30 s apart
            store.record_send_outcomes(
                [SendOutcome(f"{SERIES}.{n}", "pacs", False, None, "down", 1000.0 + 30 * n)
                 for n in range(1, 11)], 900.0)
        sender = Sender(slow_retry_settings(tmp_path, peer_at(free_port())), store,
                        clock=lambda: now[0], jitter=0)
        while now[0] < 1400:
            now[0] += 1
            sender.step()
        assert len(calls) == 2  # at 1030 (one send due) and ~1350 (all of them)
        assert {s.attempts for s in store.sends()} == {6, 7}

        store.requeue_sends(now[0])  # qsmnode resend: not held back
        assert sender.step() and len(calls) == 3


def test_down_destination_does_not_hold_back_the_others(tmp_path: Path) -> None:
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        down = peer_at(free_port(), "down")
        queue(tmp_path, store, [tiny_instance(n) for n in (1, 2, 3)], ["down", "pacs"])
        sender = Sender(slow_retry_settings(tmp_path, down, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5)
        assert sender.step()
        assert set(states(store, "pacs").values()) == {"sent"}
        pending = store.sends(destination="down")
        assert {s.state for s in pending} == {"pending"}
        assert all("cannot connect to STORE@127.0.0.1" in (s.last_error or "")
                   for s in pending)


def test_peer_that_never_answers_the_association_request_times_out(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    now = [1000.0]
    try:
        with Store.in_state_dir(tmp_path) as store:
            queue(tmp_path, store, [tiny_instance(1)], ["pacs"])
            settings = slow_retry_settings(tmp_path, peer_at(listener.getsockname()[1]))
            sender = Sender(settings, store, clock=lambda: now[0], timeout_s=0.5)
            started = time.monotonic()
            assert sender.step()
            assert time.monotonic() - started < 5
            (send,) = store.sends()
            assert send.state == "pending" and "timed out" in (send.last_error or "")
    finally:
        listener.close()


# ------------------------------------------------------------------------------------------------
# the store failing, the node dying: no duplicate storm, no loss


def test_store_failure_after_a_batch_does_not_resend_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch went out but its outcomes cannot be recorded (disk full): retrying the step
    must not send the batch again and again; the outcomes are recorded once the store is
    back."""
    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [tiny_instance(n) for n in range(1, 6)], ["pacs"])
        real = store.record_send_outcomes
        failures = [2]

        def record(outcomes: Any, at: float) -> int:
            if failures[0]:
                failures[0] -= 1
                raise sqlite3.OperationalError("database or disk is full")
            return real(outcomes, at)

        monkeypatch.setattr(store, "record_send_outcomes", record)
        sender = Sender(slow_retry_settings(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5)
        for _ in range(4):
            with contextlib.suppress(Exception):
                sender.step()
            now[0] += 30
        assert sorted(server.received) == [f"{SERIES}.{n}" for n in range(1, 6)]
        assert set(states(store).values()) == {"sent"}
        assert {s.attempts for s in store.sends()} == {1}


def test_a_crash_mid_batch_resends_only_what_was_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcomes are recorded as the batch goes, not only at its end: a node killed during a
    long batch resends the last moments of it, not the whole batch."""
    from pynetdicom.association import Association

    now = [1000.0]
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [tiny_instance(n) for n in range(1, 31)], ["pacs"])
        real = Association.send_c_store
        calls = [0]

        class Killed(BaseException):
            pass

        def send_then_die(self: Association, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 21:
                raise Killed
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Association, "send_c_store", send_then_die)
        sender = Sender(slow_retry_settings(tmp_path, peer_at(server.port)), store,
                        clock=lambda: now[0], timeout_s=5, record_every_s=0)
        with pytest.raises(Killed):
            sender.step()
        monkeypatch.setattr(Association, "send_c_store", real)
        assert list(states(store).values()).count("sent") == 20

        restarted = Sender(slow_retry_settings(tmp_path, peer_at(server.port)), store,
                           clock=lambda: now[0], timeout_s=5)
        assert restarted.step()
        assert set(states(store).values()) == {"sent"}
        assert sorted(server.received) == sorted(f"{SERIES}.{n}" for n in range(1, 31))


# ------------------------------------------------------------------------------------------------
# the sender thread: alive whatever happens, no tracebacks, no tight loop


def test_sender_thread_survives_store_errors_and_logs_them_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with scp() as server, Store.in_state_dir(tmp_path) as store:
        real = store.next_send_at
        failures = [1]

        def next_send_at(destinations: Any) -> float | None:
            if failures[0]:
                failures[0] -= 1
                raise sqlite3.OperationalError("disk I/O error")
            return real(destinations)

        monkeypatch.setattr(store, "next_send_at", next_send_at)
        sender = Sender(slow_retry_settings(tmp_path, peer_at(server.port)), store, timeout_s=5)
        sender.start()
        try:
            deadline = time.monotonic() + 5
            while failures[0] and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            queue(tmp_path, store, [tiny_instance(1)], ["pacs"], now=time.time())
            sender.wake()
            deadline = time.monotonic() + 10
            while not server.received and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.received == [f"{SERIES}.1"]
        finally:
            sender.stop()
    assert any("disk I/O error" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_held_destination_does_not_make_the_sender_spin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_associations(monkeypatch)
    with Store.in_state_dir(tmp_path) as store:
        queue(tmp_path, store, [tiny_instance(n) for n in range(1, 4)], ["pacs"], now=time.time())
        steps = [0]
        sender = Sender(slow_retry_settings(tmp_path, peer_at(free_port()), retry_initial_s=30.0),
                        store, timeout_s=5)
        real_step = sender.step

        def step() -> bool:
            steps[0] += 1
            return real_step()

        monkeypatch.setattr(sender, "step", step)
        sender.start()
        time.sleep(1.5)
        sender.stop()
    assert len(calls) == 1
    assert steps[0] <= 5


def test_tls_failure_is_one_clear_line_without_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom logs a failed TLS handshake with ``LOGGER.exception``: a traceback in the
    node's log for a peer's certificate or protocol problem."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def not_tls() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"this is not TLS\r\n" * 16)
                time.sleep(0.5)

    thread = threading.Thread(target=not_tls, daemon=True)
    thread.start()
    caplog.set_level(logging.ERROR)
    path = tmp_path / "1.dcm"
    pydicom.dcmwrite(path, tiny_instance(1), enforce_file_format=True)
    files = [sender_module.OutgoingFile(path, path, MR_IMAGE, ExplicitVRLittleEndian)]
    peer = Peer("x", "STORE", "127.0.0.1", listener.getsockname()[1], "QSMNODE",
                ClientTLSConfig(True))
    try:
        with pytest.raises(AssociationFailed, match=r"cannot connect to .*SSL"):
            send_over_association(peer, files, timeout_s=5)
    finally:
        listener.close()
        thread.join(5)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# ------------------------------------------------------------------------------------------------
# the outbox


def test_outbox_validates_a_file_before_writing_it(tmp_path: Path) -> None:
    """A result without SOP Class UID is refused before its file is written: no file without
    a row in the outbox."""
    state = tmp_path / "state"
    bad = tiny_instance(1)
    del bad.SOPClassUID
    source = tmp_path / "bad.dcm"
    pydicom.dcmwrite(source, bad, enforce_file_format=True)
    outbox = Outbox(state)
    with pytest.raises(ValueError, match="SOPClassUID"):
        outbox.import_files([source])
    assert not list(outbox.root.rglob("*.dcm"))


def test_the_sender_waits_as_long_as_configured(tmp_path: Path) -> None:
    """``[sender] timeout_s``: a large object on a busy archive may need more than a minute."""
    config = tmp_path / "node.toml"
    config.write_text("[sender]\ntimeout_s = 240\n")
    settings = load_settings(config, env={})
    with Store.in_state_dir(tmp_path) as store:
        assert Sender(settings, store).timeout_s == 240.0
        assert Sender(settings, store, timeout_s=5).timeout_s == 5.0
    config.write_text("[sender]\ntimeout_s = 0\n")
    with pytest.raises(ConfigError, match=r"sender\.timeout_s"):
        load_settings(config, env={})
