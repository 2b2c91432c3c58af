"""The whole node with a RIS: dcmtk ``storescu`` sends a simulated study to ``qsmnode serve``,
the derived objects go to Debian's Orthanc by C-STORE, and one ORU^R01 goes to the test RIS
(python-hl7's MLLP server, :mod:`tests.hl7_ris`) and is acknowledged.

The job function is :func:`tests.hl7util.m1_job`: the derived objects and M1 record of the
simulation's truth, with z-scores from a norm the test sets (left hand area, deep layer:
z = 3.5), so the ORU's flags are known without the pipeline grading itself.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from qsmnode.demo.pacs import free_port
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom
from tests.deliveryutil import add_destination, orthanc_study_uids
from tests.hl7util import RisProcess, obx_rows, parsed
from tests.nodeutil import Node, make_node, small_simulation, toml_value, wait_for
from tests.orthanc import Orthanc

pytestmark = pytest.mark.slow

JOB = "tests.hl7util:m1_job"
QUICK = {"tracker": {"quiet_period_s": 1, "max_wait_s": 120},
         "sender": {"retry_initial_s": 0.5, "retry_max_s": 2}}
SEED = 83
NAME, PATIENT_ID, ACCESSION = "Zyxwvut^Quintessa", "PID-4711", "ACC7T0042"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hl7-source")
    info = SimStudyInfo(seed=SEED, patient_name=NAME, patient_id=PATIENT_ID,
                        accession_number=ACCESSION)
    write_dicom(small_simulation().gre, folder, "siemens", info)
    return folder


def add_ris(node: Node, ris: RisProcess, timeout_s: float = 5.0) -> None:
    table = {"name": "ris", "host": "127.0.0.1", "port": ris.port,
             "receiving_application": "TESTRIS", "receiving_facility": "TESTHOSP",
             "timeout_s": timeout_s}
    lines = ["", "[[hl7.destinations]]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    node.config.write_text(node.config.read_text() + "\n".join(lines) + "\n")


def hl7_report(node: Node) -> dict[str, Any]:
    return node.status_json()["hl7"]  # type: ignore[no-any-return]


def wait_acknowledged(node: Node, n: int, timeout_s: float = 90.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        report = hl7_report(node)
        [ris] = report["destinations"]
        return report if ris["sent"] == n and not ris["pending"] else None

    return wait_for(done, f"{n} ORU acknowledged", timeout_s, 0.5, node.log)


def test_a_study_ends_in_orthanc_and_as_one_acknowledged_oru(
        nodes: list[Node], tmp_path: Path, source: Path, orthanc: Orthanc) -> None:
    ris = RisProcess(tmp_path).start()
    http_port = free_port()
    node = make_node(nodes, tmp_path / "node", job_function=JOB,
                     sections={**QUICK, "http": {"port": http_port}})
    add_destination(node, orthanc)
    add_ris(node, ris)
    orthanc.start()
    try:
        node.start()
        assert node.storescu("+sd", "+r", source).returncode == 0
        (job,) = node.wait_jobs(1, timeout_s=180)
        assert job.state == "done", job.last_error
        report = wait_acknowledged(node, 1)
        [entry] = ris.wait_received(1)
        wait_for(lambda: node.read(lambda s: s.counts()["sends"], {}).get("pending") == 0,
                 "the derived objects in Orthanc", 60, 0.5, node.log)
    finally:
        ris.kill()
    header = pydicom.dcmread(next(p for p in sorted(source.rglob("*")) if p.is_file()),
                             stop_before_pixels=True)
    message = parsed(entry)
    pid, obr = message.segment("PID"), message.segment("OBR")
    assert str(pid(3)(1)(1)) == PATIENT_ID
    assert [str(pid(5)(1)(1)), str(pid(5)(1)(2))] == NAME.split("^")
    assert str(obr(18)) == ACCESSION == str(header.AccessionNumber)
    assert str(obr(20)) == str(header.StudyInstanceUID)
    rows = obx_rows(message)
    finding = next(r for r in rows if r["code"] == "FINDING")
    assert finding["flag"] == "HH" and "left hand area raised (z 3.5, HH)" in finding["value"]
    # the SR and SEG it names are the ones Orthanc received, in the source study
    assert orthanc_study_uids(orthanc) == {str(header.StudyInstanceUID)}
    with node.store() as store:
        derived = {r.sop_instance_uid: r.sop_class_uid for r in store.outbox(job_id=job.id)}
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances?expand")}
    for code in ("SR-UID", "SEG-UID", "KOS-UID"):
        uid = next(r["value"] for r in rows if r["code"] == code)
        assert uid in derived, (code, uid)
        assert uid in stored, (code, uid)

    [ris_row] = report["destinations"]
    assert ris_row["peer"] == f"TESTRIS@127.0.0.1:{ris.port}" and ris_row["failed"] == 0
    [record] = report["messages"]
    assert record["control_id"] == str(message.segment("MSH")(10))
    assert record["abnormal"] == "HH" and record["last_ack_code"] == "AA"
    table = node.status()
    assert table.returncode == 0 and "TESTRIS@127.0.0.1" in table.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    assert 'qsmnode_hl7_messages{destination="ris",state="sent"} 1.0' in metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as answer:
        page = answer.read().decode()
    assert "Results to the RIS (HL7)" in page
    node.stop()
    log = node.log()
    assert f"ORU {record['control_id']} (job {job.id}" in log and "acknowledged AA" in log
    audit = (node.state_dir / "audit.log").read_text()
    sent = [json.loads(line) for line in audit.splitlines() if '"hl7_sent"' in line]
    assert [e["control_id"] for e in sent] == [record["control_id"]]
    for text in (log, audit, page, table.stdout):
        for part in (*NAME.split("^"), PATIENT_ID):
            assert part not in text


def test_ris_down_and_node_killed_the_oru_arrives_once_when_both_are_back(
        nodes: list[Node], tmp_path: Path, source: Path) -> None:
    ris = RisProcess(tmp_path)  # not started: the RIS is down
    node = make_node(nodes, tmp_path / "node", job_function=JOB, sections=QUICK)
    add_ris(node, ris)
    node.start()
    assert node.storescu("+sd", "+r", source).returncode == 0
    (job,) = node.wait_jobs(1, timeout_s=180)
    assert job.state == "done", job.last_error

    def refused() -> dict[str, Any] | None:
        [row] = hl7_report(node)["destinations"]
        return row if row["pending"] == 1 and row["attempts"] >= 2 else None

    down = wait_for(refused, "retries while the RIS is down", 30, 0.5, node.log)
    assert "cannot connect to 127.0.0.1" in down["last_error"]
    node.kill()  # SIGKILL, with the ORU pending
    ris.start()
    try:
        node.start()
        wait_acknowledged(node, 1, 60)
        node.stop()
        node.start()  # a restart sends nothing again
        time.sleep(3)  # the HL7 sender looks for due messages every second
        node.stop()
        received = ris.received()
    finally:
        ris.kill()
    assert [r["answer"] for r in received] == ["aa"]
    [record] = hl7_report(node)["messages"]
    assert record["state"] == "sent" and record["attempts"] >= 3  # the refusals, then the AA
    assert node.log().count(f"ORU {record['control_id']} (job {job.id}, study") >= 3
    assert node.log().count("acknowledged AA") == 1
