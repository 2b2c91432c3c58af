"""The HL7 sender against a real MLLP peer: python-hl7's asyncio MLLP server in a subprocess
(:mod:`tests.hl7_ris`) plays the RIS; the store is a real one with done jobs in it.

Each test drives :meth:`HL7Sender.step` with a clock it moves (the retries' schedule), over
real connections: AA delivers once; AE, timeouts, a peer that closes mid-answer, garbage and a
wrong control ID are retried; AR fails with the RIS's reason (redacted of patient values); a
RIS killed mid-run gets each result acknowledged exactly once after it returns; a sender
started again on the same store sends what was left, and only that.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qsmnode.node.audit import AuditLog
from qsmnode.node.config import HL7Config, HL7DestinationConfig, SenderConfig, Settings
from qsmnode.node.hl7_facts import NO_ACCESSION
from qsmnode.node.hl7_message import control_id
from qsmnode.node.hl7_queue import HL7Queue
from qsmnode.node.hl7_sender import HL7Sender
from qsmnode.node.store import Store
from tests.hl7util import (
    ACCESSION,
    PATIENT_ID,
    PATIENT_NAME,
    Z_DEEP_LEFT_HAND,
    RisProcess,
    done_job,
    m1_record_from_truth,
    obx_rows,
    parsed,
)


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ris(tmp_path: Path) -> Any:
    servers: list[RisProcess] = []

    def make(answers: str = "aa", reason: str = "", **kwargs: Any) -> RisProcess:
        server = RisProcess(tmp_path, answers, reason, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def store(tmp_path: Path) -> Any:
    audit = AuditLog(tmp_path / "audit.log")
    with Store.in_state_dir(tmp_path / "state", audit=audit) as opened:
        yield opened
    audit.close()


def settings_for(tmp_path: Path, port: int, *, timeout_s: float = 5.0, max_attempts: int = 0,
                 **destination: Any) -> Settings:
    base = Settings()
    ris = HL7DestinationConfig("ris", "127.0.0.1", port, "TESTRIS", "TESTHOSP",
                               timeout_s=timeout_s, **destination)
    return replace(
        base, paths=replace(base.paths, state_dir=tmp_path / "state"),
        sender=SenderConfig(retry_initial_s=10.0, retry_max_s=40.0, max_attempts=max_attempts),
        hl7=HL7Config(destinations=(ris,)))


def sender_for(settings: Settings, store: Store, clock: Clock) -> HL7Sender:
    sender = HL7Sender(settings, store, clock=clock, jitter=0.0)
    sender._since = sender.queue.register(list(sender.destinations), 0.0)
    return sender


def messages(store: Store) -> list[Any]:
    return sorted(HL7Queue(store).messages(), key=lambda m: m.job_id)


def test_aa_delivers_one_oru_with_the_study_patient_and_findings(tmp_path, ris, store):
    server = ris().start()
    clock = Clock(1000.0)
    job_id = done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    sender = sender_for(settings_for(tmp_path, server.port), store, clock)

    assert sender.step()
    received = server.wait_received(1)
    assert [r["answer"] for r in received] == ["aa"]
    message = parsed(received[0])
    msh, pid, obr = message.segment("MSH"), message.segment("PID"), message.segment("OBR")
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(12)) == "2.5.1"
    assert str(msh(5)) == "TESTRIS" and str(msh(6)) == "TESTHOSP"
    assert message.unescape(str(pid(3)(1)(1))) == PATIENT_ID
    assert str(pid(3)(1)(4)) == "HOSP" and str(pid(3)(1)(5)) == "MR"
    assert str(pid(5)(1)(1)) == PATIENT_NAME.split("^")[0]
    assert str(pid(5)(1)(2)) == PATIENT_NAME.split("^")[1]
    assert str(pid(7)) == "19610203" and str(pid(8)) == "F"
    assert str(obr(18)) == ACCESSION
    job = store.job(job_id)
    study_uid = store.acquisition(job.acquisition_id).study_uid
    assert str(obr(20)) == study_uid
    assert str(obr(25)) == "P" and str(obr(7)) == "20260105093000"
    rows = obx_rows(message)
    finding = next(r for r in rows if r["code"] == "FINDING")
    assert finding["flag"] == "HH" and "left hand area raised" in finding["value"]
    deep = next(r for r in rows if r["code"] == "CHI-Z" and r["sub_id"] == "L-HAND.DEEP")
    assert float(deep["value"]) == pytest.approx(Z_DEEP_LEFT_HAND, abs=0.01)
    assert deep["flag"] == "HH" and deep["unit"] == "{z-score}"
    others = [r for r in rows if r["code"] == "CHI-Z" and r["sub_id"] != "L-HAND.DEEP"]
    assert others and all(r["flag"] == "N" for r in others)
    chi = [r for r in rows if r["code"] == "CHI"]
    assert chi and all(r["unit"] == "[ppm]" for r in chi)
    assert {r["sub_id"].split(".")[1] for r in chi} == {"DEEP", "MIDDLE", "SUPERFICIAL"}
    assert next(r for r in rows if r["code"] == "STUDY-UID")["value"] == study_uid

    [record] = messages(store)
    assert record.state == "sent" and record.attempts == 1 and record.last_ack_code == "AA"
    assert record.control_id == str(msh(10)) and record.abnormal == "HH"
    with store.reading() as db:  # the text of an acknowledged message is not kept
        assert db.execute("SELECT message FROM hl7_messages").fetchone()[0] is None
    assert not sender.step()  # nothing more to send
    assert len(server.received()) == 1
    audit = (tmp_path / "audit.log").read_text()
    events = [json.loads(line) for line in audit.splitlines()]
    assert [e["event"] for e in events if e["event"].startswith("hl7")] == [
        "hl7_queued", "hl7_sent"]
    for part in (*PATIENT_NAME.split("^"), "PID-4711", "19610203"):
        assert part not in audit


def test_ae_is_retried_with_backoff_under_the_same_control_id(tmp_path, ris, store):
    server = ris("ae,ae,aa", reason="RIS database busy").start()
    clock = Clock(1000.0)
    done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    sender = sender_for(settings_for(tmp_path, server.port), store, clock)

    sender.step()
    [record] = messages(store)
    assert record.state == "pending" and record.attempts == 1 and record.last_ack_code == "AE"
    assert "RIS database busy" in record.last_error
    assert record.next_try_at == pytest.approx(1010.0)
    clock.now = 1005.0
    sender.step()  # not due yet
    assert len(server.received()) == 1
    clock.now = 1010.0
    sender.step()
    [record] = messages(store)
    assert record.attempts == 2 and record.next_try_at == pytest.approx(1030.0)  # doubled
    clock.now = 1030.0
    sender.step()
    received = server.wait_received(3)
    assert [r["answer"] for r in received] == ["ae", "ae", "aa"]
    assert len({r["control_id"] for r in received}) == 1
    [record] = messages(store)
    assert record.state == "sent" and record.attempts == 3


def test_ar_fails_at_once_with_the_ris_reason_redacted(tmp_path, ris, store):
    family = PATIENT_NAME.split("^")[0]
    server = ris("ar", reason=f"patient {family} unknown in this RIS").start()
    clock = Clock(1000.0)
    done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    sender = sender_for(settings_for(tmp_path, server.port), store, clock)

    sender.step()
    [record] = messages(store)
    assert record.state == "failed" and record.last_ack_code == "AR"
    assert record.last_error == ("rejected by the RIS (AR): patient <PatientName> unknown in "
                                 "this RIS")
    clock.now = 1e6
    sender.step()
    assert len(server.received()) == 1  # not sent again
    assert family not in (tmp_path / "audit.log").read_text()


@pytest.mark.parametrize(("answer", "error"), [
    ("garbage", "not a usable HL7 acknowledgement"),
    ("wrongid", "acknowledged control ID 'NOTYOURS'"),
    ("half", "closed the connection in the middle of its answer"),
    ("close", "closed the connection before answering"),
])
def test_a_bad_answer_is_retried_until_an_aa(tmp_path, ris, store, answer, error):
    server = ris(f"{answer},aa").start()
    clock = Clock(1000.0)
    done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    sender = sender_for(settings_for(tmp_path, server.port), store, clock)

    sender.step()
    [record] = messages(store)
    assert record.state == "pending" and error in record.last_error, record.last_error
    clock.now = 1010.0
    sender.step()
    received = server.wait_received(2)
    assert [r["answer"] for r in received] == [answer, "aa"]
    assert messages(store)[0].state == "sent"


def test_silence_times_out_and_an_unreachable_ris_waits(tmp_path, ris, store):
    server = ris("silent,aa").start()
    clock = Clock(1000.0)
    done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    sender = sender_for(settings_for(tmp_path, server.port, timeout_s=0.5), store, clock)

    sender.step()
    [record] = messages(store)
    assert record.state == "pending" and "within 0.5 s" in record.last_error
    server.kill()
    clock.now = 1010.0
    sender.step()
    [record] = messages(store)
    assert record.attempts == 2 and "cannot connect" in record.last_error
    server.start("aa")
    clock.now = 1030.0
    sender.step()
    assert messages(store)[0].state == "sent"
    assert [r["answer"] for r in server.received()] == ["silent", "aa"]


def test_a_ris_killed_mid_run_gets_each_result_acknowledged_once(tmp_path, ris, store):
    server = ris("aa,silent").start()
    clock = Clock(1000.0)
    state = tmp_path / "state"
    jobs = [done_job(store, state, {"m1": m1_record_from_truth(), "version": f"v{i}"})
            for i in range(3)]
    sender = sender_for(settings_for(tmp_path, server.port, timeout_s=30.0), store, clock)

    import threading
    stepping = threading.Thread(target=sender.step)
    stepping.start()
    server.wait_received(2)  # the first acknowledged, the second unanswered
    server.kill()  # mid-exchange
    stepping.join(timeout=30)
    assert not stepping.is_alive()
    states = {m.job_id: m.state for m in messages(store)}
    assert states == {jobs[0]: "sent", jobs[1]: "pending", jobs[2]: "pending"}
    server.start("aa")
    clock.now = 1010.0
    sender.step()
    assert {m.state for m in messages(store)} == {"sent"}
    acknowledged = [r["control_id"] for r in server.received() if r["answer"] == "aa"]
    assert sorted(acknowledged) == sorted(m.control_id for m in messages(store))
    assert len(set(acknowledged)) == 3
    clock.now = 1e6
    sender.step()
    assert len(server.received()) == 4  # aa, silent (lost), aa, aa: nothing more


def test_a_new_sender_on_the_same_store_sends_what_was_left_once(tmp_path, ris, store):
    server = ris("aa").start()
    clock = Clock(1000.0)
    state = tmp_path / "state"
    settings = settings_for(tmp_path, server.port)
    first = done_job(store, state, {"m1": m1_record_from_truth(), "version": "a"})
    sender = sender_for(settings, store, clock)
    sender.step()
    second = done_job(store, state, {"m1": m1_record_from_truth(), "version": "b"})
    sender.queue_new()  # queued, then the node stops before sending it
    again = sender_for(settings, store, clock)
    again.step()
    assert {m.job_id: m.state for m in messages(store)} == {first: "sent", second: "sent"}
    received = server.received()
    assert len(received) == 2 and len({r["control_id"] for r in received}) == 2


def test_control_id_is_the_same_for_the_same_result(tmp_path, store):
    state = tmp_path / "state"
    result = {"m1": m1_record_from_truth(), "version": "same"}
    job_id = done_job(store, state, result)
    from qsmnode.node.hl7_facts import result_key

    job = store.job(job_id)
    key = control_id(result_key(store, job))
    assert key == control_id(result_key(store, store.job(job_id)))
    assert len(key) == 20 and key.startswith("QSM")
    other = done_job(store, state, result)
    assert control_id(result_key(store, store.job(other))) != key  # another acquisition


def test_max_attempts_ends_in_failed(tmp_path, ris, store):
    server = ris("ae", reason="try later").start()
    clock = Clock(1000.0)
    done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    sender = sender_for(settings_for(tmp_path, server.port, max_attempts=2), store, clock)
    sender.step()
    clock.now = 1010.0
    sender.step()
    [record] = messages(store)
    assert record.state == "failed" and record.attempts == 2
    clock.now = 1e6
    sender.step()
    assert len(server.received()) == 2


def test_no_accession_and_no_m1_are_said_in_the_oru_and_the_status(tmp_path, ris, store):
    server = ris("aa").start()
    clock = Clock(1000.0)
    state = tmp_path / "state"
    done_job(store, state, {"m1": {"error": "the M1 analysis could not run: no cortex in the "
                                            "slab"}, "version": "t"}, accession="")
    sender = sender_for(settings_for(tmp_path, server.port), store, clock)
    sender.step()
    message = parsed(server.wait_received(1)[0])
    assert str(message.segment("OBR")(18)) == ""
    rows = obx_rows(message)
    assert any(r["code"] == "NOTE" and r["value"] == NO_ACCESSION for r in rows)
    finding = next(r for r in rows if r["code"] == "FINDING")
    assert finding["status"] == "X"
    assert finding["value"].startswith("not assessable: the M1 analysis could not run")
    assert not [r for r in rows if r["code"] in ("CHI", "CHI-Z")]
    [record] = messages(store)
    assert record.state == "sent" and record.abnormal is None
    assert record.notes[0] == NO_ACCESSION and "not assessable" in record.notes[1]


def test_results_finished_before_the_ris_was_configured_are_not_sent(tmp_path, ris, store):
    server = ris("aa").start()
    state = tmp_path / "state"
    done_job(store, state, {"m1": m1_record_from_truth(), "version": "old"}, at=500.0)
    clock = Clock(1000.0)
    sender = HL7Sender(settings_for(tmp_path, server.port), store, clock=clock, jitter=0.0)
    sender.queue_new()  # registers the destination now (1000): the old job is left out
    assert messages(store) == []
    done_job(store, state, {"m1": m1_record_from_truth(), "version": "new"}, at=1001.0)
    sender.step()
    assert len(messages(store)) == 1 and len(server.wait_received(1)) == 1


def test_mllp_over_tls_verifies_the_ris(tmp_path, ris, store):
    from qsmnode.node.config import ClientTLSConfig
    from tests.tlsutil import certificates

    pem = certificates(tmp_path / "pki")
    server = ris("aa", tls=(pem["server_crt"], pem["server_key"])).start()
    clock = Clock(1000.0)
    done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    untrusted = settings_for(tmp_path, server.port, tls=ClientTLSConfig(enabled=True))
    sender_for(untrusted, store, clock).step()  # the system's CAs do not know the test CA
    [record] = messages(store)
    assert record.state == "pending" and "TLS with 127.0.0.1" in record.last_error
    assert "CERTIFICATE_VERIFY_FAILED" in record.last_error
    trusted = settings_for(tmp_path, server.port,
                           tls=ClientTLSConfig(enabled=True, ca_file=pem["ca_crt"]))
    clock.now = 1010.0
    sender_for(trusted, store, clock).step()
    assert messages(store)[0].state == "sent"
    assert [r["answer"] for r in server.received()] == ["aa"]


def test_a_version_5_store_gains_the_hl7_tables_and_keeps_its_rows(tmp_path):
    import sqlite3

    from qsmnode.node.store import MIGRATIONS, STORE_FILENAME

    folder = tmp_path / "old"
    folder.mkdir()
    db = sqlite3.connect(folder / STORE_FILENAME, isolation_level=None)
    for script in MIGRATIONS[:5]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 5")
    db.execute("INSERT INTO series (series_uid, study_uid, sop_class_uid, received_count, "
               "first_received_at, last_received_at) VALUES ('1.2.1', '1.2', '1.2.3', 1, 1, 1)")
    db.close()
    with Store.in_state_dir(folder, readonly=True) as old:
        assert HL7Queue(old).messages() == [] and HL7Queue(old).summary() == []
    with Store.in_state_dir(folder) as migrated:
        assert migrated.schema_version() == len(MIGRATIONS) and len(migrated.series()) == 1
        assert HL7Queue(migrated).register(["ris"], 5.0) == {"ris": 5.0}
        assert HL7Queue(migrated).register(["ris"], 9.0) == {"ris": 5.0}  # first seen stays


def test_a_ris_no_longer_configured_is_named_and_its_messages_wait(tmp_path, ris, store):
    from qsmnode.node.hl7_status import hl7_status

    server = ris("ae").start()
    clock = Clock(1000.0)
    done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    sender_for(settings_for(tmp_path, server.port), store, clock).step()
    renamed = replace(settings_for(tmp_path, server.port), hl7=HL7Config(destinations=(
        HL7DestinationConfig("ris2", "127.0.0.1", server.port, "TESTRIS", "TESTHOSP"),)))
    report = hl7_status(store, renamed)
    by_name = {d["destination"]: d for d in report["destinations"]}
    assert by_name["ris"]["peer"] is None and by_name["ris"]["pending"] == 1
    assert by_name["ris2"]["peer"] == f"TESTRIS@127.0.0.1:{server.port}"
    clock.now = 4e9  # later than the job (recorded at the real time)
    other = HL7Sender(renamed, store, clock=clock, jitter=0.0)
    other.step()  # the new RIS gets nothing of the old one's queue (the job predates it)
    assert [m.destination for m in messages(store)] == ["ris"]
    assert len(server.received()) == 1


def test_a_job_whose_images_are_gone_is_failed_with_why_and_sends_nothing(tmp_path, ris,
                                                                         store):
    server = ris("aa").start()
    clock = Clock(1000.0)
    state = tmp_path / "state"
    job_id = done_job(store, state, {"m1": m1_record_from_truth(), "version": "t"})
    for record in store.job_instances(job_id):
        (state / record.path).unlink()
    sender = sender_for(settings_for(tmp_path, server.port), store, clock)
    sender.step()
    [record] = messages(store)
    assert record.state == "failed" and record.attempts == 0
    assert "neither its source images nor its derived objects can be read" in record.last_error
    clock.now = 1e6
    sender.step()
    assert server.received() == []


def test_resend_queues_a_rejected_oru_again(tmp_path, ris, store):
    import subprocess
    import sys

    from tests.conftest import REPO

    server = ris("ar,aa", reason="order not yet known").start()
    clock = Clock(1000.0)
    done_job(store, tmp_path / "state", {"m1": m1_record_from_truth(), "version": "t"})
    sender = sender_for(settings_for(tmp_path, server.port), store, clock)
    sender.step()
    assert messages(store)[0].state == "failed"
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    done = subprocess.run([sys.executable, "-m", "qsmnode", "resend", "--all-failed",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "1 failed HL7 ORU message queued again" in done.stdout
    clock.now = 4e9
    sender.step()
    [record] = messages(store)
    assert record.state == "sent" and record.attempts == 1
    received = server.received()
    assert [r["answer"] for r in received] == ["ar", "aa"]
    assert received[0]["control_id"] == received[1]["control_id"]


def test_resend_builds_again_an_oru_that_could_not_be_built(tmp_path, ris, store):
    """The images were gone when the result was to be sent (no ORU, failed with why); once
    they are back (restored from a backup), ``qsmnode resend`` has the ORU built and sent."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    server = ris("aa").start()
    clock = Clock(1000.0)
    state = tmp_path / "state"
    job_id = done_job(store, state, {"m1": m1_record_from_truth(), "version": "t"})
    backup = tmp_path / "backup"
    for record in store.job_instances(job_id):
        (backup / record.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(state / record.path, backup / record.path)
    sender = sender_for(settings_for(tmp_path, server.port), store, clock)
    sender.step()
    [record] = messages(store)
    assert (record.state, record.attempts) == ("failed", 0)
    shutil.copytree(backup, state, dirs_exist_ok=True)
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\nstate_dir = "{state}"\n')
    done = subprocess.run([sys.executable, "-m", "qsmnode", "resend", "--all-failed",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "1 failed HL7 ORU message queued again" in done.stdout
    clock.now = 4e9
    sender.step()
    [again] = messages(store)
    assert again.state == "sent" and again.control_id == record.control_id
    assert len(server.received()) == 1
