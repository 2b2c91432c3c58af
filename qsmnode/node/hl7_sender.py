"""The HL7 sender: one ORU^R01 per done job to each ``[[hl7.destinations]]`` RIS, over MLLP.

:class:`HL7Sender` is a thread of the node. Each pass:

1. **queues** the done jobs that have no message for a destination yet (those finished since
   the destination was first configured): the facts of the job (:mod:`qsmnode.node.hl7_facts`)
   become an ORU (:func:`qsmnode.node.hl7_message.build_oru`), recorded pending in the store
   (:mod:`qsmnode.node.hl7_queue`). A job whose message cannot be built is recorded failed,
   with why;
2. **sends** the due messages of each destination over one MLLP connection, one at a time,
   waiting for each acknowledgement:

   - AA (or CA): ``sent``, recorded before the next message goes;
   - AE (or CE), no answer within ``timeout_s``, a connection refused or closed (also in the
     middle of the answer), an answer that is not an HL7 ACK or acknowledges another control
     ID: the message stays pending and is tried again after the ``[sender]`` backoff
     (``retry_initial_s`` doubling to ``retry_max_s``, 10 % jitter); with
     ``[sender] max_attempts`` > 0 it ends ``failed`` when they are used up. After a transport
     failure the connection is dropped and the destination waits for that retry (one
     connection per retry, not one per message);
   - AR (or CR): ``failed`` at once, with the RIS's reason (MSA-3, ERR): sending the same
     message again would be rejected again.

The same result always has the same message control ID, so a message that went out but whose
AA was lost (a dropped connection, a node killed before recording it) is sent again under the
same ID and the RIS can recognise it. The RIS's text is redacted of the message's patient
values before it is logged, stored or audited; logs and the audit log name control IDs, jobs,
study UIDs and destinations, never patient data.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qsmnode.node.association import client_ssl_context
from qsmnode.node.config import HL7DestinationConfig, Settings
from qsmnode.node.hl7_facts import job_facts, result_key
from qsmnode.node.hl7_message import (
    HL7MessageError,
    Parties,
    build_oru,
    control_id,
    describe,
    parse_ack,
)
from qsmnode.node.hl7_observations import FLAG_RANK
from qsmnode.node.hl7_queue import DueMessage, HL7Queue, MessageOutcome, QueuedMessage
from qsmnode.node.mllp import MLLPConnection, MLLPError
from qsmnode.node.redact import Redactor, dataset_values
from qsmnode.node.sender import backoff_s
from qsmnode.node.store import Store

log = logging.getLogger(__name__)

JITTER = 0.1
_IDLE_POLL_S = 1.0
_ERROR_WAIT_MAX_S = 60.0
_ANSWER_CHARS = 200
"""The longest part of an unreadable answer kept in an error."""


def peer_text(destination: HL7DestinationConfig) -> str:
    """``RIS@host:port`` (and ``TLS``), for logs and status."""
    tls = " TLS" if destination.tls.enabled else ""
    return f"{destination.receiving_application}@{destination.host}:{destination.port}{tls}"


def message_redactor(message: str) -> Redactor:
    """A redactor of the patient values in an ER7 message's PID segment and its accession
    number (OBR-18), for the RIS's answers, which may quote them."""
    values: dict[str, str] = {}
    for segment in message.split("\r"):
        fields = segment.split("|")
        if fields[0] == "PID":
            for index, keyword in ((3, "PatientID"), (5, "PatientName"),
                                   (7, "PatientBirthDate")):
                if len(fields) > index:
                    _add_forms(values, fields[index].split("^")[0] if index == 3
                               else fields[index], keyword)
        elif fields[0] == "OBR" and len(fields) > 18:
            _add_forms(values, fields[18], "AccessionNumber")
    return Redactor(values)


def _add_forms(values: dict[str, str], text: str, keyword: str) -> None:
    import re

    plain = re.sub(r"\\[FSTRE]\\", " ", text)
    parts = [p for p in re.split(r"[\^& ]+", plain) if len(p) >= 3]
    whole = " ".join(re.split(r"[\^&]+", plain)).strip()
    for form in (*parts, whole, plain.replace("^", " ").strip(), text):
        if len(form) >= 3:
            values.setdefault(form, keyword)


