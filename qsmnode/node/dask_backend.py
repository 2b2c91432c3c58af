"""Job attempts on a Dask cluster (``[workers] backend = "dask"``): the node's worker pool,
with the cluster's workers in place of local child processes.

The pool (:class:`~qsmnode.node.worker.WorkerPool`) keeps everything it does for the local
backend: it claims a job with its lease, writes the attempt's spec, reads the attempt's
``result.json``, moves the derived files into the outbox and records the outcome in one store
transaction (so delivery stays exactly once), fails or hands back attempts by the same rules.
Only where the attempt's child runs changes: a task on a Dask worker (:func:`run_attempt`)
starts there the same ``python -m qsmnode.node.worker`` command, with the worker's Python, and
waits for it. So the child keeps its memory limit (``workers.memory_budget_mb``), its watch on
its parent (the Dask worker: a worker that dies takes its child with it) and its result file.
:class:`DaskAttempt` is what the pool holds for it: it answers like the part of
:class:`subprocess.Popen` the pool uses (``poll``, ``wait``, signals to the group).

The state directory (spool, attempt folders, outbox) must be on storage the Dask workers share
with the node, at the same path. Signals reach the child through a control file in the attempt
folder (the task polls it), since a running Dask task cannot be interrupted from outside. A
worker that dies while running an attempt: Dask runs the task again on another worker (its own
retry of lost tasks), and the new child writes the attempt's result afresh; when Dask gives up
(``KilledWorker``) the attempt fails like a crashed child.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

CONTROL_FILENAME = "signal"
"""In the attempt folder: a signal number for the task to send to its child's group."""
LOST = 75
"""The exit status an attempt gets when Dask lost its task (``failure`` says why)."""
_POLL_S = 0.2
CONNECT_TIMEOUT_S = 5.0
"""How long the pool tries to reach the scheduler before handing the job back (the pool's
thread waits meanwhile)."""


def run_attempt(command: list[str], pythonpath: str, control: str) -> int:
    """The Dask task: run one attempt's child on this worker and return its exit status
    (negative: the signal that ended it). ``command`` is the pool's child command; its Python
    becomes this worker's and its ``--parent-pid`` this worker's pid. ``pythonpath`` goes
    before the worker's own; ``control`` is the control file to obey."""
    command = [sys.executable, *command[1:]]
    if "--parent-pid" in command:
        command[command.index("--parent-pid") + 1] = str(os.getpid())
    if "--result" in command:  # a task run again after a lost worker: no stale result
        Path(command[command.index("--result") + 1]).unlink(missing_ok=True)
    control_path = Path(control)
    control_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               env=env, start_new_session=True)
    while process.poll() is None:
        try:
            number = int(control_path.read_text().strip() or 0)
        except (OSError, ValueError):
            number = 0
        if number:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, number)
            control_path.unlink(missing_ok=True)
        time.sleep(_POLL_S)
    return process.returncode


class DaskAttempt:
    """One attempt running as a Dask task (see the module docstring)."""

    def __init__(self, client: Any, command: list[str], pythonpath: str, work_dir: Path,
                 name: str) -> None:
        self.control = Path(work_dir) / CONTROL_FILENAME
        self.control.unlink(missing_ok=True)
        self.key = f"qsmnode-{name}-{uuid.uuid4().hex[:8]}"
        self.future = client.submit(run_attempt, command, pythonpath, str(self.control),
                                    key=self.key, pure=False)
        self.returncode: int | None = None
        self.failure = ""
        """Why Dask could not run the task (empty when it ran)."""

    @property
    def pid(self) -> str:
        return f"Dask task {self.key}"

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if not self.future.done():
            return None
        if self.future.status == "finished":
            self.returncode = int(self.future.result())
        else:
            try:
                exception = self.future.exception(timeout=5)
            except Exception as exc:  # cancelled, or the scheduler is gone
                exception = exc
            self.failure = f"the Dask cluster could not run the attempt: {exception!r}"[:500]
            self.returncode = LOST
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.key, timeout or 0.0)
            time.sleep(_POLL_S)
        return self.returncode  # type: ignore[return-value]

    def send_group_signal(self, number: int) -> None:
        """Ask the task to signal its child's group (SIGTERM, SIGKILL); when the task is not
        running yet, cancel it."""
        if self.poll() is not None:
            return
        if self.future.status == "pending":
            self.future.cancel()
        with contextlib.suppress(OSError):
            temp = self.control.with_suffix(".tmp")
            temp.write_text(str(int(number)))
            os.replace(temp, self.control)
        if number == signal.SIGKILL and self.future.status != "finished":
            self.future.cancel()


def connect(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """A Dask client of the scheduler at ``address``.

    Raises:
        OSError: the scheduler cannot be reached (the message names the address).
    """
    from distributed import Client

    try:
        return Client(address, timeout=timeout_s, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise OSError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
