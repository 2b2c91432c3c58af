"""The audit log: who sent what when, and what was sent where, one JSON object per line.

An append-only text file (``[audit] log_file``, by default ``<state_dir>/audit.log``), opened
with ``O_APPEND``; each event is one ``write`` of one whole line, so lines from the node's
threads never interleave and a crash leaves at most the last line missing, never half of it.
Lines are not fsynced one by one (the store is the durable record; the audit log is the
readable trail).

Every line has ``time`` (UTC, ISO 8601 with microseconds) and ``event``, then the event's
fields. Events and their fields:

- ``node_started`` / ``node_stopped``: ``version``, ``ae_title``;
- ``association_accepted`` / ``association_rejected``: ``calling_ae``, ``called_ae``,
  ``address`` (``host:port``), and ``reason`` for a rejection;
- ``connection_refused``: a connection closed by the node before or outside the association
  protocol: ``address`` (``host:port``), ``kind`` (``too_large``, ``undecodable``,
  ``bad_ae_title``, ``timeout``, ``reset``, ``truncated``, ``closed`` to make room for a newer
  connection, ``no_request``, ``tls_refused``), ``reason``, ``associated`` (whether it had an
  association);
- ``instance_stored``: ``calling_ae``, ``address``, ``study_uid``, ``series_uid``,
  ``sop_instance_uid``, ``sop_class_uid``, ``bytes``;
- ``series_complete``: ``study_uid``, ``series_uid``, ``instances``, ``completion``;
- ``acquisition_grouped``: ``study_uid``, ``acquisition_id``, ``series_uids``, ``state``
  (``accepted`` or ``ignored``), ``reason``, ``job_id``;
- ``problem_recorded`` / ``problem_resolved``: ``study_uid``, ``problem_id``, ``series_uids``,
  ``reason``;
- ``job_started`` / ``job_done`` / ``job_failed`` / ``job_requeued``: ``job_id``,
  ``acquisition_id``, ``attempt``, and ``derived_instances`` (done) or ``error`` (failed,
  requeued; ``final`` says whether the attempts are used up);
- ``instance_sent`` / ``send_failed``: ``destination``, ``ae_title``, ``peer`` (``host:port``),
  ``study_uid``, ``series_uid``, ``sop_instance_uid``, ``sop_class_uid``, ``attempt``,
  ``status`` (the DIMSE status, when one came back), and ``error``, ``given_up`` (failed);
- ``pruned``: ``study_uid``, ``kind`` (``spool`` or ``outbox``), ``reason`` (``age`` or
  ``emergency``), ``instances``, ``bytes``, ``free_bytes`` (emergency only).

Nothing here reads a dataset: the fields are UIDs, AE titles, addresses, counts and the node's
own messages, so the log carries no patient names or IDs. Writing never raises: a failure is
logged (once until the next success) and the event is lost, never the node's work.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUDIT_FILENAME = "audit.log"
"""The audit log's name in the state directory when ``[audit] log_file`` is not set."""


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class AuditLog:
    """The audit log file (see the module docstring); ``path`` None: a log that drops
    everything (for stores opened by commands, and tests)."""

    def __init__(self, path: Path | None, now: Callable[[], str] = _utc_now) -> None:
        self.path = None if path is None else Path(path)
        self._now = now
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._failing = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def record(self, event: str, **fields: Any) -> None:
        """Append one event line. Never raises."""
        if self._fd is None:
            return
        try:
            line = json.dumps({"time": self._now(), "event": event, **fields},
                              separators=(",", ":"), default=str) + "\n"
            data = line.encode()
            with self._lock:
                if self._fd is None:
                    return
                size = os.fstat(self._fd).st_size  # where this line starts (O_APPEND)
                written = os.write(self._fd, data)
                if written != len(data):  # a full disk: never leave half a line behind
                    os.ftruncate(self._fd, size)
                    raise OSError(f"short write ({written} of {len(data)} bytes)")
            self._failing = False
        except (OSError, TypeError, ValueError) as exc:
            if not self._failing:
                log.error("audit log %s: cannot write (%s); events are lost until it works "
                          "again", self.path, exc)
            self._failing = True

    def association(self, assoc: Any, outcome: str, reason: str | None = None) -> None:
        """``association_accepted`` or ``association_rejected`` for a pynetdicom association
        (the requestor's AE titles and address; ``reason`` for a rejection)."""
        if self._fd is None:
            return
        requestor = getattr(assoc, "requestor", None)
        primitive = getattr(requestor, "primitive", None)
        calling = getattr(primitive, "calling_ae_title", None) or getattr(requestor,
                                                                           "ae_title", "")
        called = getattr(primitive, "called_ae_title", None) or ""
        try:
            address = f"{requestor.address}:{requestor.port}"  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            address = "?"
        fields: dict[str, Any] = {"calling_ae": _text(calling), "called_ae": _text(called),
                                  "address": address}
        if reason is not None:
            fields["reason"] = reason
        self.record(f"association_{outcome}", **fields)

    def connection(self, address: str, kind: str, reason: str, associated: bool = False,
                   ) -> None:
        """``connection_refused``: see the module docstring."""
        self.record("connection_refused", address=address, kind=kind, reason=reason,
                    associated=associated)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _text(value: Any) -> str:
    """An AE title (str or bytes) without padding."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip()


NULL_AUDIT = AuditLog(None)
"""The audit log that records nothing."""
