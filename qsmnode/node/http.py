"""The node's HTTP endpoint: health, Prometheus metrics and a status page for radiographers.

Served by ``waitress`` in a daemon thread, on ``[http] host``/``port`` (loopback port 8080 by
default; port 0 disables it). Three routes, all ``GET`` or ``HEAD`` (another method gets 405,
another path 404; a query string is ignored, a request body of 1 KiB or more gets 413):

- ``/health``: JSON ``{"status", "store", "free_disk_mb", "min_free_disk_mb", "version",
  "schema_version", "reasons"}``. 200 when the store can be read and free disk is at or above
  ``listener.min_free_disk_mb``; 503 otherwise, ``reasons`` saying why.
- ``/metrics``: the Prometheus text format (OpenMetrics when the scraper asks for it), from a
  private registry whose collector reads the store at scrape time
  (:mod:`qsmnode.node.metrics` lists the metrics).
- ``/``: a read-only HTML page (no JavaScript, refreshed every 10 s): failed jobs first (each
  with its reason and the command that runs it again, ``qsmnode retry --job N``), then recent
  studies (by
  accession number, study date and time, study and series descriptions and the sending AE),
  acquisitions and jobs, open problems, series passed over (with why), deliveries and the
  HL7 results to the RIS (acknowledged, pending, failed, the last error). The
  store holds no patient names, IDs or birth dates; study UIDs are shortened; everything shown
  is HTML-escaped.

Every request reads the store through its own read-only SQLite connection
(:func:`qsmnode.node.store.queries.read_store`, where all the SQL it runs is): the endpoint never
writes, and a slow page never holds up the node.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

from prometheus_client import make_wsgi_app
from waitress.server import BaseWSGIServer, create_server

from qsmnode import __version__
from qsmnode.node.config import Settings
from qsmnode.node.jobs import STAGE_NAMES, read_progress
from qsmnode.node.metrics import MIB, free_disk_bytes, make_registry
from qsmnode.node.store import study_when
from qsmnode.node.store.queries import (
    JobRow,
    Status,
    StoreUnavailable,
    StudyRow,
    read_status,
    read_store,
    readable_version,
)

log = logging.getLogger(__name__)

REFRESH_S = 10
"""The status page reloads itself this often (meta refresh)."""
RECENT_ROWS = 25
"""Rows per table on the status page."""
ERROR_CHARS = 300
"""Longest error text shown on the status page (the rest is cut)."""
PROBLEM_CHARS = 2000
"""Longest problem reason shown on the status page (they quote series descriptions)."""
MAX_BODY_BYTES = 1024
"""Request bodies this large or larger get 413 from waitress at once. No route reads one;
waitress's default (1 GiB, spooled to a temporary file before the application answers) would
let any web page the radiographer opens fill the disk through the browser."""
THREADS = 2
"""waitress worker threads: a scraper and a browser or two."""

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

_SECURITY_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
]
_PAGE_HEADERS = [
    *_SECURITY_HEADERS,
    ("Content-Security-Policy",
     "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
]


# --------------------------------------------------------------------------------------------
# The WSGI application


class StatusApp:
    """The WSGI application: a three-route router over the store of ``state_dir``."""

    def __init__(self, state_dir: Path | str, min_free_disk_mb: int = 0) -> None:
        self.state_dir = Path(state_dir)
        self.min_free_disk_mb = int(min_free_disk_mb)
        self.registry = make_registry(self.state_dir, self.min_free_disk_mb * MIB)
        self._metrics_app = make_wsgi_app(self.registry)
        self._routes: dict[str, Callable[[Environ, StartResponse], Iterable[bytes]]] = {
            "/": self._page,
            "/health": self._health,
            "/metrics": self._metrics_app,
        }

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        handler = self._routes.get(environ.get("PATH_INFO") or "/")
        if handler is None:
            return _plain(start_response, HTTPStatus.NOT_FOUND, "not found\n")
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, HTTPStatus.METHOD_NOT_ALLOWED,
                          "method not allowed: use GET or HEAD\n",
                          [("Allow", "GET, HEAD")])
        # HEAD: the GET answer without its body (waitress sends what it is given). The query
        # string is ignored: prometheus_client's name[] filter finds nothing in the private
        # registry (its collector is not described) and would answer an empty 200.
        environ = {**environ, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
        try:
            body = handler(environ, start_response)
        except Exception:
            log.exception("HTTP %s failed", environ.get("PATH_INFO"))
            return _plain(start_response, HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
        if method == "HEAD":
            return []
        return body

    # ---------------------------------------------------------------------------------- health

    def health(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """The health check's status and body."""
        reasons: list[str] = []
        try:
            free: int | None = free_disk_bytes(self.state_dir)
        except OSError as exc:
            free = None
            reasons.append(f"free disk unknown: {exc}")
        version = None
        try:
            with read_store(self.state_dir) as db:
                version = readable_version(db)
            store = "ok"
        except StoreUnavailable as exc:
            store = "error"
            reasons.append(f"store cannot be read: {exc}")
        if free is not None and free < self.min_free_disk_mb * MIB:
            reasons.append(f"free disk {free // MIB} MiB is below the floor of "
                           f"{self.min_free_disk_mb} MiB (listener.min_free_disk_mb)")
        body = {
            "status": "error" if reasons else "ok",
            "store": store,
            "free_disk_mb": None if free is None else free // MIB,
            "min_free_disk_mb": self.min_free_disk_mb,
            "version": __version__,
            "schema_version": version,
            "reasons": reasons,
        }
        return (HTTPStatus.SERVICE_UNAVAILABLE if reasons else HTTPStatus.OK), body

    def _health(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        status, body = self.health()
        data = (json.dumps(body, indent=1) + "\n").encode()
        start_response(_status_line(status), [
            ("Content-Type", "application/json"), ("Content-Length", str(len(data))),
            *_SECURITY_HEADERS])
        return [data]

    # ------------------------------------------------------------------------------ status page

    def _page(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            free: int | None = free_disk_bytes(self.state_dir)
        except OSError:
            free = None
        try:
            with read_store(self.state_dir) as db:
                status: Status | None = read_status(db, RECENT_ROWS)
            error = None
        except StoreUnavailable as exc:
            status, error = None, str(exc)
        stages = {} if status is None else running_stages(self.state_dir, status.jobs)
        data = render_page(status, error, free, self.min_free_disk_mb, time.time(),
                           stages).encode()
        start_response(_status_line(HTTPStatus.OK if status else HTTPStatus.SERVICE_UNAVAILABLE),
                       [("Content-Type", "text/html; charset=utf-8"),
                        ("Content-Length", str(len(data))), *_PAGE_HEADERS])
        return [data]


def _status_line(status: HTTPStatus) -> str:
    return f"{status.value} {status.phrase}"


def _plain(start_response: StartResponse, status: HTTPStatus, text: str,
           headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = text.encode()
    start_response(_status_line(status), [
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data))),
        *_SECURITY_HEADERS, *(headers or [])])
    return [data]


