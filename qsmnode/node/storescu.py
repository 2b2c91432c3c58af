"""A C-STORE SCU for files on disk, as a scanner sends them (the simulator and the demo use it):
:func:`qsmnode.node.sender.send_files` with each file's SOP class and transfer syntax read from
its file meta."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from qsmnode.node.sender import AssociationFailed, OutgoingFile, Peer, is_success
from qsmnode.node.sender import send_files as send_outgoing


class StoreError(RuntimeError):
    """The peer could not be reached or refused the association; names the peer and why."""


@dataclass
class StoreReport:
    """Per-file outcome of a send: DIMSE status, or the reason nothing was sent."""

    statuses: dict[Path, int] = field(default_factory=dict)
    errors: dict[Path, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and all(is_success(s) for s in self.statuses.values())


def send_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "QSMNODE",
    timeout_s: float = 30.0,
    on_sent: Callable[[int, int], None] | None = None,
) -> StoreReport:
    """Send files over one association, with a presentation context per SOP class sent; the
    datasets go out as they are stored. ``on_sent(done, total)`` is called after each one.

    Raises:
        StoreError: no association (the peer is unreachable or refused it).
    """
    report = StoreReport()
    outgoing = []
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            outgoing.append(OutgoingFile(path, Path(path), str(meta.MediaStorageSOPClassUID),
                                         str(meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError) as exc:
            report.errors[Path(path)] = f"not a DICOM file: {exc}"
    if not outgoing:
        return report
    peer = Peer(called_ae, called_ae, host, port, calling_ae)
    try:
        outcomes = send_outgoing(peer, outgoing, timeout_s, on_sent=on_sent)
    except AssociationFailed as exc:
        raise StoreError(str(exc)) from None
    for item in outgoing:
        outcome = outcomes.get(item.key)
        if outcome is not None and outcome.status is not None:
            report.statuses[item.path] = outcome.status
        else:
            report.errors[item.path] = outcome.error if outcome else "not sent"
    return report
