"""The worker child: one job attempt in its own process (started by
:class:`~qsmnode.node.worker.WorkerPool` as ``python -m qsmnode.node.worker``).

The child (:func:`main`) is a fresh interpreter, so a crash or out-of-memory in numerical code
can never take the listener down. It

- sets ``RLIMIT_AS`` to the address space it already uses (interpreter and libraries) plus
  ``workers.memory_budget_mb``, so a job that needs more gets a ``MemoryError`` (reported as
  "out of memory") instead of pushing the machine into swap or the OOM killer;
- exits at once if the node dies (it watches its parent), so an orphan never keeps running a
  job that the restarted node will run again;
- runs the job function (``module:function``, default
  :data:`~qsmnode.node.jobs.DEFAULT_JOB_FUNCTION`) and writes ``{"ok": true, "result": ...}``
  or ``{"ok": false, "error": ...}`` to ``result.json`` (temporary name, then rename).

The child never opens the store. Its log lines go to the node's stderr, tagged with the job.

Its exit status: 0 done, :data:`EXIT_FAILED`, :data:`EXIT_OUT_OF_MEMORY`, or
:data:`EXIT_ORPHANED` (the node was gone); the outcome itself is in ``result.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qsmnode.node import logtext
from qsmnode.node.jobs import DEFAULT_JOB_FUNCTION, JobError, JobSpec
from qsmnode.node.redact import NO_REDACTION, Redactor, dataset_values

log = logging.getLogger("qsmnode.node.worker")  # the worker's log lines, as the pool's are

EXIT_FAILED = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_ORPHANED = 70
_POLL_S = 0.2
MIB = 1024 * 1024
SYSTEM_MEMORY = "system-memory"
"""The ``resource`` a child's result names for a ``MemoryError`` not due to its budget."""


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the node that started us is gone (we were re-parented)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(EXIT_ORPHANED)
        time.sleep(_POLL_S)


def _address_space_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def limit_memory(budget_mb: int) -> int | None:
    """Cap this process's address space at what it uses now plus ``budget_mb``; return the
    limit in bytes (None when it cannot be set)."""
    current = _address_space_bytes() or 0
    limit = current + budget_mb * MIB
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        return None
    return limit


def resolve_job_function(name: str) -> Callable[[JobSpec], dict[str, Any]]:
    """The function named ``module:function``."""
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"job function {name!r}: expected module:function")
    function = getattr(importlib.import_module(module_name), attribute)
    if not callable(function):
        raise ValueError(f"job function {name!r} is not callable")
    return function  # type: ignore[no-any-return]


def _write_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


_redact: Redactor = NO_REDACTION
"""The child's redaction of its acquisition's patient and study values (set in :func:`main`)."""


def _write_result(path: Path, outcome: dict[str, Any]) -> None:
    if isinstance(outcome.get("error"), str):  # error text never quotes a patient's values
        outcome = {**outcome, "error": _redact(outcome["error"])}
    _write_text(path, json.dumps(outcome))


def main(argv: Sequence[str] | None = None) -> int:
    """The child: run one job attempt (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m qsmnode.node.worker",
                                     description="Run one job attempt (started by the node).")
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--job-function", default=DEFAULT_JOB_FUNCTION)
    parser.add_argument("--memory-budget-mb", type=int, default=8192)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    spec = JobSpec.from_json(args.spec.read_text())
    logtext.configure(
        sys.stderr, args.log_level,
        f"%(asctime)s %(levelname)s worker[job {spec.job_id}.{spec.attempt} "
        f"pid {os.getpid()}] %(name)s: %(message)s",
    )
    global _redact
    _redact = Redactor(dataset_values([*spec.files, *spec.t1w_files]))
    logtext.set_redactor(_redact)
    for name in ("pydicom", "pynetdicom", "highdicom"):  # their chatter can quote datasets
        logging.getLogger(name).setLevel(max(logging.getLogger().level, logging.WARNING))
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), name="watch-parent",
                         daemon=True).start()
    try:
        function = resolve_job_function(args.job_function)
        from qsmnode import compat

        compat.check_versions()
        compat.install()  # the start-up of python -m qsmnode: this child is started on its own
        import pydicom.config

        import qsmnode.dicom.load
        import qsmnode.pipeline  # noqa: F401  (loaded before the memory limit applies)

        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    except Exception as exc:
        log.exception("cannot start the job")
        _write_result(args.result, {"ok": False, "error": f"cannot start the job: {exc}"})
        return EXIT_FAILED
    limit = limit_memory(args.memory_budget_mb)
    if limit is None:
        log.warning("could not set the memory limit (budget %d MiB)", args.memory_budget_mb)
    started = time.perf_counter()
    try:
        result = function(spec)
        text = json.dumps({"ok": True, "result": result})
    except MemoryError as exc:
        detail = f" ({exc})" if str(exc) else ""
        if limit is None:  # no budget applied: the machine itself ran out
            error = f"out of memory: the machine had no more memory for the job{detail}"
            outcome = {"ok": False, "final": False, "resource": SYSTEM_MEMORY, "error": error}
        else:  # the same input needs the same memory: another attempt would fail the same way
            error = (f"out of memory: the job needed more than the memory budget of "
                     f"{args.memory_budget_mb} MiB (workers.memory_budget_mb){detail}; not "
                     "retried: raise workers.memory_budget_mb, then retry the job")
            outcome = {"ok": False, "final": True, "error": error}
        log.error("%s", error)
        _write_result(args.result, outcome)
        return EXIT_OUT_OF_MEMORY
    except JobError as exc:
        log.error("job failed: %s", exc)
        _write_result(args.result, {"ok": False, "error": str(exc), "final": not exc.transient})
        return EXIT_FAILED
    except OSError as exc:  # disk full, an I/O error: may pass, so the attempt may be retried
        log.exception("job failed")
        _write_result(args.result, {"ok": False, "final": False,
                                    "error": f"input/output error: {type(exc).__name__}: {exc}"})
        return EXIT_FAILED
    except Exception as exc:  # the same input gives the same error: not retried
        log.exception("job failed")
        _write_result(args.result, {"ok": False, "final": True,
                                    "error": f"the job function failed: {type(exc).__name__}: "
                                             f"{exc}"})
        return EXIT_FAILED
    _write_text(args.result, text)
    log.info("job done in %.2f s", time.perf_counter() - started)
    return 0
