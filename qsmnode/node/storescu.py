"""A C-STORE SCU: send DICOM files to a peer over one association, as a scanner does."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The peer could not be reached or refused the association; names the peer and why."""


@dataclass
class StoreReport:
    """Per-file outcome of a send: DIMSE status, or the reason nothing was sent."""

    statuses: dict[Path, int] = field(default_factory=dict)
    errors: dict[Path, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and all(s == 0 for s in self.statuses.values())


def _no_delay(event: Any) -> None:
    """One PDU per C-STORE: without TCP_NODELAY each waits for the peer's delayed ACK."""
    with contextlib.suppress(AttributeError, OSError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "QSMNODE",
    timeout_s: float = 30.0,
    on_sent: Callable[[int, int], None] | None = None,
) -> StoreReport:
    """Send files over one association, with a presentation context per SOP class sent.

    The files are read only for their SOP Class and transfer syntax; the datasets go out as
    they are stored. ``on_sent(done, total)`` is called after each instance.
    """
    report = StoreReport()
    contexts: dict[str, set[str]] = {}
    datasets = []
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=False)
            sop_class = str(ds.SOPClassUID)
            syntax = str(ds.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, OSError) as exc:
            report.errors[path] = f"not a DICOM file: {exc}"
            continue
        contexts.setdefault(sop_class, set()).add(syntax)
        datasets.append((path, ds))
    if not datasets:
        return report
    if len(contexts) > 128:
        raise StoreError(f"{len(contexts)} SOP classes: more than one association can carry")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.requested_contexts = [build_context(c, sorted(s)) for c, s in contexts.items()]
    assoc = ae.associate(host, port, ae_title=called_ae,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise StoreError(f"association with {called_ae}@{host}:{port} {reason}")
    try:
        for done, (path, ds) in enumerate(datasets, start=1):
            status = assoc.send_c_store(ds)
            if on_sent is not None:
                on_sent(done, len(datasets))
            if "Status" in status:
                report.statuses[path] = int(status.Status)
            else:
                report.errors[path] = "no response (connection lost or timed out)"
    finally:
        assoc.release()
    return report
