"""The node: what ``qsmnode serve`` runs.

:func:`serve` holds the state directory's lock, opens the store, makes the spool and the store
agree (:func:`~qsmnode.node.recovery.recover`), hands the jobs that a previous run left running
back to the queue, then runs four parts until told to stop:

- the **receiver** (:class:`~qsmnode.node.receiver.Receiver`): the DICOM listener, in
  pynetdicom's threads;
- the **tracker** (:class:`~qsmnode.node.tracker.Tracker`): a thread that completes series and
  turns complete studies into acquisitions, problems and jobs;
- the **worker pool** (:class:`~qsmnode.node.worker.WorkerPool`): a thread that runs the jobs
  in child processes and puts their derived objects into the outbox
  (:class:`~qsmnode.node.outbox.Outbox`), queued for every destination;
- the **sender** (:class:`~qsmnode.node.sender.Sender`): a thread that C-STOREs the outbox to
  the destinations, with retries. Pending sends are in the store, so a restart resumes them;
- the **HL7 sender** (:class:`~qsmnode.node.hl7_sender.HL7Sender`): a thread that sends one
  ORU^R01 per done job to each ``[[hl7.destinations]]`` RIS over MLLP, from the store's
  ``hl7_messages`` outbox, with the same retries;
- **retention** (:class:`~qsmnode.node.retention.Retention`): a thread that removes the files
  of finished, delivered studies by age, and sooner when the disk runs low.

The store writes its state changes to the audit log (:mod:`qsmnode.node.audit`, ``[audit]``),
and so do the receiver (associations), the sender (sends) and retention (removals).

At a stop, the listener closes first (running associations get a grace period), then the
tracker, then the pool (running jobs are handed back to the queue), then the sender (the
association in progress is aborted after the file being sent).

**One node per state directory.** ``<state_dir>/node.lock`` is held (``flock``) while the node
runs, and a second node on the same directory refuses to start. So, at start, every job the
store shows as running belongs to a node that is gone (its lease owner is dead): it is queued
again, once, or failed when its attempts are used up. Lease owners are ``<node id>:<pid>``,
the node id being new at every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from qsmnode import __version__
from qsmnode.compat import IncompatibleLibrary
from qsmnode.node import logtext
from qsmnode.node.audit import NULL_AUDIT, AuditLog
from qsmnode.node.config import ConfigError, Settings, load_settings
from qsmnode.node.hl7_sender import HL7Sender
from qsmnode.node.http import start_http
from qsmnode.node.jobs import DEFAULT_JOB_FUNCTION
from qsmnode.node.normative import NormativeTableError, load_normative_table
from qsmnode.node.outbox import Outbox
from qsmnode.node.receiver import SPOOL_DIRNAME, Receiver, quiet_library_loggers
from qsmnode.node.recovery import recover
from qsmnode.node.retention import Retention
from qsmnode.node.sender import Sender
from qsmnode.node.spool import MIB, Spool
from qsmnode.node.store import Store, StoreError
from qsmnode.node.tracker import Tracker
from qsmnode.node.worker import WorkerPool, attempt_ended_well

log = logging.getLogger(__name__)

LOCK_FILENAME = "node.lock"


class NodeBusyError(RuntimeError):
    """Another node runs with the same state directory."""


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``<state_dir>/node.lock`` (exclusive ``flock``) for the node's lifetime.

    Raises:
        NodeBusyError: another process holds it (the message gives its pid).
    """
    path = Path(state_dir) / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise NodeBusyError(
                f"{state_dir}: another qsmnode serve (pid {holder}) runs with this state "
                "directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def serve(settings: Settings, stop: threading.Event, ready: threading.Event | None = None,
          *, job_function: str = DEFAULT_JOB_FUNCTION) -> int:
    """Run the node until ``stop`` is set (see the module docstring). Returns 0.

    ``job_function`` (``module:function``) is what the worker children run for each job.

    Raises:
        NodeBusyError, StoreError, OSError: the node cannot start.
    """
    import pydicom.config

    # values are only converted for the attributes read; never warn with their text
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    quiet_library_loggers(logging.getLogger().getEffectiveLevel())
    state_dir = settings.paths.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    with state_dir_lock(state_dir), _audit_log(settings) as audit, \
            Store.in_state_dir(state_dir, audit=audit) as store:
        audit.record("node_started", version=__version__, ae_title=settings.listener.ae_title)
        _warn_placeholder_table(settings)
        spool = Spool(state_dir / SPOOL_DIRNAME, settings.listener.min_free_disk_mb * MIB)
        recover(store, spool, state_dir)
        owner = f"{uuid.uuid4().hex[:12]}:{os.getpid()}"
        for job in store.requeue_orphaned_jobs(
                owner, settings.workers.job_attempts, time.time(),
                finished=lambda job_id, attempt: attempt_ended_well(state_dir, job_id, attempt)):
            if job.state == "failed":
                log.error("job %d failed: %s; its %d attempts are used up", job.id,
                          job.last_error, job.attempts)
            else:
                log.warning("job %d queued again: %s", job.id, job.last_error)
        outbox = Outbox(state_dir)
        outbox.recover(store)
        sender = Sender(settings, store)
        hl7 = HL7Sender(settings, store)

        def on_results() -> None:
            sender.wake()
            hl7.wake()

        pool = WorkerPool(settings, store, owner, job_function=job_function, outbox=outbox,
                          on_results=on_results)
        tracker = Tracker(settings, store, on_jobs=pool.wake, started_at=time.time())
        receiver = Receiver(settings, store, spool)
        retention = Retention(settings, store)
        tracker_stop = threading.Event()
        tracker_thread = threading.Thread(target=tracker.run, args=(tracker_stop,),
                                          name="tracker", daemon=True)
        sender.start()
        hl7.start()
        retention.start()
        pool.start()
        tracker_thread.start()
        http = None
        try:
            http = start_http(settings, state_dir)
            if http is not None:
                log.info("HTTP status, health and metrics on %s", http.url)
            receiver.start()
            log.info("node %s ready (tracker: quiet period %g s, maximum wait %g s)", owner,
                     settings.tracker.quiet_period_s, settings.tracker.max_wait_s)
            if ready is not None:
                ready.set()
            stop.wait()
        finally:
            receiver.stop()
            if http is not None:
                http.stop()
            tracker_stop.set()
            tracker_thread.join(timeout=30)
            pool.stop()
            sender.stop()
            hl7.stop()
            retention.stop()
            audit.record("node_stopped", version=__version__, ae_title=settings.listener.ae_title)
    return 0


