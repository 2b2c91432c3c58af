"""The sender: C-STORE of the outbox to every configured destination, with retries.

:class:`Sender` is a thread in the node. Each pass takes the store's due sends (pending, their
``next_try_at`` reached), per destination, and sends them over one association per batch
(:func:`qsmnode.node.association.send_over_association`): one presentation context per SOP class in
the batch, with the transfer syntax of its files (pynetdicom's default storage contexts lack
Parametric Map), optionally over TLS. The outcome is recorded per instance as the batch goes
(at least every second, so a node killed mid-batch resends little):

- success, or a warning status (PS3.7 Annex C: 0x0001, 0x0107, 0x0116, 0xBxxx, e.g. the
  storage warnings 0xB000, 0xB006, 0xB007): ``sent`` (the peer stored the object); also
  0x0111 (Duplicate SOP Instance: the peer holds it already);
- a failure status, no response, an aborted or refused association, a connection that cannot
  be made, a file that cannot be read: the send stays ``pending`` and is tried again after an
  exponential backoff, ``sender.retry_initial_s`` doubling per attempt up to
  ``sender.retry_max_s`` (plus up to 10 % jitter, drawn once per batch so that a batch stays
  one batch and destinations do not retry in step). With ``sender.max_attempts`` > 0 it ends
  ``failed`` when the attempts are used up (``qsmnode resend`` queues it again);
- an A-ASSOCIATE-RJ: ``last_error`` gives the rejection in words (e.g. "calling AE title not
  recognised", permanent, from the service user) and the sends stay queued whatever
  ``max_attempts`` says: a refusal is a configuration problem at one end, not a fault of the
  objects, and they are delivered once it is fixed;
- an outbox file that is gone: ``failed`` at once (retrying cannot bring it back).

A destination with ``stow_url`` gets the same batches by DICOMweb STOW-RS instead
(:func:`qsmnode.node.stow.stow_files`, same outcomes and retries).

A destination whose association fails is held until the next try of that batch: its other
sends wait for it too (one association per retry, not one per send), except sends never tried
(new results, ``qsmnode resend``). An object that was out, unanswered, when an association
ended goes last in the next batch, so that an object the peer chokes on blocks no other.
Outcomes the store cannot record are kept and recorded before anything is sent again.

Pending sends live in the store, so a restarted node resumes them. Log lines name UIDs, AE
titles and addresses, never patient data. ``qsmnode process --send`` uses
:func:`~qsmnode.node.association.send_over_association` directly (one try, no store).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from qsmnode.node.association import (
    MAX_CONTEXTS,
    AssociationFailed,
    FileOutcome,
    OutgoingFile,
    Peer,
    send_over_association,
)
from qsmnode.node.config import Settings
from qsmnode.node.store import DueSend, SendOutcome, Store

log = logging.getLogger(__name__)

BATCH_SIZE = 500
"""Instances sent over one association at most."""
JITTER = 0.1
_IDLE_POLL_S = 1.0  # ``qsmnode resend`` from another process is noticed within this
_ERROR_WAIT_MAX_S = 60.0  # the longest wait after an unexpected error (the store failing)
_SUSPECTS_KEPT = 10_000


def backoff_s(attempts: int, initial_s: float, max_s: float, jitter: float = 0.0,
              rng: Callable[[], float] = random.random) -> float:
    """The wait before the next try after ``attempts`` tries failed: ``initial_s`` doubling
    per attempt, at most ``max_s``; ``jitter`` adds up to that fraction (still at most
    ``max_s``)."""
    delay = initial_s * 2.0 ** min(max(attempts - 1, 0), 60)
    delay = min(delay, max_s)
    if jitter > 0:
        delay = min(delay * (1.0 + jitter * rng()), max_s)
    return delay



def _batch_of(due: Sequence[DueSend], suspects: set[str]) -> list[DueSend]:
    """The due sends one association carries: in the recorded order with what the peer last
    choked on at the end (a stable sort), up to :data:`MAX_CONTEXTS` SOP classes (the next
    batch takes the rest)."""
    classes: list[str] = []
    batch = []
    for item in sorted(due, key=lambda d: d.sop_instance_uid in suspects):
        if item.sop_class_uid not in classes:
            if len(classes) == MAX_CONTEXTS:
                continue  # the next batch takes it
            classes.append(item.sop_class_uid)
        batch.append(item)
    return batch


def _transport(peer: Peer) -> Callable[..., dict[Any, FileOutcome]]:
    """How to send to ``peer``: DICOMweb STOW-RS when it has a ``stow_url``, else C-STORE."""
    if peer.stow_url:
        from qsmnode.node.stow import stow_files

        return stow_files
    return send_over_association


class _BatchProgress:
    """The outcomes of one batch as it goes, handed to ``record`` at least every ``every_s``
    seconds (so a node killed mid-batch resends little)."""

    def __init__(self, record: Callable[[list[SendOutcome]], None], every_s: float) -> None:
        self.outcomes: list[SendOutcome] = []
        self.unsaved: list[SendOutcome] = []
        self._record = record
        self._every_s = every_s
        self._saved_at = time.monotonic()

    def add(self, outcome: SendOutcome) -> None:
        """One more outcome; record the unsaved ones when ``every_s`` has passed."""
        self.outcomes.append(outcome)
        self.unsaved.append(outcome)
        if time.monotonic() - self._saved_at >= self._every_s:
            self.save()

    def save(self) -> None:
        """Record the outcomes not recorded yet."""
        chunk = self.unsaved[:]
        self.unsaved.clear()
        self._saved_at = time.monotonic()
        self._record(chunk)


class Sender:
    """The node's sender thread (see the module docstring)."""

    def __init__(self, settings: Settings, store: Store,
                 clock: Callable[[], float] = time.time, batch_size: int = BATCH_SIZE,
                 timeout_s: float | None = None, jitter: float = JITTER,
                 record_every_s: float = 1.0) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.batch_size = batch_size
        self.timeout_s = settings.sender.timeout_s if timeout_s is None else timeout_s
        self.jitter = jitter
        self.record_every_s = record_every_s
        self.peers = {d.name: Peer.from_config(d) for d in settings.destinations}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # destination -> (not tried before, may sends never tried yet pass): after a failed
        # association the destination's other sends wait for the next try, whatever their
        # own next_try_at, so that a destination that is down gets one association per retry
        self._holds: dict[str, tuple[float, bool]] = {}
        # destination -> SOP instance UIDs out when an association ended unanswered: they go
        # last in the next batch, so that an object the peer chokes on blocks no other
        self._suspects: dict[str, set[str]] = defaultdict(set)
        # tries made whose outcomes the store could not record: recorded before anything is
        # sent again (else each retry would send them again)
        self._unrecorded: list[tuple[Peer, list[DueSend], list[SendOutcome], float]] = []

    def start(self) -> None:
        if self.peers:
            names = ", ".join(str(p) for p in self.peers.values())
            log.info("sender: %d destination%s: %s; retries from %g s doubling to %g s, %s",
                     len(self.peers), "" if len(self.peers) == 1 else "s", names,
                     self.settings.sender.retry_initial_s, self.settings.sender.retry_max_s,
                     "forever" if not self.settings.sender.max_attempts
                     else f"{self.settings.sender.max_attempts} attempts")
        else:
            log.info("sender: no destinations configured; derived objects stay in the outbox")
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for due sends now (new results were queued)."""
        self._wake.set()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop after the file being sent (its association is aborted)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5 if timeout_s is None else timeout_s)
            self._thread = None

    def _run(self) -> None:
        errors = 0
        while not self._stop.is_set():
            try:
                if self.step():
                    errors = 0
                    continue
                wait = self._idle_wait()
                errors = 0
            except Exception as exc:  # keep the sender alive: the store may be busy, a disk full
                errors += 1
                wait = min(2.0 ** (errors - 1), _ERROR_WAIT_MAX_S)
                log.error("sender: %s: %s (trying again in %g s)", type(exc).__name__, exc,
                          wait)
                log.debug("sender: the error in detail", exc_info=True)
            self._wake.wait(wait)
            self._wake.clear()

    def _idle_wait(self) -> float:
        """Seconds until a send is due (a held destination's at the end of its hold), at
        most :data:`_IDLE_POLL_S`."""
        wait = _IDLE_POLL_S
        now = self.clock()
        for name in self.peers:
            due = self.store.next_send_at([name])
            if due is None:
                continue
            hold = self._holds.get(name)
            if hold is not None:
                due = max(due, hold[0])
            wait = min(wait, max(due - now, 0.0))
        return wait

    def _held(self, name: str, due: Sequence[DueSend], now: float) -> bool:
        """True when ``name`` waits for the next try after a failure; sends never tried yet
        (new results, ``qsmnode resend``) pass unless the failure left them untried."""
        hold = self._holds.get(name)
        if hold is None:
            return False
        until, fresh_pass = hold
        if now >= until:
            del self._holds[name]
            return False
        return not (fresh_pass and any(item.attempts == 0 for item in due))

    def step(self) -> bool:
        """One pass: one batch per destination with due sends. True when a batch was tried.

        Raises:
            Exception: the store fails (outcomes of earlier tries cannot be recorded, or due
                sends cannot be read); nothing is sent then.
        """
        self._record_unrecorded()
        tried = False
        for name, peer in self.peers.items():
            if self._stop.is_set():
                break
            now = self.clock()
            due = self.store.due_sends(now, [name], self.batch_size)
            if not due or self._held(name, due, now):
                continue
            tried = True
            try:
                self.deliver(peer, due)
            except Exception as exc:
                if self._unrecorded:  # the store fails: send nothing more
                    raise
                sender = self.settings.sender
                delay = backoff_s(max(item.attempts for item in due) + 1,
                                  sender.retry_initial_s, sender.retry_max_s)
                self._holds[name] = (self.clock() + delay, False)
                log.error("sender: %s: %s: %s; its %d due send%s stay queued (next try in "
                          "%.0f s)", name, type(exc).__name__, exc, len(due),
                          "" if len(due) == 1 else "s", delay)
                log.debug("sender: the error in detail", exc_info=True)
        return tried

    def _record(self, peer: Peer, batch: list[DueSend], outcomes: list[SendOutcome]) -> None:
        """Record tries (and audit them); when the store fails, keep them for
        :meth:`_record_unrecorded` and raise."""
        if not outcomes:
            return
        at = self.clock()
        try:
            self.store.record_send_outcomes(outcomes, at)
        except Exception:
            self._unrecorded.append((peer, batch, outcomes, at))
            raise
        self._audit(peer, batch, outcomes)

    def _record_unrecorded(self) -> None:
        while self._unrecorded:
            peer, batch, outcomes, at = self._unrecorded[0]
            self.store.record_send_outcomes(outcomes, at)
            self._unrecorded.pop(0)
            self._audit(peer, batch, outcomes)
            log.warning("sender: %s: %d outcome%s recorded after a store error", peer.name,
                        len(outcomes), "" if len(outcomes) == 1 else "s")

    def deliver(self, peer: Peer, due: Sequence[DueSend]) -> list[SendOutcome]:
        """Send one batch to ``peer`` and record the outcome of every send tried (as the
        batch goes, at least every ``record_every_s``)."""
        suspects = self._suspects[peer.name]
        batch = _batch_of(due, suspects)
        state_dir = self.settings.paths.state_dir
        files = [OutgoingFile(item, state_dir / item.path, item.sop_class_uid,
                              item.transfer_syntax_uid, item.sop_instance_uid)
                 for item in batch]
        draw = random.random()  # one jitter per batch: its sends stay one batch
        started = time.monotonic()
        progress = _BatchProgress(partial(self._record, peer, batch), self.record_every_s)

        def on_outcome(item: DueSend, result: FileOutcome) -> None:
            progress.add(self._outcome(item, result, suspects, draw))

        try:
            _transport(peer)(peer, files, self.timeout_s, self._stop, on_outcome=on_outcome)
        except AssociationFailed as exc:
            return self._association_failed(peer, batch, exc, draw)
        except BaseException:
            if progress.unsaved:  # keep what was tried: it is not sent again
                with contextlib.suppress(Exception):
                    progress.save()
            raise
        progress.save()
        self._holds.pop(peer.name, None)
        self._log_batch(peer, batch, progress.outcomes, started)
        return progress.outcomes

    def _outcome(self, item: DueSend, result: FileOutcome, suspects: set[str],
                 draw: float) -> SendOutcome:
        """The send's outcome from the file's; a file that was out, unanswered, when the
        association ended becomes a suspect (last in the next batch), one sent is none."""
        if result.ok:
            outcome = SendOutcome(item.sop_instance_uid, item.destination, True, result.status)
            suspects.discard(item.sop_instance_uid)
            return outcome
        outcome = self._failed(item, result.error or "failed", result.status, draw,
                               lost=result.lost)
        if result.suspect:
            if len(suspects) >= _SUSPECTS_KEPT:
                suspects.clear()
            suspects.add(item.sop_instance_uid)
        return outcome

    def _association_failed(self, peer: Peer, batch: list[DueSend], exc: AssociationFailed,
                            draw: float) -> list[SendOutcome]:
        """Record every send of the batch as tried and failed, and hold the destination
        until the earliest next try."""
        outcomes = [self._failed(item, str(exc), None, draw, rejected=exc.rejected)
                    for item in batch]
        self._record(peer, batch, outcomes)
        nxt = min(o.next_try_at or 0.0 for o in outcomes)
        self._holds[peer.name] = (nxt, True)
        log.warning("sender: %s: %s; %d send%s stay queued (next try in %.0f s, attempt "
                    "%d)", peer.name, exc, len(batch), "" if len(batch) == 1 else "s",
                    max(nxt - self.clock(), 0.0), max(item.attempts for item in batch) + 1)
        return outcomes

    def _log_batch(self, peer: Peer, batch: list[DueSend], outcomes: list[SendOutcome],
                   started: float) -> None:
        """One line for the batch, and one for each of the first five sends not sent."""
        sent = [o for o in outcomes if o.sent]
        failed = [o for o in outcomes if not o.sent]
        studies = sorted({item.study_uid for item in batch})
        log.info("sender: %s: %d of %d instance%s sent in %.2f s (study %s)", peer.name,
                 len(sent), len(batch), "" if len(batch) == 1 else "s",
                 time.monotonic() - started, ", ".join(studies))
        for outcome in failed[:5]:
            log.warning("sender: %s: instance %s not sent: %s%s", peer.name,
                        outcome.sop_instance_uid, outcome.error,
                        "; given up" if outcome.give_up else "")
        if len(failed) > 5:
            log.warning("sender: %s: %d more instances not sent", peer.name, len(failed) - 5)

    def _audit(self, peer: Peer, batch: Sequence[DueSend],
               outcomes: Sequence[SendOutcome]) -> None:
        """One audit event per send tried: ``instance_sent`` or ``send_failed``."""
        audit = self.store.audit
        if not audit.enabled:
            return
        items = {item.sop_instance_uid: item for item in batch}
        for outcome in outcomes:
            item = items[outcome.sop_instance_uid]
            fields: dict[str, Any] = {
                "destination": peer.name, "ae_title": peer.ae_title,
                "peer": f"{peer.host}:{peer.port}", "tls": peer.tls.enabled,
                "study_uid": item.study_uid, "series_uid": item.series_uid,
                "sop_instance_uid": item.sop_instance_uid, "sop_class_uid": item.sop_class_uid,
                "attempt": item.attempts + 1, "status": outcome.status,
            }
            if outcome.sent:
                audit.record("instance_sent", **fields)
            else:
                audit.record("send_failed", **fields, error=outcome.error,
                             given_up=outcome.give_up)

    def _failed(self, item: DueSend, error: str, status: int | None, draw: float = 0.0, *,
                rejected: bool = False, lost: bool = False) -> SendOutcome:
        sender = self.settings.sender
        attempts = item.attempts + 1
        delay = backoff_s(attempts, sender.retry_initial_s, sender.retry_max_s, self.jitter,
                          rng=lambda: draw)
        give_up = lost or (not rejected and sender.max_attempts > 0
                           and attempts >= sender.max_attempts)
        return SendOutcome(item.sop_instance_uid, item.destination, False, status, error,
                           self.clock() + delay, give_up)