class HL7Sender:
    """The node's HL7 sender thread (see the module docstring)."""

    def __init__(self, settings: Settings, store: Store,
                 clock: Callable[[], float] = time.time, jitter: float = JITTER) -> None:
        self.settings = settings
        self.store = store
        self.queue = HL7Queue(store)
        self.clock = clock
        self.jitter = jitter
        self.destinations = {d.name: d for d in settings.hl7.destinations}
        self._since: dict[str, float] = {}
        self._holds: dict[str, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state_dir(self) -> Path:
        return self.settings.paths.state_dir

    def start(self) -> None:
        """Start the thread (nothing to do without ``[[hl7.destinations]]``)."""
        if not self.destinations:
            return
        self._since = self.queue.register(list(self.destinations), self.clock())
        log.info("hl7: %d RIS destination%s: %s", len(self.destinations),
                 "" if len(self.destinations) == 1 else "s",
                 ", ".join(f"{name} ({peer_text(d)})" for name, d in self.destinations.items()))
        self._thread = threading.Thread(target=self._run, name="hl7-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            longest = max((d.timeout_s for d in self.destinations.values()), default=0.0)
            self._thread.join(timeout=longest + 5 if timeout_s is None else timeout_s)
            self._thread = None

    def _run(self) -> None:
        errors = 0
        while not self._stop.is_set():
            try:
                busy = self.step()
                errors = 0
                wait = 0.0 if busy else self._idle_wait()
            except Exception as exc:  # keep the thread alive: the store may be busy
                errors += 1
                wait = min(2.0 ** (errors - 1), _ERROR_WAIT_MAX_S)
                log.error("hl7: %s: %s (trying again in %g s)", type(exc).__name__, exc, wait)
                log.debug("hl7: the error in detail", exc_info=True)
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()

    def _idle_wait(self) -> float:
        due = self.queue.next_try_at(list(self.destinations))
        wait = _IDLE_POLL_S
        if due is not None:
            wait = min(wait, max(due - self.clock(), 0.0))
        for until in self._holds.values():
            wait = min(wait, max(until - self.clock(), 0.05))
        return wait

    # ------------------------------------------------------------------------------ queueing

    def queue_new(self) -> int:
        """Build and record the messages of done jobs that have none yet; return how many."""
        queued = 0
        for name, destination in self.destinations.items():
            since = self._since.get(name)
            if since is None:
                since = self.queue.register([name], self.clock())[name]
                self._since[name] = since
            for job_id in self.queue.unqueued_jobs(name, since):
                if self._stop.is_set():
                    return queued
                queued += self._queue_job(job_id, destination)
        return queued

    def _queue_job(self, job_id: int, destination: HL7DestinationConfig) -> int:
        job = self.store.job(job_id)
        if job is None:
            return 0
        acquisition = self.store.acquisition(job.acquisition_id)
        study_uid = acquisition.study_uid if acquisition is not None else ""
        parties = Parties(destination.sending_application, destination.sending_facility,
                          destination.receiving_application, destination.receiving_facility)
        now = self.clock()
        try:
            facts = job_facts(self.store, job, self.state_dir, self.settings.hl7)
            text = build_oru(facts, parties)
        except sqlite3.Error:
            raise  # the store: tried again at the next pass
        except Exception as exc:  # FactsError, HL7MessageError, or a header it cannot use
            error = self._redacted(job.id, f"{type(exc).__name__}: {exc}")
            key = control_id(result_key(self.store, job))
            if self.queue.add_unbuildable(key, destination.name, job.id, study_uid, error,
                                          now):
                log.error("hl7: %s: no ORU for job %d (study %s): %s", destination.name,
                          job.id, study_uid, error)
                self.store.audit.record("hl7_failed", destination=destination.name,
                                        control_id=key, job_id=job.id, study_uid=study_uid,
                                        attempt=0, error=error, given_up=True)
            return 0
        flags = [row.flag for row in facts.observations if row.code == "FINDING" and row.flag]
        abnormal = max(flags, key=lambda f: FLAG_RANK.get(f, 0)) if flags else None
        finding = next((row for row in facts.observations if row.code == "FINDING"), None)
        notes = list(facts.notes)
        if finding is not None and finding.status == "X":
            notes.append(f"M1 {finding.value}")
        key = control_id(facts.result_key)
        if not self.queue.add(QueuedMessage(key, destination.name, job.id, facts.study_uid,
                                            text, tuple(notes), abnormal), now):
            return 0
        log.info("hl7: %s: ORU %s queued for job %d (study %s; abnormal flags: %s%s)",
                 destination.name, key, job.id, facts.study_uid, describe(facts.observations),
                 "; " + "; ".join(notes) if notes else "")
        self.store.audit.record("hl7_queued", destination=destination.name, control_id=key,
                                job_id=job.id, study_uid=facts.study_uid, abnormal=abnormal,
                                notes=notes)
        return 1

    def _redacted(self, job_id: int, text: str) -> str:
        """``text`` without the patient and study values of the job's images (an exception
        may quote one)."""
        paths = [str(self.state_dir / r.path) for r in self.store.job_instances(job_id)[:3]]
        paths += [str(self.state_dir / r.path) for r in self.store.outbox(job_id=job_id)[:3]]
        return Redactor(dataset_values(paths))(text)

    # ------------------------------------------------------------------------------- sending

    def step(self) -> bool:
        """One pass: queue new results, then one batch per destination with due messages.
        True when something was queued or tried."""
        busy = self.queue_new() > 0
        for name, destination in self.destinations.items():
            if self._stop.is_set():
                break
            now = self.clock()
            hold = self._holds.get(name)
            if hold is not None and now < hold:
                continue
            self._holds.pop(name, None)
            due = self.queue.due(name, now)
            if due:
                busy = True
                self.deliver(destination, due)
        return busy

    def deliver(self, destination: HL7DestinationConfig, due: list[DueMessage]) -> None:
        """Send due messages over one connection, recording each outcome as it comes."""
        draw = random.random()
        try:
            connection = MLLPConnection(destination.host, destination.port,
                                        destination.timeout_s,
                                        client_ssl_context(destination.tls))
        except MLLPError as exc:
            self._transport_failed(destination, due[0], str(exc), draw)
            return
        with connection:
            for item in due:
                if self._stop.is_set():
                    return
                started = time.monotonic()
                redact = message_redactor(item.message)
                try:
                    answer = connection.exchange(item.message)
                except MLLPError as exc:
                    self._transport_failed(destination, item, str(exc), draw)
                    return
                try:
                    ack = parse_ack(answer)
                except HL7MessageError as exc:
                    shown = redact(answer.replace("\r", " ").strip())[:_ANSWER_CHARS]
                    self._transport_failed(
                        destination, item, f"the RIS answered something that is not a usable "
                        f"HL7 acknowledgement ({exc}): {shown!r}", draw)
                    return
                if ack.control_id != item.control_id:
                    self._transport_failed(
                        destination, item, f"the RIS acknowledged control ID "
                        f"{redact(ack.control_id)[:40]!r}, not {item.control_id}", draw)
                    return
                reason = redact(ack.text)[:_ANSWER_CHARS]
                if ack.accepted:
                    self._record(destination, item, MessageOutcome(
                        item.control_id, destination.name, True, ack.code))
                    log.info("hl7: %s: ORU %s (job %d, study %s) acknowledged %s in %.2f s",
                             destination.name, item.control_id, item.job_id, item.study_uid,
                             ack.code, time.monotonic() - started)
                elif ack.rejected:
                    error = f"rejected by the RIS ({ack.code}): {reason or 'no reason given'}"
                    self._record(destination, item, MessageOutcome(
                        item.control_id, destination.name, False, ack.code, error,
                        failed=True))
                    log.error("hl7: %s: ORU %s (job %d, study %s) %s; not sent again",
                              destination.name, item.control_id, item.job_id, item.study_uid,
                              error)
                else:
                    error = f"application error at the RIS ({ack.code}): " \
                            f"{reason or 'no reason given'}"
                    self._failed(destination, item, error, ack.code, draw)

    def _transport_failed(self, destination: HL7DestinationConfig, item: DueMessage,
                          error: str, draw: float) -> None:
        """A failure of the exchange: the message waits for its retry, and so does the
        destination."""
        outcome = self._failed(destination, item, error, None, draw)
        if outcome.next_try_at is not None and not outcome.failed:
            self._holds[destination.name] = outcome.next_try_at

    def _failed(self, destination: HL7DestinationConfig, item: DueMessage, error: str,
                ack_code: str | None, draw: float) -> MessageOutcome:
        sender = self.settings.sender
        attempts = item.attempts + 1
        delay = backoff_s(attempts, sender.retry_initial_s, sender.retry_max_s, self.jitter,
                          rng=lambda: draw)
        give_up = sender.max_attempts > 0 and attempts >= sender.max_attempts
        outcome = MessageOutcome(item.control_id, destination.name, False, ack_code, error,
                                 self.clock() + delay, give_up)
        self._record(destination, item, outcome)
        log.warning("hl7: %s: ORU %s (job %d, study %s) not delivered: %s; %s",
                    destination.name, item.control_id, item.job_id, item.study_uid, error,
                    f"given up after {attempts} attempts" if give_up
                    else f"next try in {delay:.0f} s (attempt {attempts})")
        return outcome

    def _record(self, destination: HL7DestinationConfig, item: DueMessage,
                outcome: MessageOutcome) -> None:
        if not self.queue.record(outcome, self.clock()):
            return
        fields = {"destination": destination.name, "peer": peer_text(destination),
                  "control_id": item.control_id, "job_id": item.job_id,
                  "study_uid": item.study_uid, "attempt": item.attempts + 1,
                  "ack_code": outcome.ack_code}
        if outcome.sent:
            self.store.audit.record("hl7_sent", **fields)
        else:
            self.store.audit.record("hl7_failed", **fields, error=outcome.error,
                                    given_up=outcome.failed)
