"""DICOMweb STOW-RS delivery against Debian's Orthanc with its DICOMweb plugin
(orthanc-dicomweb): the derived objects of the simulated study arrive once, into the source
study; a server that is down keeps the sends queued; through the node, a STOW-RS destination
gets everything exactly once after the PACS comes back, like a C-STORE one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qsmnode.dicom.load import LoadedAcquisition, load_folder
from qsmnode.node.association import AssociationFailed, OutgoingFile, Peer
from qsmnode.node.outbox import write_datasets
from qsmnode.node.stow import stow_files
from tests.conftest import require_tool
from tests.deliveryutil import truth_process
from tests.nodeutil import Node, make_node, study_uid, toml_value, wait_for, write_study
from tests.orthanc import DicomWebOrthanc

pytestmark = pytest.mark.slow

SEED = 73
JOB = "tests.deliveryutil:truth_job"
QUICK = {"tracker": {"quiet_period_s": 1, "max_wait_s": 120},
         "sender": {"retry_initial_s": 0.5, "retry_max_s": 2}}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stow-source")
    write_study(folder, "siemens", SEED)
    return folder


@pytest.fixture
def dicomweb(tmp_path: Path) -> Any:
    require_tool("Orthanc", "orthanc")
    server = DicomWebOrthanc(tmp_path / "orthanc")
    yield server
    server.kill()


def outgoing(source: Path, folder: Path) -> list[OutgoingFile]:
    (loaded,) = load_folder(source)
    assert isinstance(loaded, LoadedAcquisition)
    files = [str(p) for p in sorted(source.rglob("*")) if p.is_file()]
    _, datasets = truth_process(loaded, files)
    paths = write_datasets(datasets, folder)
    return [OutgoingFile(ds.SOPInstanceUID, path, ds.SOPClassUID,
                         ds.file_meta.TransferSyntaxUID, ds.SOPInstanceUID)
            for ds, path in zip(datasets, paths, strict=True)]


def stored_uids(server: DicomWebOrthanc) -> list[str]:
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in server.get("/instances?expand")]


def test_stow_stores_every_derived_object_once(tmp_path: Path, source: Path,
                                               dicomweb: DicomWebOrthanc) -> None:
    files = outgoing(source, tmp_path / "out")
    peer = Peer("web", "ORTHANC", "127.0.0.1", dicomweb.dicom_port,
                stow_url=dicomweb.dicomweb_root)
    with pytest.raises(AssociationFailed, match="cannot reach STOW-RS"):
        stow_files(peer, files, timeout_s=5)  # not started: down
    dicomweb.start()
    outcomes = stow_files(peer, files, timeout_s=30)
    assert len(outcomes) == len(files)
    assert all(o.ok for o in outcomes.values()), {k: o.error for k, o in outcomes.items()
                                                  if not o.ok}
    uids = stored_uids(dicomweb)
    assert sorted(uids) == sorted(f.sop_instance_uid for f in files)
    assert {s["MainDicomTags"]["StudyInstanceUID"] for s in dicomweb.studies()} == {
        study_uid(SEED)}
    kinds = {i["MainDicomTags"].get("SOPInstanceUID"): i for i in dicomweb.get("/instances?expand")}
    assert len(kinds) == len(files)
    again = stow_files(peer, files, timeout_s=30)  # the same objects again: no duplicates
    assert all(o.ok for o in again.values())
    assert sorted(stored_uids(dicomweb)) == sorted(uids)


def test_a_missing_file_fails_alone(tmp_path: Path, source: Path,
                                    dicomweb: DicomWebOrthanc) -> None:
    files = outgoing(source, tmp_path / "out")
    files[3].path.unlink()
    dicomweb.start()
    peer = Peer("web", "ORTHANC", "127.0.0.1", dicomweb.dicom_port,
                stow_url=dicomweb.dicomweb_root)
    outcomes = stow_files(peer, files, timeout_s=30)
    assert outcomes[files[3].key].lost and "outbox file missing" in outcomes[files[3].key].error
    assert sum(o.ok for o in outcomes.values()) == len(files) - 1


def add_stow_destination(node: Node, server: DicomWebOrthanc) -> None:
    table = {"name": "web", "ae_title": server.ae_title, "host": "127.0.0.1",
             "port": server.dicom_port, "stow_url": server.dicomweb_root}
    lines = ["", "[[destinations]]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    node.config.write_text(node.config.read_text() + "\n".join(lines) + "\n")


def test_node_delivers_by_stow_once_when_the_pacs_is_back(
        nodes: list[Node], tmp_path: Path, source: Path, dicomweb: DicomWebOrthanc) -> None:
    node = make_node(nodes, tmp_path / "node", sections=QUICK, job_function=JOB)
    add_stow_destination(node, dicomweb)  # not started: the PACS is down
    node.start()
    assert node.storescu("+sd", "+r", source).returncode == 0
    (job,) = node.wait_jobs(1)
    assert job.state == "done", job.last_error
    with node.store() as store:
        derived = {r.sop_instance_uid for r in store.outbox(job_id=job.id)}

    def status() -> dict[str, Any]:
        (destination,) = node.status_json()["delivery"]["destinations"]
        return destination  # type: ignore[no-any-return]

    down = wait_for(lambda: (lambda d: d if d["retries"] >= len(derived) else None)(status()),
                    "retries while the PACS is down", 30, 0.25, node.log)
    assert "cannot reach STOW-RS" in down["last_error"] and down["sent"] == 0
    assert down["peer"] == f"STOW-RS {dicomweb.dicomweb_root}"
    dicomweb.start()
    done = wait_for(lambda: (lambda d: d if d["sent"] == len(derived) else None)(status()),
                    "every object sent by STOW-RS", 60, 0.25, node.log)
    assert done["pending"] == 0 and done["failed"] == 0
    assert sorted(stored_uids(dicomweb)) == sorted(derived)
    node.stop()
    events = [json.loads(line) for line in
              (node.state_dir / "audit.log").read_text().splitlines()]
    sent = [e["sop_instance_uid"] for e in events if e["event"] == "instance_sent"]
    assert sorted(sent) == sorted(derived)  # each once
