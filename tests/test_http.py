"""The HTTP endpoint: health, Prometheus metrics and the status page, served by waitress over a
real store (written through the Store API), fetched with urllib."""

from __future__ import annotations

import dataclasses
import json
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qsmnode import __version__
from qsmnode.node.config import HTTPConfig, ListenerConfig, Settings
from qsmnode.node.http import HttpServer, short_uid, start_http
from qsmnode.node.jobs import PROGRESS_FILENAME, attempt_dir
from qsmnode.node.metrics import MIB, free_disk_bytes
from qsmnode.node.store import (
    MIGRATIONS,
    STORE_FILENAME,
    InstanceRecord,
    NewAcquisition,
    NewProblem,
    OutboxRecord,
    SendOutcome,
    Store,
    StudyInfo,
)

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY = "1.2.826.0.1.3680043.10.999.1.20240101.777001"
OTHER_STUDY = "1.2.826.0.1.3680043.10.999.1.20240101.888002"
SCRIPT_REASON = "<script>alert('x')</script> phase series missing & no echoes"
T0 = 1_700_000_000.0


def settings(min_free_disk_mb: int = 0, port: int = 8080) -> Settings:
    return dataclasses.replace(
        Settings(), listener=ListenerConfig(min_free_disk_mb=min_free_disk_mb),
        http=HTTPConfig(port=port))


def add(store: Store, study: str, series: str, sop: str, at: float, number: int = 1) -> None:
    assert store.add_instance(InstanceRecord(
        sop_instance_uid=sop, sop_class_uid=MR, study_uid=study, series_uid=series,
        transfer_syntax_uid=EXPLICIT_LE, path=f"spool/{study}/{series}/{sop}.dcm", size=1000,
        calling_ae="SCANNER7T", peer_address="127.0.0.1", received_at=at, series_number=number,
        instance_number=1, modality="MR"))


def populate(store: Store) -> None:
    """Study STUDY: four complete series of one instance, one acquisition (and job) each, plus
    a problem. Jobs: one done (42 s, its 2 instances sent to "pacs", 1 failed to "archive"),
    one failed, one running, one queued. OTHER_STUDY: one open series of 2 instances."""
    series = [f"{STUDY}.{n}" for n in range(1, 5)]
    for n, uid in enumerate(series, start=1):
        add(store, STUDY, uid, f"{uid}.1", T0 + n, number=n)
        assert store.mark_series_complete(uid, T0 + 10)
    add(store, OTHER_STUDY, f"{OTHER_STUDY}.1", f"{OTHER_STUDY}.1.1", T0 + 20)
    add(store, OTHER_STUDY, f"{OTHER_STUDY}.1", f"{OTHER_STUDY}.1.2", T0 + 21)
    outcome = store.record_grouping(
        STUDY, 4,
        [NewAcquisition(STUDY, (uid,), {"series_numbers": [n], "n_echoes": 4})
         for n, uid in enumerate(series, start=1)],
        [NewProblem(STUDY, (series[0],), SCRIPT_REASON)], T0 + 30)
    assert outcome is not None and len(outcome.jobs) == 4
    done = store.claim_job("me", 3600, T0 + 100)
    assert done is not None
    outbox = [OutboxRecord(f"2.25.{n}", MR, STUDY, "2.25.9", EXPLICIT_LE,
                           f"outbox/{STUDY}/2.25.9/2.25.{n}.dcm", 10, T0 + 142) for n in (1, 2)]
    assert store.finish_job(done.id, "me", {"ok": True}, T0 + 142, outbox=outbox,
                            destinations=["archive", "pacs"])
    store.record_send_outcomes([
        SendOutcome("2.25.1", "pacs", True, 0),
        SendOutcome("2.25.2", "pacs", True, 0),
        SendOutcome("2.25.1", "archive", False, None, "association rejected <by> peer & co",
                    give_up=True),
    ], T0 + 150)
    failed = store.claim_job("me", 3600, T0 + 200)
    assert failed is not None
    assert store.fail_job_attempt(failed.id, "me", "QSM failed: <b>mask empty</b>", 1, T0 + 210)
    assert store.claim_job("me", 3600, T0 + 300) is not None  # stays running


