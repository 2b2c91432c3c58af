"""The worker pool: jobs run in child processes, one process per job attempt.

Parent side (:class:`WorkerPool`, a thread in the node): claims queued jobs from the store while
fewer than ``workers.processes`` children run, writes each attempt's :class:`JobSpec` to its
folder (``<state_dir>/jobs/<job>/attempt-<n>/spec.json``) and starts
``python -m qsmnode.node.worker`` on it. It polls its children, and when one exits it reads
``result.json`` and records the outcome in the store: done with the result, or a failed attempt
with a clear ``last_error`` (queued again while ``workers.job_attempts`` allow, else failed).
An error that comes from the input or the job itself (the child's result says ``final``: a
:class:`~qsmnode.node.jobs.JobError` that is not ``transient``, or any exception other than
``OSError`` and ``MemoryError``) fails the job at once: the same input would fail the same way.
Only crashes, kills, timeouts and resource errors (memory, disk, I/O) are retried.
A successful attempt's derived files (``derived/``, see :func:`~qsmnode.node.jobs.job_outputs`)
are first written into the outbox, then recorded with a pending send per configured destination
in the transaction that marks the job done; the copies in the attempt folder are then deleted.
A full disk is not the job's fault: an attempt that fails with ENOSPC or EDQUOT (preparing it,
in the child, or moving its results into the outbox), or that fails while the state
directory's free space is under ``listener.min_free_disk_mb``, hands its job back without
counting the attempt, and the pool starts no job until the free space has come back (see
:meth:`WorkerPool._disk_back`); a job handed back so :data:`DISK_RELEASES` times counts from
then on.
Memory, the rule: a job that needs more than its own budget will need it again, while a
machine short of memory because several jobs ran at once is not the job's fault.

- A ``MemoryError`` in the child under its address-space limit (``workers.memory_budget_mb``,
  see :mod:`~qsmnode.node.worker_child`) fails the job at once (final, one attempt): the
  same input needs the same memory. The error names the budget and the key to raise (then
  ``qsmnode retry``). A ``MemoryError`` in a child whose limit could not be set is the
  machine's shortage: treated as a kill below.
- A child killed by SIGKILL (what the kernel's OOM killer sends; the pool's own kills at a
  lease's end or a shutdown are recorded apart) while another job ran beside it hands its job
  back without counting the attempt, and the pool then runs one job at a time until that job
  has run again, alone (see :meth:`WorkerPool._hold_for_memory`). A job handed back so
  :data:`MEMORY_RELEASES` times counts from then on. A child killed while it ran alone
  fails the attempt (retried while attempts are left): alone, the kill says the job itself
  may not fit in the machine, or something else killed it.

Any other child that dies without a result (a crash, another signal) fails the attempt with its
exit status or signal, except SIGTERM or SIGINT from outside (a service manager stopping the
node signals the children too): that hands the job back to the queue without counting the
attempt. A store error while recording an outcome leaves it to be recorded
at the next pass. An attempt folder is emptied before a run. A child still running when its lease
(``workers.lease_s``) runs out is killed and its attempt failed. When the node stops, running
children are terminated and their jobs handed back to the queue without counting the attempt.

Child side (:mod:`qsmnode.node.worker_child`, started as ``python -m qsmnode.node.worker``):
a fresh interpreter per attempt, with a memory limit, watching its parent, that runs the job
function and writes ``result.json``; it never opens the store.

With ``[workers] backend = "dask"`` the same child runs on a worker of a Dask cluster instead
(:mod:`qsmnode.node.dask_backend`): a Dask task starts it there and waits for it; everything on
the parent side above stays as it is (its log lines then go to the Dask worker's log). A
scheduler that cannot be reached hands the job back uncounted and the pool tries again after
:data:`DASK_RETRY_S`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsmnode.node.config import Settings
from qsmnode.node.dask_backend import DaskAttempt
from qsmnode.node.jobs import (
    DEFAULT_JOB_FUNCTION,
    JobError,
    JobSpec,
    attempt_dir,
    job_outputs,
    job_spec,
)
from qsmnode.node.outbox import Outbox
from qsmnode.node.store import JobRecord, OutboxRecord, Store
from qsmnode.node.worker_child import SYSTEM_MEMORY

log = logging.getLogger("qsmnode.node.worker")  # also when run as __main__

SPEC_FILENAME = "spec.json"
RESULT_FILENAME = "result.json"
_TERMINATE_GRACE_S = 3.0
_POLL_S = 0.2
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
MIB = 1024 * 1024
DISK_RELEASES = 20
"""How many times one job is handed back, uncounted, for a full disk before that counts."""
MEMORY_RELEASES = 3
"""How many times one job is handed back, uncounted, for a kill while other jobs ran (the
machine out of memory) before that counts."""
DASK_RETRY_S = 10.0
"""After the Dask scheduler could not be reached, the pool waits this long to try again."""
_DISK_FULL = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")


# ------------------------------------------------------------------------------------------------
# Parent side


@dataclass
class _Running:
    job: JobRecord
    spec: JobSpec
    process: subprocess.Popen[bytes] | DaskAttempt
    result_path: Path
    started: float
    beside: int = 0
    """How many other children ran while this one did, at most (0: it ran alone)."""


def _child_env() -> dict[str, str]:
    """The child's environment: ours, with our module search path (as multiprocessing's spawn
    passes it), so the child imports the same code, job functions included."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class WorkerPool:
    """Runs the store's queued jobs in child processes (see the module docstring).

    ``owner`` names this node in job leases (``<node id>:<pid>``). ``job_function`` is the
    ``module:function`` the children run. Results go into ``outbox`` (default: the state
    directory's); ``on_results`` is called after a job queued derived instances.
    """

    def __init__(self, settings: Settings, store: Store, owner: str,
                 job_function: str = DEFAULT_JOB_FUNCTION,
                 clock: Callable[[], float] = time.time, outbox: Outbox | None = None,
                 on_results: Callable[[], None] | None = None,
                 disk_space: Callable[[], tuple[int, int]] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self.job_function = job_function
        self.clock = clock
        self.outbox = outbox if outbox is not None else Outbox(settings.paths.state_dir)
        self.on_results = on_results
        self._running: dict[int, _Running] = {}
        # ended attempts whose outcome the store refused (busy, disk full): recorded again at
        # the next pass, so their jobs never stay "running" with nobody running them
        self._unrecorded: dict[int, tuple[JobRecord, str, bool]] = {}
        self._final: set[int] = set()
        """Jobs whose failed attempt (not recorded yet) is final: not retried."""
        self._stopped: dict[int, int] = {}  # job id: children stopped from outside (not counted)
        # (free, total) bytes of the state directory's file system
        self._disk_space = disk_space or self._state_dir_space
        self._disk_hold: int | None = None  # free bytes needed before jobs start again
        self._disk_releases: dict[int, int] = {}  # job id: attempts handed back for the disk
        self._memory_hold: int | None = None  # job to run alone again: one child at a time
        self._memory_releases: dict[int, int] = {}  # job id: handed back for memory
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dask: Any = None  # the Dask client (backend "dask"), made at the first job
        self._dask_retry_at = 0.0  # monotonic: the scheduler was unreachable, try again then

    # -------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker-pool", daemon=True)
        self._thread.start()
        workers = self.settings.workers
        log.info("worker pool: %d process%s, memory budget %d MiB each, %d attempts per job, "
                 "lease %g s", workers.processes, "" if workers.processes == 1 else "es",
                 workers.memory_budget_mb, workers.job_attempts, workers.lease_s)

    def wake(self) -> None:
        """Look for queued jobs now (the tracker calls this after queueing one)."""
        self._wake.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop: terminate running children and hand their jobs back to the queue."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    @property
    def running_jobs(self) -> list[int]:
        return list(self._running)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                except Exception:  # keep the pool alive: the store may be busy, a disk full
                    log.exception("worker pool: unexpected error (retrying)")
                    self._stop.wait(1.0)
                self._wake.wait(_POLL_S)
                self._wake.clear()
        finally:
            self._shutdown()

    def step(self) -> None:
        """One pass: reap finished children, enforce leases, start queued jobs."""
        for job_id, (job, error, release) in list(self._unrecorded.items()):
            del self._unrecorded[job_id]
            (self._release if release else self._fail)(job, error)
        for job_id in list(self._running):
            self._check(self._running[job_id])
        if not self._disk_back() or time.monotonic() < self._dask_retry_at:
            return
        processes = self.settings.workers.processes if self._memory_back() else 1
        while len(self._running) < processes and not self._stop.is_set():
            job = self.store.claim_job(self.owner, self.settings.workers.lease_s, self.clock())
            if job is None:
                break
            self._launch(job)

    # ------------------------------------------------------------------------------------ starting

    def _launch(self, job: JobRecord) -> None:
        workers = self.settings.workers
        try:
            spec = job_spec(self.store, job, self.settings)
            work = attempt_dir(self.settings.paths.state_dir, job.id, job.attempts)
            # an attempt handed back at a shutdown runs again in the same folder: never take
            # what the interrupted run left (derived files, manifest, progress) as this one's
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
            spec_path, result_path = work / SPEC_FILENAME, work / RESULT_FILENAME
            result_path.unlink(missing_ok=True)
            spec_path.write_text(spec.to_json())
        except JobError as exc:
            self._fail(job, str(exc))
            return
        except Exception as exc:  # e.g. the disk is full: fail the attempt, not the pool
            log.exception("job %d: cannot prepare the attempt", job.id)
            self._fail(job, f"cannot prepare the attempt: {type(exc).__name__}: {exc}")
            return
        command = [
            sys.executable, "-m", "qsmnode.node.worker", "--spec", str(spec_path),
            "--result", str(result_path), "--job-function", self.job_function,
            "--memory-budget-mb", str(workers.memory_budget_mb),
            "--parent-pid", str(os.getpid()),
            "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        ]
        process: subprocess.Popen[bytes] | DaskAttempt
        if workers.backend == "dask":
            try:
                process = DaskAttempt(self._dask_client(), command, _child_env()["PYTHONPATH"],
                                      work, f"job-{job.id}-{job.attempts}")
            except OSError as exc:  # the cluster is not the job's fault: try again later
                self._dask_retry_at = time.monotonic() + DASK_RETRY_S
                self._release(job, f"{exc}; queued again (tried again in {DASK_RETRY_S:g} s)")
                return
        else:
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, env=_child_env(),
                                           start_new_session=True)
            except OSError as exc:
                self._fail(job, f"cannot start a worker process: {exc}")
                return
        others = [other for other in self._running.values() if other.process.poll() is None]
        for other in others:
            other.beside = max(other.beside, len(others))
        self._running[job.id] = _Running(job, spec, process, result_path, time.monotonic(),
                                         len(others))
        acquisition = self.store.acquisition(job.acquisition_id)
        series = acquisition.summary.get("series_numbers") if acquisition else None
        log.info("job %d (acquisition %d, series %s): attempt %d of %d started in %s",
                 job.id, job.acquisition_id,
                 ", ".join("?" if n is None else str(n) for n in series or ()), job.attempts,
                 workers.job_attempts,
                 process.pid if isinstance(process, DaskAttempt) else
                 f"worker process {process.pid}")

    # ------------------------------------------------------------------------------------ results

    def _check(self, run: _Running) -> None:
        """Record the outcome of a child that ended (or ran past its lease). A store error
        while recording leaves the attempt to be recorded at the next pass."""
        code = run.process.poll()
        if code is not None and self._memory_hold == run.job.id:
            self._memory_hold = None  # it ran again (alone): other jobs may start beside it
        if code is None:
            expires = run.job.lease_expires_at
            if expires is not None and self.clock() > expires:
                self._kill(run.process)
                del self._running[run.job.id]
                if self._memory_hold == run.job.id:
                    self._memory_hold = None
                self._fail(run.job, f"timed out: still running after workers.lease_s "
                                    f"({self.settings.workers.lease_s:g} s); the worker was "
                                    "killed")
            return
        seconds = time.monotonic() - run.started
        outcome = _read_result(run.result_path)
        if outcome is not None and outcome.get("ok") is True and code == 0:
            try:
                records = self._outputs(run)
            except Exception as exc:  # e.g. the disk is full: fail the attempt, not the pool
                log.exception("job %d: cannot move the results into the outbox", run.job.id)
                del self._running[run.job.id]
                self._fail(run.job, f"cannot move the results into the outbox: "
                                    f"{type(exc).__name__}: {exc}")
                return
            destinations = [d.name for d in self.settings.destinations]
            # raises when the store cannot take it: the run stays, checked again next pass
            finished = self.store.finish_job(run.job.id, self.owner, outcome.get("result") or {},
                                             self.clock(), outbox=records,
                                             destinations=destinations)
            del self._running[run.job.id]
            if finished:
                log.info("job %d done in %.1f s (attempt %d)%s", run.job.id, seconds,
                         run.job.attempts,
                         f"; {len(records)} derived instances in the outbox, queued for "
                         f"{len(destinations)} destination(s)" if records else "")
                shutil.rmtree(Path(run.spec.derived_dir), ignore_errors=True)
                if records and self.on_results is not None:
                    self.on_results()
            else:
                log.warning("job %d finished but its lease was gone; result dropped",
                            run.job.id)
            return
        del self._running[run.job.id]
        final = False
        if outcome is not None and outcome.get("ok") is False:
            error = str(outcome.get("error") or "failed without a message")
            final = outcome.get("final") is True
            if (outcome.get("resource") == SYSTEM_MEMORY and not final
                    and self._hold_for_memory(run, error)):
                return
        elif -code in _STOP_SIGNALS and (self._stopped.get(run.job.id, 0)
                                         < self.settings.workers.job_attempts):
            # not the job's fault: e.g. systemd stopping the node signals every process of
            # its control group, children included, before the pool is told to stop (but
            # never forever: past job_attempts such stops, they count)
            self._stopped[run.job.id] = self._stopped.get(run.job.id, 0) + 1
            self._release(run.job, f"the worker process was stopped by {_signal_name(-code)} "
                                   "from outside the node (e.g. the service manager stopping "
                                   "it); queued again")
            return
        elif code < 0:
            error = f"the worker process was killed by {_signal_name(-code)}"
            if -code == signal.SIGKILL:
                if self._hold_for_memory(run, error):
                    return
                error += (" (the system may have run out of memory; the memory budget is "
                          f"{self.settings.workers.memory_budget_mb} MiB)")
        elif isinstance(run.process, DaskAttempt) and run.process.failure:
            error = run.process.failure
        else:
            error = f"the worker process exited with status {code} without a result"
        self._fail(run.job, error, final)

    def _outputs(self, run: _Running) -> list[OutboxRecord]:
        """Write the attempt's derived files into the outbox (durably); their records."""
        paths = job_outputs(Path(run.spec.work_dir))
        return self.outbox.import_files(paths, job_id=run.job.id, now=self.clock())

    # ------------------------------------------------------------------ the machine's memory

    def _hold_for_memory(self, run: _Running, error: str) -> bool:
        """Hand the job of a child that the system killed (or that ran out of the machine's
        memory) while other jobs ran beside it back, uncounted, and run one job at a time
        until it has run again; False when it ran alone or was handed back for this
        :data:`MEMORY_RELEASES` times already (the attempt counts then)."""
        released = self._memory_releases.get(run.job.id, 0)
        if run.beside == 0 or released >= MEMORY_RELEASES:
            return False
        self._memory_releases[run.job.id] = released + 1
        if self._memory_hold is None:
            log.warning("worker pool: job %d ended (%s) while %d other job%s ran, the machine "
                        "may be out of memory: one job at a time until it has run again",
                        run.job.id, error, run.beside, "" if run.beside == 1 else "s")
        self._memory_hold = run.job.id
        self._release(run.job, f"{error} while {run.beside} other job"
                               f"{'' if run.beside == 1 else 's'} ran (the system may have run "
                               "out of memory); not counted: the job runs again alone")
        return True

    def _memory_back(self) -> bool:
        """Whether more than one child may run: no job waits to run again alone (a held job
        that is no longer queued here, e.g. retried or cancelled, lifts the hold)."""
        held = self._memory_hold
        if held is None or held in self._running:
            return held is None
        try:
            job = self.store.job(held)
        except Exception:  # the store is busy: keep the hold until it answers
            return False
        if job is None or job.state != "queued":
            self._memory_hold = None
        return self._memory_hold is None

    # ---------------------------------------------------------------------------- a full disk

    def _state_dir_space(self) -> tuple[int, int]:
        usage = shutil.disk_usage(self.settings.paths.state_dir)
        return usage.free, usage.total

    def _disk_full(self, error: str) -> bool:
        """Whether a failed attempt is the disk's fault: its error says so, or the state
        directory's free space is under the floor now."""
        if any(text in error for text in _DISK_FULL):
            return True
        floor = self.settings.listener.min_free_disk_mb * MIB
        try:
            return floor > 0 and self._disk_space()[0] < floor
        except OSError:
            return False

    def _hold_for_disk(self, job: JobRecord, error: str) -> bool:
        """Hand ``job`` back for a full disk and hold the pool until space comes back; False
        when the job was handed back for it too often already (the attempt counts then)."""
        released = self._disk_releases.get(job.id, 0)
        if released >= DISK_RELEASES:
            return False
        try:
            free, total = self._disk_space()
        except OSError:
            free, total = 0, 0
        floor = self.settings.listener.min_free_disk_mb * MIB
        needed = max(floor, free + min(64 * MIB, total // 10))
        self._release(job, f"the disk is full ({error}); not counted: the job runs again when "
                           f"{needed // MIB} MiB are free")
        self._disk_releases[job.id] = released + 1
        if self._disk_hold is None:
            log.warning("worker pool: the disk of %s is full (%d MiB free): no job starts "
                        "until %d MiB are free", self.settings.paths.state_dir, free // MIB,
                        needed // MIB)
        self._disk_hold = max(needed, self._disk_hold or 0)
        return True

    def _disk_back(self) -> bool:
        """Whether jobs may start: no hold, or the free space reached what the hold needs (the
        floor, and at least ``min(64 MiB, a tenth of the disk)`` more than when it filled)."""
        if self._disk_hold is None:
            return True
        try:
            free = self._disk_space()[0]
        except OSError:
            return False
        if free < self._disk_hold:
            return False
        log.info("worker pool: %d MiB free again: jobs start again", free // MIB)
        self._disk_hold = None
        return True

    def _fail(self, job: JobRecord, error: str, final: bool = False) -> None:
        """Fail the attempt: queued again while attempts are left, unless ``final`` (the error
        comes from the input or the job itself, so another attempt would fail the same way).
        A full disk hands the job back instead (see the module docstring)."""
        if not final and self._disk_full(error) and self._hold_for_disk(job, error):
            return
        final = final or job.id in self._final
        attempts = self.settings.workers.job_attempts
        if final:
            attempts = min(attempts, max(job.attempts, 1))
        try:
            after = self.store.fail_job_attempt(job.id, self.owner, error, attempts,
                                                self.clock())
        except Exception:  # the store is busy or the disk full: recorded at the next pass
            self._unrecorded[job.id] = (job, error, False)
            if final:
                self._final.add(job.id)
            raise
        self._final.discard(job.id)
        if after is None:
            log.warning("job %d: attempt failed (%s) but its lease was gone", job.id, error)
        elif after.state == "failed" and final and after.attempts < (
                self.settings.workers.job_attempts):
            log.error("job %d failed (not retried: the error comes from its input, and "
                      "another attempt would fail the same way): %s", job.id, error)
        elif after.state == "failed":
            log.error("job %d failed after %d attempt%s: %s", job.id, after.attempts,
                      "" if after.attempts == 1 else "s", error)
        else:
            log.warning("job %d: attempt %d of %d failed, queued again: %s", job.id,
                        after.attempts, attempts, error)
            self._wake.set()

    def _release(self, job: JobRecord, note: str) -> None:
        """Hand a job back to the queue without counting the attempt (not the job's fault)."""
        try:
            released = self.store.release_job(job.id, self.owner, note, self.clock())
        except Exception:  # the store is busy or the disk full: recorded at the next pass
            self._unrecorded[job.id] = (job, note, True)
            raise
        if released:
            log.warning("job %d: attempt %d not counted: %s", job.id, job.attempts, note)
            self._wake.set()

    # ----------------------------------------------------------------------------------- stopping

    def _dask_client(self) -> Any:
        """The Dask client of ``workers.scheduler``, made once.

        Raises:
            OSError: the scheduler cannot be reached.
        """
        from qsmnode.node.dask_backend import connect

        if self._dask is None:
            address = str(self.settings.workers.scheduler)
            self._dask = connect(address)
            log.info("worker pool: job attempts run on the Dask cluster at %s", address)
        return self._dask

    @staticmethod
    def _kill(process: subprocess.Popen[bytes] | DaskAttempt, grace_s: float = 0.0) -> None:
        """End a child and its process group: SIGTERM, ``grace_s``, then SIGKILL."""
        WorkerPool._kill_all([process], grace_s)

    @staticmethod
    def _kill_all(processes: Sequence[subprocess.Popen[bytes] | DaskAttempt],
                  grace_s: float = 0.0) -> None:
        """End children and their process groups: SIGTERM to all, then at most ``grace_s``
        in all (not each) before SIGKILL to those left."""
        if grace_s > 0:
            live = [p for p in processes if p.poll() is None]
            for process in live:
                _signal_group(process, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for process in live:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.poll() is None:
                _signal_group(process, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=None if isinstance(process, subprocess.Popen) else 30)

    def _shutdown(self) -> None:
        runs = list(self._running.values())
        self._running.clear()
        self._kill_all([run.process for run in runs], _TERMINATE_GRACE_S)
        if self._dask is not None:
            with contextlib.suppress(Exception):
                self._dask.close()
            self._dask = None
        for run in runs:  # every child is gone first, whatever the store does now
            try:
                released = self.store.release_job(
                    run.job.id, self.owner, "interrupted by a node shutdown; queued again",
                    self.clock())
            except Exception:  # left running: the next start hands it back
                log.exception("job %d: cannot hand it back to the queue", run.job.id)
                continue
            if released:
                log.info("job %d: interrupted by the shutdown, queued again", run.job.id)
        for job, error, release in list(self._unrecorded.values()):
            try:
                (self._release if release else self._fail)(job, error)
            except Exception:  # left running: the next start hands it back
                log.exception("job %d: cannot record the end of its attempt", job.id)
        self._unrecorded.clear()


def _signal_group(process: subprocess.Popen[bytes] | DaskAttempt, number: int) -> None:
    """Send a signal to a child's process group (a Dask attempt's, through its task)."""
    if isinstance(process, DaskAttempt):
        process.send_group_signal(number)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, number)


def attempt_ended_well(state_dir: Path, job_id: int, attempt: int) -> bool:
    """Whether an attempt's child wrote an ok result (for a node that died before handing it
    over: :meth:`~qsmnode.node.store.Store.requeue_orphaned_jobs`)."""
    outcome = _read_result(attempt_dir(state_dir, job_id, attempt) / RESULT_FILENAME)
    return outcome is not None and outcome.get("ok") is True


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


if __name__ == "__main__":  # the child's command: python -m qsmnode.node.worker
    from qsmnode.node.worker_child import main

    raise SystemExit(main())
