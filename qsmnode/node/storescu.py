"""A C-STORE SCU: send DICOM files to a peer over one association, as a scanner does."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
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


def send_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "QSMNODE",
    timeout_s: float = 30.0,
) -> StoreReport:
    """Send files over one association, with a presentation context per SOP class sent.

    The files are read only for their SOP Class and transfer syntax; the datasets go out as
    they are stored.
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
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise StoreError(f"association with {called_ae}@{host}:{port} {reason}")
    try:
        for path, ds in datasets:
            status = assoc.send_c_store(ds)
            if "Status" in status:
                report.statuses[path] = int(status.Status)
            else:
                report.errors[path] = "no response (connection lost or timed out)"
    finally:
        assoc.release()
    return report