@contextlib.contextmanager
def _audit_log(settings: Settings) -> Iterator[AuditLog]:
    """The node's audit log (``[audit]``), closed at the end; a silent one when disabled."""
    path = settings.audit.path(settings.paths.state_dir)
    if path is None:
        yield NULL_AUDIT
        return
    audit = AuditLog(path)
    log.info("audit log: %s", path)
    try:
        yield audit
    finally:
        audit.close()


def _warn_placeholder_table(settings: Settings) -> None:
    """Say so when the normative table is marked as placeholder numbers (the example)."""
    path = settings.pipeline.m1_normative_table
    if path is None:
        return
    table = load_normative_table(str(path))
    if table.placeholder:
        log.warning("pipeline.m1_normative_table %s is marked placeholder = true: its numbers "
                    "are not clinical, and neither are the z-scores in the reports", path)


def main(config: Path | None = None, job_function: str = DEFAULT_JOB_FUNCTION) -> int:
    """The ``qsmnode serve`` command: read the configuration, log to stderr, serve until
    SIGTERM or SIGINT. Returns the exit status (0, 1 cannot serve, 2 bad configuration)."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logtext.configure(sys.stderr, settings.logging.level)  # one line per record, escaped
    root = logging.getLogger("qsmnode")
    stop = threading.Event()

    def on_signal(number: int, _frame: object) -> None:
        root.info("received %s: stopping", signal.Signals(number).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    root.info("qsmnode %s serving with %s", __version__, settings.source)
    try:
        return serve(settings, stop, job_function=job_function)
    except (NodeBusyError, StoreError, OSError, NormativeTableError, IncompatibleLibrary) as exc:
        root.error("cannot serve: %s", exc)
        return 1
