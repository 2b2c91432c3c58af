"""The audit log: whole JSON lines, the events of a real node run (a simulated study with a
distinctive patient name, a refused caller, delivery to a storage SCP), and no patient data."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qsmnode.node.audit import AuditLog
from tests.nodeutil import (
    Node,
    free_port,
    make_node,
    small_simulation,
    wait_for,
)

PATIENT_NAME = "ZQXAUDIT^PRIVATEPERSON"
PATIENT_ID = "PID-AUDIT-8675309"
SEED = 83


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_are_whole_json_objects_even_from_many_threads(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.log"
    audit = AuditLog(path)

    def write(n: int) -> None:
        for i in range(200):
            audit.record("instance_stored", thread=n, i=i, padding="x" * 500)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    audit.record("note", text="line\nbreak")  # JSON escapes it: still one line
    audit.close()
    audit.record("after_close")  # dropped, no error
    events = read_events(path)
    assert len(events) == 8 * 200 + 1
    assert Counter(e["thread"] for e in events[:-1]) == {n: 200 for n in range(8)}
    assert events[-1] == {**events[-1], "event": "note", "text": "line\nbreak"}
    assert all(e["time"].endswith("+00:00") for e in events)
    # reopening appends
    again = AuditLog(path)
    again.record("more")
    again.close()
    assert read_events(path)[-1]["event"] == "more"


def test_a_log_that_cannot_be_written_does_not_raise(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    audit.record("x", value=object())  # not JSON: converted with str()
    assert audit._fd is not None
    os.close(audit._fd)  # a broken file descriptor
    audit.record("y")
    audit.record("z")
    assert caplog.text.count("cannot write") == 1
    audit._fd = None


class StorageSCP:
    """A pynetdicom storage SCP that accepts everything (the PACS)."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list[str] = []
        self.ae = AE(ae_title="PACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server = self.ae.start_server(
            ("127.0.0.1", port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs() -> Iterator[StorageSCP]:
    scp = StorageSCP(free_port())
    yield scp
    scp.stop()


@pytest.mark.slow
def test_node_audits_who_sent_what_and_where_without_patient_data(
        tmp_path: Path, nodes: list[Node], pacs: StorageSCP) -> None:
    from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom

    info = SimStudyInfo(seed=SEED, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    files = write_dicom(small_simulation().gre, tmp_path / "study", "siemens", info)
    assert PATIENT_NAME.encode() in files[0].read_bytes()  # the name is in what is sent
    port = pacs.server.server_address[1]
    node = make_node(
        nodes, tmp_path / "node", job_function="tests.deliveryutil:truth_job",
        sections={"tracker": {"quiet_period_s": 1, "max_wait_s": 120},
                  "sender": {"retry_initial_s": 0.5, "retry_max_s": 2},
                  "destinations": {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                   "port": port}},
    )
    # [destinations] must be an array of tables: rewrite that header
    node.config.write_text(node.config.read_text().replace("[destinations]",
                                                           "[[destinations]]"))
    node.start()
    refused = node.storescu_command(files[0])
    refused[refused.index("-aet") + 1] = "INTRUDER"
    subprocess.run(refused, capture_output=True, timeout=60)
    done = node.storescu("+sd", "+r", tmp_path / "study")
    assert done.returncode == 0, done.stderr
    node.wait_jobs(1, ("done",), timeout_s=120)
    n_derived = node.read(lambda s: len(s.outbox()), 0)
    assert n_derived > 0
    wait_for(lambda: len(set(pacs.received)) == n_derived, "delivery to the PACS", 60, 0.2,
             node.log)
    audit_path = node.state_dir / "audit.log"
    wait_for(lambda: sum(e["event"] == "instance_sent" for e in read_events(audit_path))
             == n_derived, "the sends in the audit log", 10, 0.1, node.log)
    node.stop()

    text = audit_path.read_text()
    events = read_events(audit_path)
    for secret in (PATIENT_NAME, PATIENT_ID, "ZQXAUDIT", "PRIVATEPERSON", "8675309"):
        assert secret not in text
        assert secret not in node.log()
    kinds = Counter(e["event"] for e in events)
    assert kinds["node_started"] == 1 and kinds["node_stopped"] == 1
    assert kinds["instance_stored"] == len(files)
    assert kinds["series_complete"] == 2  # magnitude and phase
    assert kinds["acquisition_grouped"] == 1
    assert kinds["job_started"] == 1 and kinds["job_done"] == 1
    assert kinds["instance_sent"] == n_derived and not kinds["send_failed"]

    rejected = [e for e in events if e["event"] == "association_rejected"]
    assert rejected and rejected[0]["calling_ae"] == "INTRUDER"
    assert rejected[0]["address"].startswith("127.0.0.1:") and rejected[0]["reason"]
    accepted = [e for e in events if e["event"] == "association_accepted"]
    assert accepted and all(e["calling_ae"] == "SCANNER7T" and e["called_ae"] == "QSMNODE"
                            for e in accepted)
    stored = next(e for e in events if e["event"] == "instance_stored")
    assert stored["calling_ae"] == "SCANNER7T" and stored["address"] == "127.0.0.1"
    assert stored["study_uid"] == info.study_instance_uid
    assert {"series_uid", "sop_instance_uid", "sop_class_uid", "bytes"} <= stored.keys()
    grouped = next(e for e in events if e["event"] == "acquisition_grouped")
    assert grouped["state"] == "accepted" and grouped["job_id"] == 1
    sent = next(e for e in events if e["event"] == "instance_sent")
    assert sent["destination"] == "pacs" and sent["ae_title"] == "PACS"
    assert sent["peer"] == f"127.0.0.1:{port}" and sent["status"] == 0
    assert sent["study_uid"] == info.study_instance_uid
    assert {e["sop_instance_uid"] for e in events if e["event"] == "instance_sent"} == set(
        pacs.received)
    # in order: stored before grouped before the job before the sends
    order = [e["event"] for e in events]
    assert (order.index("instance_stored") < order.index("acquisition_grouped")
            < order.index("job_started") < order.index("job_done")
            < order.index("instance_sent"))