# --------------------------------------------------------------------------------------------
# HTML


def _e(value: object) -> str:
    """HTML-escaped text of ``value`` (quotes too); empty for None."""
    return "" if value is None else html.escape(str(value), quote=True)


def _when(at: float | None) -> str:
    """Local time, as the scanner console shows it."""
    if at is None:
        return ""
    return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def short_uid(uid: str, keep: int = 12) -> str:
    """The end of a UID (the distinctive part: UIDs of one site share their root)."""
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def _uid_cell(uid: str) -> str:
    return f'<td class="uid" title="{_e(uid)}">{_e(short_uid(uid))}</td>'


def study_label(row: StudyRow) -> str:
    """What a radiographer recognises a study by: accession number, study date and time and
    description (no patient data); the end of its UID when the headers said nothing yet."""
    parts = [f"accession {row.accession_number}" if row.accession_number else "",
             study_when(row.study_date, row.study_time), row.study_description]
    return " · ".join(p for p in parts if p) or short_uid(row.study_uid)


def _study_cell(uid: str, labels: dict[str, str]) -> str:
    label = labels.get(uid)
    if label is None:
        return _uid_cell(uid)
    return f'<td class="text" title="{_e(uid)}">{_e(label)}</td>'


def _cut(text: str | None, limit: int = ERROR_CHARS) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + " …"


def _state(state: str | None) -> str:
    return f'<td><span class="state {_e(state)}">{_e(state)}</span></td>'


