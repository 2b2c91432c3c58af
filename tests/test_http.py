"""The HTTP endpoint: health, Prometheus metrics and the status page, served by waitress over a
real store (written through the Store API), fetched with urllib; then odd requests, hostile
strings from peers and DICOM headers, a busy store, and whole audit lines on a full disk."""

from __future__ import annotations

import dataclasses
import json
import os
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
from qsmnode.node import audit as audit_module
from qsmnode.node.audit import AuditLog
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
from qsmnode.node.store import queries as queries_module

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY = "1.2.826.0.1.3680043.10.999.1.20240101.777001"
OTHER_STUDY = "1.2.826.0.1.3680043.10.999.1.20240101.888002"
SCRIPT_REASON = "<script>alert('x')</script> phase series missing & no echoes"
T0 = 1_700_000_000.0
EVIL = "<script>alert(1)</script>\"'&"


FOLLOW_UP = ("compared with the result of 2025-06-01 (1.00 years earlier): 1 of 3 changes "
             "beyond the test–retest limit")


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
    assert store.finish_job(done.id, "me", {"ok": True, "m1": {"follow_up": {"note": FOLLOW_UP}}},
                            T0 + 142, outbox=outbox,
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
    assert f"follow-up: {FOLLOW_UP}" in page  # the done job's comparison with earlier results
    assert "<td>pacs</td><td>0</td><td>2</td><td>0</td>" in page
    assert "<td>archive</td><td>1</td><td>0</td><td>1</td>" in page


def test_failed_jobs_come_first_with_their_reason_and_the_command_to_run_them_again(
    tmp_path: Path,
) -> None:
    """Failed jobs head the page (before the studies), each with its whole reason, escaped,
    even one longer than the jobs table shows, and ``qsmnode retry --job N``; they are listed
    however old their acquisition is. Without a failed job there is no such section."""
    reason = "series 5, 6: implausibly flat result: <χ> " + "spans 0 ppm; " * 40 + "END"
    quiet = tmp_path / "quiet"
    with Store.in_state_dir(quiet) as store:
        add(store, STUDY, f"{STUDY}.1", f"{STUDY}.1.1", T0)
        with start_http(settings(), quiet, port=0) as http:
            page = fetch(http.url + "/")[2]
        assert '<div class="failed-jobs">' not in page and "Failed jobs" not in page
    state_dir = tmp_path / "state"
    with Store.in_state_dir(state_dir) as store:
        populate(store)  # job 2 failed; job 4 queued
        third = f"{STUDY}9"
        series = [f"{third}.{n}" for n in (7, 8)]
        for n, uid in enumerate(series, start=7):
            add(store, third, uid, f"{uid}.1", T0 + 400 + n, number=n)
            assert store.mark_series_complete(uid, T0 + 410)
        outcome = store.record_grouping(
            third, 2, [NewAcquisition(third, (uid,), {"series_numbers": [n]})
                       for n, uid in enumerate(series, start=7)], [], T0 + 420)
        assert outcome is not None and len(outcome.jobs) == 2
        long_job = store.claim_job("me", 3600, T0 + 500)  # job 4: a long reason
        assert long_job is not None
        assert store.fail_job_attempt(long_job.id, "me", reason, 1, T0 + 510)
        for attempt in (1, 2, 3):  # job 5: failed on its last of 3 attempts
            retried_job = store.claim_job("me", 3600, T0 + 600 + attempt)
            assert retried_job is not None
            assert store.fail_job_attempt(retried_job.id, "me", f"try {attempt} failed", 3,
                                          T0 + 610 + attempt)
        failed_ids = [j.id for j in store.jobs("failed")]
        with start_http(settings(), state_dir, port=0) as http:
            page = fetch(http.url + "/")[2]
        with queries_module.read_store(state_dir) as db:
            status = queries_module.read_status(db, limit=1)
    assert len(failed_ids) == 3
    # the oldest failed job's acquisition is not among the 1 most recent, but it is listed
    assert [j.job_id for j in status.failed_jobs or ()] == [retried_job.id, long_job.id,
                                                            failed_ids[0]]
    top, rest = page.split("<h2>Recent studies</h2>")
    assert '<div class="failed-jobs">' in top and "<h2>Failed jobs: 3</h2>" in top
    for job_id in failed_ids:
        assert f"<code>qsmnode retry --job {job_id}</code>" in top
        assert "qsmnode retry" not in rest
    assert "<code>qsmnode retry --all-failed</code>" in top
    assert top.index(f"--job {retried_job.id}<") < top.index(f"--job {long_job.id}<")
    assert "&lt;χ&gt; spans 0 ppm;" in top and "spans 0 ppm; END" in top  # whole, escaped
    assert "spans 0 ppm; END" not in rest  # the jobs table cuts it
    assert "try 3 failed" in top and "QSM failed: &lt;b&gt;mask empty&lt;/b&gt;" in top
    assert "<script" not in page.lower()


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


def test_a_2d_acquisition_without_qsm_says_so_on_the_page_and_in_qsmnode_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 13 item 4: a 2-D protocol with slice gaps gets no QSM. The job is done (R2* and
    the rest were delivered), and the status page and ``qsmnode status`` say beside "done"
    that QSM was not computed and why, not only quality.json and the SR. The job's result is
    the pipeline's own record of a simulated 2-D slab (2 slices, 4 mm thick, 6 mm apart: too
    few for the M1 analysis too, which says so as well)."""
    from qsmnode.cli import main
    from qsmnode.dicom.load import LoadedAcquisition, load_folder
    from qsmnode.dicom.reference_data import load_m1_atlas
    from qsmnode.pipeline import PipelineParams, run_pipeline
    from qsmnode.sim.scanner import preset, simulate
    from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom

    scan = preset("tiny", shape=(56, 68, 2), voxel_size_mm=(3.0, 3.0, 6.0),
                  centre_mm=(0.0, -18.0, 55.0))
    write_dicom(simulate(scan).gre, tmp_path / "in", "siemens",
                SimStudyInfo(seed=3, slice_thickness_mm=4.0, acquisition_type="2D"))
    (loaded,) = load_folder(tmp_path / "in")
    assert isinstance(loaded, LoadedAcquisition)
    record = run_pipeline(loaded, PipelineParams(m1_atlas=load_m1_atlas())).to_json()
    why = record["qsm_not_computed"]
    assert why.startswith("QSM was not computed: the slices have gaps (6 mm apart but 4 mm "
                          "thick, a gap of 2 mm")
    m1_error = record["m1"]["error"]
    assert m1_error.startswith("the M1 analysis could not run")

    state_dir = tmp_path / "state"
    config = tmp_path / "qsmnode.toml"
    config.write_text(f'[paths]\nstate_dir = "{state_dir}"\n')
    with Store.in_state_dir(state_dir) as store:
        uid = f"{STUDY}.5"
        add(store, STUDY, uid, f"{uid}.1", T0, number=5)
        assert store.mark_series_complete(uid, T0 + 10)
        assert store.record_grouping(STUDY, 1, [NewAcquisition(
            STUDY, (uid,), {"series_numbers": [5], "n_echoes": 4})], [], T0 + 20) is not None
        job = store.claim_job("me", 3600, T0 + 30)
        assert job is not None and store.finish_job(job.id, "me", record, T0 + 60)
        with start_http(settings(), state_dir, port=0) as http:
            page = fetch(http.url + "/")[2]
    [row] = [line for line in page.splitlines() if '<span class="state done">' in line]
    assert f"{why}; R2*, T2* signal ratio and thickness computed instead; {m1_error}" in row

    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.split()[:3] == [str(job.id), "1", "done"]]
    assert f"{why}; R2*, T2* signal ratio and thickness computed instead; {m1_error}" in line
    assert main(["status", "--config", str(config), "--json"]) == 0
    [job_json] = json.loads(capsys.readouterr().out)["jobs"]
    assert job_json["notes"][0].startswith(why)


def test_result_notes_name_an_unreliable_m1_and_the_follow_up() -> None:
    """A done job's notes: the failed reliability flag's text (naming the failed checks) and
    the follow-up; an odd or older record gives what it holds, never an error."""
    from qsmnode.m1.result import RELIABILITY_FLAG
    from qsmnode.node.store.records import result_notes

    text = "the M1 measures are not reliable (registration_mask failed); no z-score is reported"
    record = {"qsm_not_computed": "", "m1": {
        "flags": [{"name": "registration_mask", "passed": False, "value": 0.5, "text": "x"},
                  {"name": RELIABILITY_FLAG, "passed": False, "value": None, "text": text}],
        "follow_up": {"note": FOLLOW_UP}}}
    assert result_notes(record) == (text, f"follow-up: {FOLLOW_UP}")
    assert result_notes({"m1": {"flags": [{"name": RELIABILITY_FLAG, "passed": True}]}}) == ()
    for odd in (None, {}, {"m1": None}, {"m1": {"flags": "?", "follow_up": 3}}, []):
        assert result_notes(odd) == ()  # type: ignore[arg-type]


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


# ================================================================================================
# odd requests, hostile strings from peers and DICOM headers, a busy store, and whole audit
# lines on a full disk


def raw_request(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` as it is and read what comes back until the server closes (or the
    timeout)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
    return out


# ------------------------------------------------------------------------------------ methods


def test_head_is_answered_like_get_without_a_body(server: HttpServer) -> None:
    for path in ("/", "/health", "/metrics"):
        reply = raw_request(server.port, f"HEAD {path} HTTP/1.0\r\n\r\n".encode())
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 "), (path, head)
        assert body == b"", path
    get_status, get_headers, page = fetch(server.url + "/")
    status, headers, body = fetch(server.url + "/", method="HEAD")
    assert status == get_status == 200 and body == ""
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert abs(int(headers["Content-Length"]) - len(page.encode())) < 64  # the clock may tick
    assert "Content-Security-Policy" in headers


def test_other_methods_are_still_405(server: HttpServer) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"):
        for path in ("/", "/health", "/metrics"):
            status, headers, _ = fetch(server.url + path, method=method)
            assert status == 405 and "GET" in headers["Allow"], (method, path)


def test_a_request_body_is_refused_before_it_is_buffered(server: HttpServer) -> None:
    """A web page can make the radiographer's browser POST to 127.0.0.1: the endpoint takes no
    body, so a large one must be refused at once, not spooled to a temporary file first."""
    reply = raw_request(server.port, b"POST / HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Type: text/plain\r\nContent-Length: 2000000000\r\n\r\n"
                        + b"x" * 65536)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    chunked = raw_request(server.port, b"POST / HTTP/1.1\r\nHost: localhost\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n"
                          + b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
    assert chunked.startswith(b"HTTP/1.1 413 "), chunked[:200]
    assert fetch(server.url + "/health")[0] == 200


# ------------------------------------------------------------------------------- odd requests


def test_query_strings_are_ignored(server: HttpServer) -> None:
    status, _, page = fetch(server.url + "/?x=%3Cscript%3Ealert(1)%3C/script%3E")
    assert status == 200 and "<script" not in page.lower() and "alert(1)" not in page
    assert fetch(server.url + "/health?verbose=1")[0] == 200


def test_a_metrics_name_filter_does_not_empty_the_scrape(server: HttpServer) -> None:
    """``/metrics?name[]=...`` (prometheus_client's filter) found nothing in the private
    registry and answered 200 with an empty body: a scraper configured with it lost every
    metric, ``qsmnode_up`` included."""
    status, _, text = fetch(server.url + "/metrics?name[]=qsmnode_up")
    assert status == 200
    names = {sample.name for family in text_string_to_metric_families(text)
             for sample in family.samples}
    assert "qsmnode_up" in names


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../health/", "/metrics/x",
    "/%00", "/%C3%A9", "/health;x", "/" + "a" * 20000,
])
def test_other_paths_are_404(server: HttpServer, path: str) -> None:
    reply = raw_request(server.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.0 404 "), (path, reply[:100])
    assert reply.endswith(b"not found\n")


def test_odd_requests_do_not_break_the_server(server: HttpServer) -> None:
    huge = raw_request(server.port, b"GET /health HTTP/1.0\r\nX-A: " + b"a" * 300_000
                       + b"\r\n\r\n")
    assert not huge.startswith(b"HTTP/1.0 200")
    garbage = raw_request(server.port, b"\x00\x01\x02 / HTTP/1.0\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.0 400 ") and b"Traceback" not in garbage
    assert fetch(server.url + "/health")[0] == 200


# ------------------------------------------------------------------------------ a busy store


def test_a_locked_store_gives_503_with_a_plain_message(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries_module, "READ_TIMEOUT_S", 0.1)
    state = tmp_path / "state"
    with Store.in_state_dir(state) as store:
        populate(store)
    lock = sqlite3.connect(state / STORE_FILENAME, isolation_level=None)
    try:
        lock.execute("PRAGMA journal_mode = DELETE")  # a writer then locks out readers
        lock.execute("BEGIN EXCLUSIVE")
        lock.execute("UPDATE series SET state = state")
        with start_http(settings(), state, port=0) as http:
            status, _, page = fetch(http.url + "/")
            health_status, _, health = fetch(http.url + "/health")
            metrics_status, _, text = fetch(http.url + "/metrics")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert status == 503 and "cannot be read" in page and "locked" in page
    assert "Traceback" not in page
    assert health_status == 503 and json.loads(health)["store"] == "error"
    assert metrics_status == 200 and "qsmnode_up 0.0" in text


# -------------------------------------------------------------------- hostile strings in HTML


def hostile_store(state_dir: Path) -> None:
    """Every free text the page shows, with markup in it: an ignored acquisition's reason, a
    job error, a problem reason, a destination name and its last error, a progress stage."""
    study = "1.2.3.4.5"
    with Store.in_state_dir(state_dir) as store:
        for n in (1, 2, 3):
            add(store, study, f"{study}.{n}", f"{study}.{n}.1", T0 + n, number=n)
            assert store.mark_series_complete(f"{study}.{n}", T0 + 10)
        outcome = store.record_grouping(
            study, 3,
            [NewAcquisition(study, (f"{study}.1",), {"series_numbers": [1], "n_echoes": 4}),
             NewAcquisition(study, (f"{study}.2",), {"series_numbers": [2], "n_echoes": 4}),
             NewAcquisition(study, (f"{study}.3",),
                            {"series_numbers": ["<b>"], "n_echoes": "<i>"},
                            f"ignored {EVIL}")],
            [NewProblem(study, (f"{study}.1",), f"series 1 '{EVIL}': no phase")], T0 + 30)
        assert outcome is not None
        job = store.claim_job("me", 3600, T0 + 100)
        assert job is not None
        outbox = [OutboxRecord("2.25.7", MR, study, "2.25.8", EXPLICIT_LE,
                               f"outbox/{study}/2.25.8/2.25.7.dcm", 10, T0 + 142)]
        assert store.finish_job(job.id, "me", {"ok": True}, T0 + 142, outbox=outbox,
                                destinations=[EVIL])
        store.record_send_outcomes([SendOutcome("2.25.7", EVIL, False, None,
                                                f"peer said {EVIL}")], T0 + 150)
        failed = store.claim_job("me", 3600, T0 + 200)
        assert failed is not None
        assert store.fail_job_attempt(failed.id, "me", f"QSM failed: {EVIL}", 5, T0 + 210)
        running = store.claim_job("me", 3600, T0 + 300)
        assert running is not None
    progress = attempt_dir(state_dir, running.id, running.attempts) / PROGRESS_FILENAME
    progress.parent.mkdir(parents=True)
    progress.write_text(json.dumps({"stage": EVIL, "since": T0, "started": T0, "done": {}}))


def test_every_free_text_on_the_page_is_escaped(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    hostile_store(state_dir)
    with start_http(settings(), state_dir, port=0) as http:
        status, headers, page = fetch(http.url + "/")
        text = fetch(http.url + "/metrics")[2]
    assert status == 200
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "<script" not in page.lower() and "<b>" not in page and "<i>" not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;"
    for shown in (f"ignored {escaped}", f"series 1 &#x27;{escaped}&#x27;: no phase",
                  f"<td>{escaped}</td>", f"peer said {escaped}", f"now: {escaped}"):
        assert shown in page, shown
    # the destination is a label value: escaped by the exposition, read back as it was
    sends = {tuple(sorted(s.labels.items())): s.value
             for family in text_string_to_metric_families(text) if family.name == "qsmnode_sends"
             for s in family.samples}
    assert sends[(("destination", EVIL), ("state", "pending"))] == 1


def test_a_long_problem_reason_is_cut_on_the_page(tmp_path: Path) -> None:
    """Problem reasons quote series descriptions, which a peer may make as long as it likes;
    the page shows 25 of them and must stay bounded, as the other free texts are."""
    state_dir = tmp_path / "state"
    with Store.in_state_dir(state_dir) as store:
        add(store, STUDY, f"{STUDY}.1", f"{STUDY}.1.1", T0)
        assert store.mark_series_complete(f"{STUDY}.1", T0 + 10)
        assert store.record_grouping(
            STUDY, 1, [], [NewProblem(STUDY, (f"{STUDY}.1",),
                                      "series 1 '" + "A" * 200_000 + "': no phase")],
            T0 + 30) is not None
    with start_http(settings(), state_dir, port=0) as http:
        status, _, page = fetch(http.url + "/")
    assert status == 200 and "series 1 &#x27;AAAA" in page
    assert len(page) < 20_000


# ------------------------------------------------------------------------------ the audit log


def test_a_short_write_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """On a full disk ``write`` may store part of a line: the next event must not be glued to
    that fragment (the log promises whole JSON lines)."""
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    audit.record("first", n=1)
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        if fd == audit._fd:
            return real_write(fd, data[:7])
        return real_write(fd, data)

    monkeypatch.setattr(audit_module.os, "write", short_write)
    audit.record("lost", n=2)
    monkeypatch.setattr(audit_module.os, "write", real_write)
    audit.record("third", n=3)
    audit.close()
    lines = path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["first", "third"]
    assert caplog.text.count("cannot write") == 1


def test_peer_supplied_ae_titles_stay_one_line(tmp_path: Path) -> None:
    """An AE title with a line break or a quote cannot forge a second audit line."""

    class Primitive:
        calling_ae_title = 'EVIL\n{"event":"forged"}'
        called_ae_title = b"QSMNODE  "

    class Requestor:
        primitive = Primitive()
        address = "127.0.0.1"
        port = 104

    class Assoc:
        requestor = Requestor()

    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    audit.association(Assoc(), "rejected", "calling AE title not allowed")
    audit.close()
    (line,) = path.read_text().splitlines()
    event = json.loads(line)
    assert event["calling_ae"] == 'EVIL\n{"event":"forged"}' and event["called_ae"] == "QSMNODE"
    assert event["address"] == "127.0.0.1:104" and event["event"] == "association_rejected"


def test_urllib_head_on_health(server: HttpServer) -> None:
    request = urllib.request.Request(server.url + "/health", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and response.read() == b""
        assert int(response.headers["Content-Length"]) > 0
