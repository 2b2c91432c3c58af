"""The participant level on Dask distributed: one task per acquisition.

By default an embedded ``LocalCluster`` (worker processes, one thread each, as many as the
machine has cores or the cohort has acquisitions, whichever is fewer; memory per worker from
``memory_limit``). The cores are shared out: each worker's FFTs use cores ÷ workers threads
(``QSMNODE_FFT_WORKERS`` in the worker's environment, unless the caller set it), so two workers
on two cores do not each start two FFT threads and fight for the same cores; Dask's nanny
already sets the BLAS/OpenMP threads of its workers to one.

With a scheduler address (``tcp://host:8786``) the tasks go to an existing cluster instead:
its workers must have qsmnode installed and see the dataset and OUTPUT_DIR at the same paths
(shared storage). On SLURM or PBS, ``dask-jobqueue`` starts such a cluster
(see the README).

Each task writes its outputs and then its record (``derivatives``), so a re-run skips what is
finished. A task that fails, or whose worker dies more often than the scheduler allows
(``distributed.scheduler.allowed-failures``), is recorded as failed and reported by name; the
other acquisitions go on. A worker lost mid-task is not a failure: the scheduler runs the task
again on another worker, and the atomic writes make the second run replace the first's files.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsmnode.bids.derivatives import (
    Options,
    derivatives_root,
    fingerprint,
    is_finished,
    prepare,
    process_acquisition,
    record_path,
    write_json,
)
from qsmnode.bids.layout import Layout, MegreAcquisition

CONNECT_TIMEOUT_S = 10.0
"""How long to try to reach a scheduler before saying it cannot be reached."""


WORKER_WAIT_S = 60.0
"""How long to wait for a scheduler's first worker before saying it has none."""


class ClusterError(RuntimeError):
    """The Dask cluster cannot be started or reached; the message names the address."""


@dataclass
class CohortReport:
    """What the participant level did, by acquisition name."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    cluster: str = ""


def default_workers(n_tasks: int) -> int:
    """Workers of the embedded cluster: the cores this process may use, at most one per task."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, n_tasks))


def fft_threads_per_worker(n_workers: int) -> int:
    """FFT threads for each worker of an embedded cluster of ``n_workers``: the cores this
    process may use divided among the workers (at least one)."""
    return max(1, default_workers(10**6) // max(1, n_workers))


def worker_environment(n_workers: int) -> dict[str, str]:
    """The environment an embedded cluster's worker processes get: ``QSMNODE_FFT_WORKERS``
    from :func:`fft_threads_per_worker`, or the caller's own setting when it has one."""
    threads = os.environ.get("QSMNODE_FFT_WORKERS") or str(fft_threads_per_worker(n_workers))
    return {"QSMNODE_FFT_WORKERS": threads}


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """``|#####-----|`` for ``done`` of ``total``: the progress line's bar."""
    filled = round(width * done / total) if total else width
    return f"|{'#' * filled}{'-' * (width - filled)}|"


@contextmanager
def dask_client(scheduler: str | None, n_workers: int, memory_limit: str | None,
                worker_wait_s: float = WORKER_WAIT_S) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` (once it has a worker, waiting at most
    ``worker_wait_s``), or to a new ``LocalCluster`` closed on exit.

    Raises:
        ClusterError: the scheduler cannot be reached, or the local cluster cannot start.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        try:
            try:
                client.wait_for_workers(1, timeout=worker_wait_s)
            except (TimeoutError, OSError) as exc:
                raise ClusterError(f"the Dask scheduler at {scheduler} has no workers (none "
                                   f"joined within {worker_wait_s:g} s)") from exc
            yield client
        finally:
            client.close()
        return
    try:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               memory_limit=memory_limit or "auto", dashboard_address=None,
                               silence_logs=logging.ERROR, env=worker_environment(n_workers))
    except (OSError, ValueError, TypeError) as exc:
        raise ClusterError(f"cannot start a local Dask cluster of {n_workers} worker(s): "
                           f"{exc}") from None
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def run_participants(layout: Layout, output_dir: Path, options: Options,
                     scheduler: str | None = None, n_workers: int | None = None,
                     memory_limit: str | None = None,
                     say: Callable[[str], None] = print,
                     worker_wait_s: float = WORKER_WAIT_S) -> CohortReport:
    """Process every acquisition of ``layout`` not finished yet, one Dask task each.

    ``say`` gets a line per finished acquisition (``[k/n] name: done in s``), the progress of
    a long run.

    Raises:
        ClusterError: the cluster cannot be reached or started (nothing was processed).
    """
    from distributed import as_completed

    root = derivatives_root(output_dir)
    report = CohortReport()
    todo: list[MegreAcquisition] = []
    for acquisition in layout.acquisitions:
        if is_finished(root, acquisition, options):
            report.skipped.append(acquisition.name)
        else:
            todo.append(acquisition)
    if report.skipped:
        say(f"{len(report.skipped)} acquisition(s) already finished, skipped: "
            f"{', '.join(report.skipped)}")
    if not todo:
        prepare(output_dir, options, layout.root)
        return report
    workers = n_workers or default_workers(len(todo))
    with dask_client(scheduler, workers, memory_limit, worker_wait_s) as client:
        prepare(output_dir, options, layout.root)  # once the cluster is there
        report.cluster = scheduler or f"a local Dask cluster of {workers} worker(s)"
        say(f"processing {len(todo)} acquisition(s) on {report.cluster}")
        started = time.perf_counter()
        futures = {
            client.submit(process_acquisition, acquisition, layout.root, output_dir, options,
                          key=f"qsmnode-{acquisition.name}-{uuid.uuid4().hex[:8]}"): acquisition
            for acquisition in todo
        }
        for n, future in enumerate(as_completed(futures), start=1):
            acquisition = futures[future]
            try:
                record = future.result()
            except Exception as exc:  # the task never returned (e.g. its workers kept dying)
                record = {"acquisition": acquisition.name, "subject": acquisition.subject,
                          "session": acquisition.session,
                          "entities": dict(acquisition.entities),
                          "fingerprint": fingerprint(acquisition, options), "status": "failed",
                          "error": f"{acquisition.name}: the task did not complete on the "
                                   f"cluster ({type(exc).__name__}: {exc})"}
                write_json(record_path(root, acquisition), record)
            elapsed = time.perf_counter() - started
            eta = elapsed / n * (len(todo) - n)
            bar = progress_bar(n, len(todo))
            if record.get("status") == "done":
                report.done.append(acquisition.name)
                m1_error = (record.get("m1") or {}).get("error")
                note = f"; {m1_error}" if m1_error else ""
                say(f"{bar} [{n}/{len(todo)}] {acquisition.name}: done in "
                    f"{record.get('seconds', 0):.1f} s{note} ({elapsed:.1f} s elapsed, "
                    f"about {eta:.0f} s to go)")
            else:
                report.failed[acquisition.name] = str(record.get("error"))
                say(f"{bar} [{n}/{len(todo)}] {acquisition.name}: FAILED: "
                    f"{record.get('error')}")
    return report


__all__ = ["ClusterError", "CohortReport", "dask_client", "derivatives_root",
           "run_participants"]