def _table(headers: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="none">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"


def running_stages(state_dir: Path, jobs: Iterable[JobRow]) -> dict[int, str]:
    """Job id → the stage a running job is in, from its attempt's progress file."""
    stages = {}
    for job in jobs:
        if job.job_id is None or job.job_state != "running" or not job.attempts:
            continue
        progress = read_progress(state_dir, job.job_id, job.attempts) or {}
        stage = progress.get("stage")
        if isinstance(stage, str):
            stages[job.job_id] = STAGE_NAMES.get(stage, stage)
    return stages


def _job_row(job: JobRow, now: float, stage: str | None = None,
             labels: dict[str, str] | None = None) -> str:
    series = ", ".join("?" if n is None else str(n) for n in job.series_numbers)
    run = None
    if job.started_at is not None and job.finished_at is not None:
        run = job.finished_at - job.started_at
    elif job.started_at is not None and job.job_state == "running":
        run = now - job.started_at  # so far
    state = job.job_state if job.job_id is not None else job.acquisition_state
    note = _cut(job.last_error if job.job_id is not None else job.reason)
    if job.job_state == "done" and (job.notes or job.follow_up):
        # what the result says beyond "done" (QSM not computed and why, M1 not reliable,
        # the follow-up), each note cut on its own so that a long one hides no other
        note = "; ".join(_cut(n) or "" for n in job.notes or (f"follow-up: {job.follow_up}",))
    if stage is not None:
        note = f"now: {stage}" + (f" (last error: {note})" if note else "")
    return (f"<tr><td>{job.acquisition_id}</td>{_study_cell(job.study_uid, labels or {})}"
            f"<td>{_e(series)}</td><td>{_e(job.echoes)}</td>{_state(state)}"
            f"<td>{_e(job.attempts)}</td><td>{_e(_when(job.started_at))}</td>"
            f"<td>{_e(_duration(run))}</td><td class=\"text\">{_e(note)}</td></tr>")


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.uid { font-family: monospace; }
td.text { max-width: 40em; }
.meta { color: #555; }
.none { color: #777; font-style: italic; }
.banner { background: #fdd; border: 1px solid #c00; padding: 0.5em; }
.failed-jobs { background: #fff4f4; border: 2px solid #c00; padding: 0 0.8em 0.8em; }
.failed-jobs h2 { color: #a00; margin-top: 0.6em; }
.state { padding: 0 0.4em; border-radius: 0.3em; }
.done, .sent, .complete, .accepted { background: #dfd; }
.running, .open, .pending { background: #ffd; }
.failed { background: #fdd; }
.ignored, .queued { background: #eee; }
"""


def render_page(status: Status | None, error: str | None, free: int | None,
                min_free_disk_mb: int, now: float, stages: dict[int, str] | None = None) -> str:
    """The status page. ``status`` None: the store could not be read (``error`` says why);
    ``stages``: job id → the stage a running job is in."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        "<title>qsmnode status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>qsmnode status</h1>",
        f'<p class="meta">qsmnode {_e(__version__)} · {_e(_when(now))} · '
        f"refreshes every {REFRESH_S} s</p>",
    ]
    disk = "unknown" if free is None else f"{free // MIB:,} MiB"
    low = free is not None and free < min_free_disk_mb * MIB
    if error is not None:
        parts.append(f'<p class="banner">The node\'s store cannot be read: {_e(error)}</p>')
    if low:
        parts.append(f'<p class="banner">Free disk is low: {_e(disk)}, below the floor of '
                     f"{min_free_disk_mb:,} MiB. New images are refused until space is freed.</p>")
    parts.append(f'<p class="meta">Free disk: {_e(disk)} (floor {min_free_disk_mb:,} MiB)</p>')
    if status is not None:
        parts.extend(_sections(status, now, stages or {}))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _failed_jobs(status: Status, labels: dict[str, str]) -> list[str]:
    """The failed jobs, at the top of the page: nothing was delivered for them. Each with its
    reason in full and the command that runs it again; nothing when none failed."""
    failed = [job for job in status.failed_jobs or () if job.job_id is not None]
    if not failed:
        return []
    total = max(status.counts.jobs.get("failed", 0), len(failed))
    shown = "" if total == len(failed) else f" (the {len(failed)} most recent shown)"
    rows = [
        f"<tr><td>{job.job_id}</td>{_study_cell(job.study_uid, labels)}"
        f"<td>{_e(', '.join('?' if n is None else str(n) for n in job.series_numbers))}</td>"
        f"<td>{_e(_when(job.finished_at))}</td><td>{_e(job.attempts)}</td>"
        f'<td class="text">{_e(_cut(job.last_error, PROBLEM_CHARS) or "-")}</td>'
        f"<td><code>qsmnode retry --job {job.job_id}</code></td></tr>"
        for job in failed]
    return [
        '<div class="failed-jobs">',
        f"<h2>Failed jobs: {total}{_e(shown)}</h2>",
        "<p>Nothing was computed or sent for these acquisitions. Once the reason is dealt "
        "with, run a job again on the node with the command shown (<code>qsmnode retry "
        "--all-failed</code> runs every failed job again).</p>",
        _table(("Job", "Study", "Series", "Failed", "Attempts", "Reason", "To run it again"),
               rows, ""),
        "</div>",
    ]


def _sections(status: Status, now: float, stages: dict[int, str]) -> list[str]:
    counts = status.counts
    summary = [
        f"{counts.instances:,} images received",
        f"series: {counts.series.get('open', 0)} open, {counts.series.get('complete', 0)} complete",
    ]
    if counts.jobs:
        summary.append("jobs: " + ", ".join(f"{n} {s}" for s, n in counts.jobs.items()))
    if counts.problems_open is not None:
        summary.append(f"open problems: {counts.problems_open}")
    if counts.last_received_at is not None:
        summary.append(f"last image {_when(counts.last_received_at)}")
    labels = {s.study_uid: study_label(s) for s in status.studies}
    out = _failed_jobs(status, labels)
    out += ["<p>" + _e(" · ".join(summary)) + "</p>", "<h2>Recent studies</h2>"]
    out.append(_table(
        ("Accession", "Study date", "Study description", "Series descriptions", "Sent by",
         "First image", "Last image", "Images", "Series", "Open series", "Study UID"),
        [f"<tr><td>{_e(s.accession_number or '-')}</td>"
         f"<td>{_e(study_when(s.study_date, s.study_time) or '-')}</td>"
         f'<td class="text">{_e(s.study_description or "-")}</td>'
         f'<td class="text">{_e(_cut(", ".join(s.series_descriptions) or "-"))}</td>'
         f"<td>{_e(', '.join(s.senders) or '-')}</td>"
         f"<td>{_e(_when(s.first_received_at))}</td>"
         f"<td>{_e(_when(s.last_received_at))}</td><td>{s.instances}</td>"
         f"<td>{s.series}</td><td>{s.series_open}</td>{_uid_cell(s.study_uid)}</tr>"
         for s in status.studies],
        "No studies received yet."))
    out.append("<h2>Acquisitions and jobs</h2>")
    if status.jobs is None:
        out.append('<p class="none">Not available (older store).</p>')
    else:
        out.append(_table(
            ("Acq.", "Study", "Series", "Echoes", "State", "Attempts", "Started", "Run time",
             "Last error / reason / result notes"),
            [_job_row(job, now, stages.get(job.job_id or 0), labels) for job in status.jobs],
            "No acquisitions yet."))
    out.append("<h2>Problems</h2>")
    if status.problems is None:
        out.append('<p class="none">Not available (older store).</p>')
    else:
        out.append(_table(
            ("Since", "Study", "Problem"),
            [f"<tr><td>{_e(_when(p.created_at))}</td>{_study_cell(p.study_uid, labels)}"
             f'<td class="text">{_e(_cut(p.reason, PROBLEM_CHARS))}</td></tr>'
             for p in status.problems],
            "No open problems."))
    if status.passed_over is not None:
        out.append("<h2>Passed over</h2>")
        out.append('<p class="meta">Series that are not QSM candidates: not processed, and '
                   "not problems.</p>")
        out.append(_table(
            ("Study", "Series", "Description", "Why"),
            [f"<tr>{_study_cell(r.study_uid, labels)}"
             f"<td>{_e('?' if r.series_number is None else r.series_number)}</td>"
             f'<td class="text">{_e(r.series_description or "-")}</td>'
             f'<td class="text">{_e(_cut(r.reason, PROBLEM_CHARS))}</td></tr>'
             for r in status.passed_over],
            "No series passed over."))
    out.append("<h2>Deliveries</h2>")
    if status.deliveries is None:
        out.append('<p class="none">Not available (older store).</p>')
    else:
        out.append(_table(
            ("Destination", "Pending", "Sent", "Failed", "Last sent", "Next try", "Last error"),
            [f"<tr><td>{_e(d.destination)}</td><td>{d.pending}</td><td>{d.sent}</td>"
             f"<td>{d.failed}</td><td>{_e(_when(d.last_sent_at))}</td>"
             f"<td>{_e(_when(d.next_try_at))}</td>"
             f'<td class="text">{_e(_cut(d.last_error))}</td></tr>' for d in status.deliveries],
            "Nothing to deliver yet."))
    if status.results is not None:
        out.append("<h2>Results to the RIS (HL7)</h2>")
        out.append(_table(
            ("RIS", "Pending", "Acknowledged", "Failed", "Last acknowledged", "Next try",
             "Last error"),
            [f"<tr><td>{_e(r.destination)}</td><td>{r.pending}</td><td>{r.sent}</td>"
             f"<td>{r.failed}</td><td>{_e(_when(r.last_sent_at))}</td>"
             f"<td>{_e(_when(r.next_try_at))}</td>"
             f'<td class="text">{_e(_cut(r.last_error))}</td></tr>' for r in status.results],
            "No HL7 results yet."))
    return out


# --------------------------------------------------------------------------------------------
# The server


class HttpServer:
    """A running endpoint: ``host`` and ``port`` (the bound port), ``url``, :meth:`stop`."""

    def __init__(self, app: StatusApp, host: str, port: int) -> None:
        self.app = app
        self._map: dict[int, Any] = {}
        try:
            self._server = create_server(
                app, map=self._map, host=host, port=port, threads=THREADS, ident="qsmnode",
                channel_timeout=30, connection_limit=32, max_request_body_size=MAX_BODY_BYTES)
        except OSError as exc:
            self._close_sockets()  # what waitress opened before the failure
            raise OSError(exc.errno, f"HTTP endpoint {host}:{port}: {exc.strerror or exc}"
                          ) from exc
        listening = getattr(self._server, "effective_listen", None) or [
            (self._server.effective_host, self._server.effective_port)]
        self.host = host
        self.port = int(listening[0][1])
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.run, name="qsmnode-http",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _close_sockets(self) -> None:
        """Close the listening sockets and connections; the serving loop ends when none is
        left. Runs in the loop's thread (through waitress's trigger)."""
        for dispatcher in list(self._map.values()):
            try:
                dispatcher.close()
            except OSError:
                pass
        self._map.clear()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and free the port (idempotent): the listening sockets and open
        connections are closed in the serving thread, then waitress's worker threads are given
        up to ``timeout_s`` to end."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        trigger = next((d.trigger for d in list(self._map.values())
                        if isinstance(d, BaseWSGIServer)), None)
        if self._thread.is_alive() and trigger is not None:
            try:
                trigger.pull_trigger(self._close_sockets)
            except OSError:
                pass
            self._thread.join(timeout_s)
        if self._thread.is_alive() or self._map:
            self._close_sockets()  # the loop did not run the thunk: close from here
            self._thread.join(timeout_s)
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout_s)
        log.info("HTTP endpoint on %s stopped", self.url)

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_http(settings: Settings, state_dir: Path | str, *, host: str | None = None,
               port: int | None = None) -> HttpServer | None:
    """Start the HTTP endpoint for the node whose state directory is ``state_dir``.

    ``host`` and ``port`` default to ``settings.http``; there ``port`` 0 means no endpoint,
    and None is returned. An explicit ``port`` overrides it, 0 then meaning any free port
    (tests); :attr:`HttpServer.port` is the port bound. Raises OSError when it cannot listen.
    """
    if port is None:
        port = settings.http.port
        if port == 0:
            log.info("HTTP endpoint disabled (http.port = 0)")
            return None
    host = settings.http.host if host is None else host
    app = StatusApp(state_dir, settings.listener.min_free_disk_mb)
    server = HttpServer(app, host, port)
    log.info("HTTP endpoint on %s (health, metrics, status page)", server.url)
    return server