@pytest.fixture()
def state(tmp_path: Path) -> Iterator[Path]:
    """A state directory whose store is open (as beside a running node) and populated."""
    state_dir = tmp_path / "state"
    with Store.in_state_dir(state_dir) as store:
        populate(store)
        yield state_dir


@pytest.fixture()
def server(state: Path) -> Iterator[HttpServer]:
    http = start_http(settings(), state, port=0)
    assert http is not None
    yield http
    http.stop()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read().decode()


def metrics(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> sorted labels -> value."""
    status, headers, text = fetch(url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = (
                sample.value)
    return samples


def state_values(samples: dict[str, dict[tuple[tuple[str, str], ...], float]],
                 name: str) -> dict[str, float]:
    return {dict(labels)["state"]: value for labels, value in samples[name].items()}


def test_health_reports_ok_with_its_fields(server: HttpServer, state: Path) -> None:
    assert server.host == "127.0.0.1" and server.port > 0
    status, headers, text = fetch(server.url + "/health")
    body = json.loads(text)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["status"] == "ok" and body["store"] == "ok" and body["reasons"] == []
    assert body["version"] == __version__ and body["schema_version"] == len(MIGRATIONS)
    assert isinstance(body["free_disk_mb"], int)
    assert abs(body["free_disk_mb"] - free_disk_bytes(state) // MIB) < 64


def test_health_is_503_below_the_disk_floor(state: Path) -> None:
    floor_mb = free_disk_bytes(state) // MIB + 1024 * 1024  # a TiB more than is free
    with start_http(settings(min_free_disk_mb=floor_mb), state, port=0) as http:
        status, _, text = fetch(http.url + "/health")
        samples = metrics(http.url)
    body = json.loads(text)
    assert status == 503 and body["status"] == "error" and body["store"] == "ok"
    assert body["min_free_disk_mb"] == floor_mb and "below the floor" in body["reasons"][0]
    assert samples["qsmnode_min_free_disk_bytes"][()] == floor_mb * MIB


def test_without_a_readable_store_health_is_503_and_metrics_say_down(tmp_path: Path) -> None:
    with start_http(settings(), tmp_path, port=0) as http:
        status, _, text = fetch(http.url + "/health")
        samples = metrics(http.url)
        page_status, _, page = fetch(http.url + "/")
    body = json.loads(text)
    assert status == 503 and body["store"] == "error" and "no store" in body["reasons"][0]
    assert samples["qsmnode_up"][()] == 0 and "qsmnode_instances_received_total" not in samples
    assert samples["qsmnode_free_disk_bytes"][()] > 0
    assert page_status == 503 and "cannot be read" in page


def test_metrics_report_the_store(server: HttpServer, state: Path) -> None:
    samples = metrics(server.url)
    assert samples["qsmnode_up"][()] == 1
    assert samples["qsmnode_build_info"][(("version", __version__),)] == 1
    assert samples["qsmnode_instances_received_total"][()] == 6
    assert samples["qsmnode_last_instance_received_timestamp_seconds"][()] == T0 + 21
    assert state_values(samples, "qsmnode_series") == {"open": 1, "complete": 4}
    assert samples["qsmnode_series_completed_total"][()] == 4
    assert state_values(samples, "qsmnode_acquisitions") == {"accepted": 4, "ignored": 0}
    assert samples["qsmnode_problems_open"][()] == 1
    assert state_values(samples, "qsmnode_jobs") == {
        "queued": 1, "running": 1, "done": 1, "failed": 1}
    assert samples["qsmnode_job_processing_seconds_count"][()] == 1
    assert samples["qsmnode_job_processing_seconds_sum"][()] == pytest.approx(42.0)
    buckets = {dict(k)["le"]: v for k, v in samples["qsmnode_job_processing_seconds_bucket"]
               .items()}
    assert buckets["30.0"] == 0 and buckets["60.0"] == 1 and buckets["+Inf"] == 1
    assert samples["qsmnode_job_last_processing_seconds"][()] == pytest.approx(42.0)
    assert samples["qsmnode_sends"] == {
        (("destination", "archive"), ("state", "failed")): 1,
        (("destination", "archive"), ("state", "pending")): 1,
        (("destination", "archive"), ("state", "sent")): 0,
        (("destination", "pacs"), ("state", "failed")): 0,
        (("destination", "pacs"), ("state", "pending")): 0,
        (("destination", "pacs"), ("state", "sent")): 2,
    }
    assert samples["qsmnode_free_disk_bytes"][()] > 0
    assert samples["qsmnode_store_schema_version"][()] == len(MIGRATIONS)


def test_metrics_are_read_at_scrape_time(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with Store.in_state_dir(state_dir) as store, \
            start_http(settings(), state_dir, port=0) as http:
        for n in range(3):
            add(store, STUDY, f"{STUDY}.1", f"{STUDY}.1.{n}", T0 + n)
        assert metrics(http.url)["qsmnode_instances_received_total"][()] == 3
        add(store, STUDY, f"{STUDY}.1", f"{STUDY}.1.9", T0 + 9)
        samples = metrics(http.url)
        assert samples["qsmnode_instances_received_total"][()] == 4
        assert state_values(samples, "qsmnode_jobs") == dict.fromkeys(
            ("queued", "running", "done", "failed"), 0)
        assert samples["qsmnode_job_processing_seconds_count"][()] == 0
        assert "qsmnode_job_last_processing_seconds" not in samples
        assert samples.get("qsmnode_sends", {}) == {}  # the family, with no sends yet


def test_an_older_store_without_sends_is_reported_without_them(tmp_path: Path) -> None:
    """A version 2 store (no outbox, no sends): the rest is reported, deliveries are not."""
    db = sqlite3.connect(tmp_path / STORE_FILENAME)
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO series (series_uid, study_uid, sop_class_uid, received_count, "
               "first_received_at, last_received_at) VALUES ('1.9.1', '1.9', ?, 1, ?, ?)",
               (MR, T0, T0))
    db.execute("INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, "
               "transfer_syntax_uid, path, size, calling_ae, peer_address, received_at) "
               "VALUES ('1.9.1.1', ?, '1.9', '1.9.1', ?, 'spool/a.dcm', 1, 'S', 'h', ?)",
               (MR, EXPLICIT_LE, T0))
    db.commit()
    db.close()
    with start_http(settings(), tmp_path, port=0) as http:
        samples = metrics(http.url)
        text = fetch(http.url + "/metrics")[2]
        status, _, page = fetch(http.url + "/")
        health = json.loads(fetch(http.url + "/health")[2])
    assert samples["qsmnode_instances_received_total"][()] == 1
    assert samples["qsmnode_store_schema_version"][()] == 2
    assert state_values(samples, "qsmnode_jobs")["queued"] == 0
    assert "qsmnode_sends" not in text and "qsmnode_up 1.0" in text
    assert status == 200 and "Not available (older store)" in page
    assert health["status"] == "ok" and health["schema_version"] == 2


def test_status_page_lists_studies_jobs_problems_and_deliveries(server: HttpServer) -> None:
    status, headers, page = fetch(server.url + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "<script" not in page.lower()  # no JavaScript, and the reason is escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; phase series missing &amp; " \
           "no echoes" in page
    assert "QSM failed: &lt;b&gt;mask empty&lt;/b&gt;" in page
    assert "association rejected &lt;by&gt; peer &amp; co" in page
    # studies: shortened UIDs, image and series counts
    assert short_uid(STUDY) in page and short_uid(OTHER_STUDY) in page
    assert short_uid(STUDY) != STUDY and f">{STUDY}<" not in page
    for state in ("queued", "running", "done", "failed"):
        assert f'<span class="state {state}">{state}</span>' in page
    assert "42 s" in page  # the done job's run time
    assert "<td>pacs</td><td>0</td><td>2</td><td>0</td>" in page
    assert "<td>archive</td><td>1</td><td>0</td><td>1</td>" in page


def test_status_page_shows_studies_as_a_radiographer_knows_them_and_series_passed_over(
    tmp_path: Path,
) -> None:
    """Studies by accession number, study date and time, descriptions and sending AE (the
    UID only in a tooltip and the last column); series passed over listed with why, apart from
    the problems; no patient data anywhere."""
    state_dir = tmp_path / "state"
    with Store.in_state_dir(state_dir) as store:
        for n, description in ((1, "gre_me_qsm"), (2, "DWI_dir80_PA")):
            uid = f"{STUDY}.{n}"
            assert store.add_instance(InstanceRecord(
                sop_instance_uid=f"{uid}.1", sop_class_uid=MR, study_uid=STUDY,
                series_uid=uid, transfer_syntax_uid=EXPLICIT_LE,
                path=f"spool/{STUDY}/{uid}/1.dcm", size=1000, calling_ae="SCANNER7T",
                peer_address="127.0.0.1", received_at=T0 + n, series_number=n,
                series_description=description, modality="MR"))
            assert store.mark_series_complete(uid, T0 + 10)
        why = "diffusion-weighted (ImageType ORIGINAL\\PRIMARY\\DIFFUSION\\NONE)"
        assert store.record_grouping(
            STUDY, 2, [], [], T0 + 20, {f"{STUDY}.2": why},
            StudyInfo(STUDY, "ACC-4711", "20240105", "143012.5", "Brain 7T M1")) is not None
        with start_http(settings(), state_dir, port=0) as http:
            page = fetch(http.url + "/")[1:][1]
    assert "<td>ACC-4711</td><td>2024-01-05 14:30</td><td class=\"text\">Brain 7T M1</td>" in page
    assert "gre_me_qsm, DWI_dir80_PA" in page and "<td>SCANNER7T</td>" in page
    assert "accession ACC-4711 · 2024-01-05 14:30 · Brain 7T M1" in page  # passed-over rows
    assert "<h2>Passed over</h2>" in page and "diffusion-weighted" in page
    assert "No open problems." in page


def test_unknown_paths_are_404_and_other_methods_405(server: HttpServer) -> None:
    assert fetch(server.url + "/nope")[0] == 404
    assert fetch(server.url + "/health/")[0] == 404
    assert fetch(server.url + "/nope", method="POST")[0] == 404
    for path in ("/", "/health", "/metrics"):
        status, headers, _ = fetch(server.url + path, method="POST")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert fetch(server.url + "/metrics", method="DELETE")[0] == 405


def test_stop_frees_the_port(state: Path) -> None:
    http = start_http(settings(), state, port=0)
    assert http is not None
    port = http.port
    assert fetch(http.url + "/health")[0] == 200
    started = time.monotonic()
    http.stop()
    http.stop()  # idempotent
    assert time.monotonic() - started < 3
    with pytest.raises(ConnectionRefusedError), \
            socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    with start_http(settings(), state, port=port) as again:  # the port can be bound again
        assert again.port == port and fetch(again.url + "/health")[0] == 200


def test_port_zero_in_the_settings_disables_it(state: Path) -> None:
    assert start_http(settings(port=0), state) is None


def test_a_busy_port_is_reported(state: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"HTTP endpoint 127.0.0.1:{port}"):
            start_http(settings(), state, port=port)


def test_the_running_node_serves_health_and_metrics(tmp_path: Path) -> None:
    from tests.nodeutil import Node, free_port

    http_port = free_port()
    node = Node(tmp_path / "node", sections={"http": {"host": "127.0.0.1", "port": http_port}})
    node.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["store"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            assert b"qsmnode_instances_received_total 0.0" in r.read()
    finally:
        node.stop()


def test_status_page_shows_the_stage_a_running_job_is_in(server: HttpServer, state: Path
                                                         ) -> None:
    with Store.in_state_dir(state, readonly=True) as store:
        (running,) = store.jobs("running")
    progress = attempt_dir(state, running.id, running.attempts) / PROGRESS_FILENAME
    _, _, page = fetch(server.url + "/")
    assert "now: " not in page  # no progress file yet: nothing is claimed
    progress.parent.mkdir(parents=True)
    progress.write_text(json.dumps({"stage": "qsm", "since": T0, "started": T0, "done": {}}))
    _, _, page = fetch(server.url + "/")
    assert page.count("now: QSM") == 1
