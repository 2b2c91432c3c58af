"""Review of the HTTP endpoint, the metrics and the audit log: odd requests, hostile strings
from peers and DICOM headers, a busy store, and whole audit lines on a full disk."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qsmnode.node import audit as audit_module
from qsmnode.node import metrics as metrics_module
from qsmnode.node.audit import AuditLog
from qsmnode.node.http import HttpServer, start_http
from qsmnode.node.jobs import PROGRESS_FILENAME, attempt_dir
from qsmnode.node.store import (
    STORE_FILENAME,
    NewAcquisition,
    NewProblem,
    OutboxRecord,
    SendOutcome,
    Store,
)
from tests.test_http import EXPLICIT_LE, MR, STUDY, T0, add, fetch, populate, settings

EVIL = "<script>alert(1)</script>\"'&"


@pytest.fixture()
def state(tmp_path: Path) -> Iterator[Path]:
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
    monkeypatch.setattr(metrics_module, "READ_TIMEOUT_S", 0.1)
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
