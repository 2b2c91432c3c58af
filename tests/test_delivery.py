"""Delivery of the derived objects: the outbox, the store's sends, the sender against Debian's
Orthanc (and a TLS peer), ``qsmnode status`` / ``resend`` and ``qsmnode process``.

The derived objects come from the small simulated study's ground truth
(:mod:`tests.deliveryutil`) until the pipeline makes them itself: 30 objects in 7 series (QSM
and R2* Parametric Maps, 12 + 12 derived MR images, SEG, SR, 2 key images). Waits are
deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from qsmnode.dicom.load import LoadedAcquisition, load_folder
from qsmnode.node import spool as spool_module
from qsmnode.node.config import ClientTLSConfig
from qsmnode.node.outbox import Outbox, write_datasets
from qsmnode.node.sender import (
    AssociationFailed,
    OutgoingFile,
    Peer,
    Sender,
    backoff_s,
    describe_rejection,
    send_files,
)
from qsmnode.node.store import SCHEMA_VERSION, OutboxRecord, SendOutcome, Store
from tests.conftest import REPO, require_tool
from tests.deliveryutil import (
    DroppingStoreSCP,
    add_destination,
    delivery,
    kill,
    orthanc_series,
    orthanc_study_uids,
    settings_for,
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
SERIES_COUNTS = {501: 1, 502: 12, 503: 1, 504: 12, 505: 1, 506: 1, 507: 2}
"""Instances per derived series (series numbers 100 × 5 + n: the source series are 5 and 6)."""
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
    _, datasets = truth_process(loaded, files, None)
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


def test_connection_refused_and_tls(tmp_path: Path, derived: list[Dataset]) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.presentation import build_context

    from tests.test_receiver import _certificates

    paths = write_datasets(derived[:3], tmp_path / "files")
    files = [OutgoingFile(p, p, str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
             for p, d in zip(paths, derived[:3], strict=True)]
    port = free_port()
    with pytest.raises(AssociationFailed, match=r"cannot connect to STORE@127\.0\.0\.1:"
                       rf"{port}: .*Connection refused") as refused:
        send_files(Peer("x", "STORE", "127.0.0.1", port), files)
    assert not refused.value.rejected

    pem = _certificates(tmp_path / "pki")
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
        results = send_files(Peer("x", "STORE", "127.0.0.1", port, "QSMNODE", tls), files)
        assert all(r.ok for r in results.values()) and len(results) == 3
        assert received == [str(d.SOPInstanceUID) for d in derived[:3]]
        untrusted = ClientTLSConfig(True, pem["rogue_crt"], pem["client_crt"],
                                    pem["client_key"])
        with pytest.raises(AssociationFailed, match="CERTIFICATE_VERIFY_FAILED"):
            send_files(Peer("x", "STORE", "127.0.0.1", port, "QSMNODE", untrusted), files)
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
            d = delivery(node)
            return d if d["last_error"] and d["retries"] >= 1 else None

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
def test_process_command_runs_the_pipeline(tmp_path: Path, source: Path) -> None:
    """``qsmnode process`` itself, with the real pipeline: QSM, the M1 analysis and every
    derived object, written as files; sending to nobody is a clear error."""
    done = cli("process", source, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    written = [p for p in (tmp_path / "out").rglob("*.dcm")]
    assert f"series 5, 6: {len(written)} derived objects written" in done.stdout
    classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in written}
    # This toy study (7 mm voxels) is too small for the M1 analysis: the maps are written, and
    # the reason is said, not skipped in silence.
    assert {PARAMETRIC_MAP, MR_IMAGE, SECONDARY_CAPTURE} <= classes
    assert "the M1 analysis could not run" in done.stderr
    unsent = cli("process", source, "--out", tmp_path / "out2", "--send",
                 f"127.0.0.1:{free_port()}:PACS")
    assert unsent.returncode == 1 and "not sent to" in unsent.stderr
    assert "Traceback" not in unsent.stderr


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

