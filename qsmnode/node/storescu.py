"""A C-STORE SCU for files on disk, as a scanner sends them (the simulator and the demo use it):
:func:`qsmnode.node.association.send_over_association` with each file's SOP class and
transfer syntax read from its file meta.

A lost association (the peer aborted, the network dropped, a response never came) does not end
the send: the SCU associates again and resumes from the first file not acknowledged, at most
``reassociations`` times, waiting a little longer before each. A file acknowledged with any
status is never sent again; the one that was out when the association was lost is (the peer
may have stored it: a resend of the same SOP Instance UID is harmless). What could still not be
stored is reported file by file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from qsmnode.node.association import (
    AssociationFailed,
    FileOutcome,
    OutgoingFile,
    Peer,
    is_success,
    send_over_association,
)


class SendError(RuntimeError):
    """The peer could not be reached or refused the association; names the peer and why."""


@dataclass
class StoreReport:
    """Per-file outcome of a send: DIMSE status, or the reason nothing was sent."""

    statuses: dict[Path, int] = field(default_factory=dict)
    errors: dict[Path, str] = field(default_factory=dict)
    associations: int = 0
    """How many associations the send took (1 when none was lost)."""

    @property
    def ok(self) -> bool:
        return not self.errors and all(is_success(s) for s in self.statuses.values())


REASSOCIATIONS = 3
"""How many times a send associates again after a lost association."""


def _association_lost(outcome: object) -> bool:
    """Whether a file's outcome says the association was lost before it was acknowledged."""
    return (getattr(outcome, "status", None) is None and not getattr(outcome, "lost", False)
            and (getattr(outcome, "suspect", False)
                 or "association was lost" in str(getattr(outcome, "error", ""))))


def send_paths(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "QSMNODE",
    timeout_s: float = 30.0,
    on_sent: Callable[[int, int], None] | None = None,
    reassociations: int = REASSOCIATIONS,
    retry_delay_s: float = 1.0,
) -> StoreReport:
    """Send files with a presentation context per SOP class sent; the datasets go out as they
    are stored. ``on_sent(done, total)`` is called after each acknowledged file. A lost
    association is resumed on a new one (see the module docstring): ``reassociations`` times at
    most, after ``retry_delay_s``, then twice that, and so on.

    Raises:
        SendError: no first association (the peer is unreachable or refused it).
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
        outcomes, report.associations = send_resuming(
            peer, outgoing, timeout_s, on_sent, reassociations, retry_delay_s)
    except AssociationFailed as exc:
        raise SendError(str(exc)) from None
    for item in outgoing:
        outcome = outcomes.get(item.key)
        if outcome is not None and outcome.status is not None:
            report.statuses[item.path] = outcome.status
        else:
            report.errors[item.path] = outcome.error if outcome else "not sent"
    return report


def send_resuming(peer: Peer, outgoing: Sequence[OutgoingFile], timeout_s: float = 30.0,
                  on_sent: Callable[[int, int], None] | None = None,
                  reassociations: int = REASSOCIATIONS, retry_delay_s: float = 1.0,
                  ) -> tuple[dict[Any, Any], int]:
    """:func:`qsmnode.node.association.send_over_association`, resumed on a new association
    when one is lost (see the module docstring). Returns the outcome per key and how many
    associations it took.

    Raises:
        AssociationFailed: no first association.
    """
    total = len(outgoing)
    acknowledged = 0

    def sent(_done: int, _total: int) -> None:
        nonlocal acknowledged
        acknowledged += 1
        if on_sent is not None:
            on_sent(acknowledged, total)

    remaining = list(outgoing)
    outcomes: dict[Any, Any] = {}
    associations = 0
    for attempt in range(reassociations + 1):
        if attempt:
            time.sleep(retry_delay_s * 2 ** (attempt - 1))
        try:
            associations += 1
            outcomes.update(send_over_association(peer, remaining, timeout_s, on_sent=sent))
        except AssociationFailed as exc:
            if attempt == 0:
                raise
            for item in remaining:  # the earlier outcome (lost) is kept, with why not again
                previous = outcomes.get(item.key)
                why = previous.error if previous else "not sent"
                outcomes[item.key] = FileOutcome(
                    error=f"{why}; associating again failed: {exc}")
            break
        remaining = [item for item in remaining if _association_lost(outcomes.get(item.key))]
        if not remaining:
            break
    if remaining and associations > 1:
        for item in remaining:
            outcome = outcomes[item.key]
            outcomes[item.key] = FileOutcome(
                error=f"{outcome.error} (after {associations} associations)")
    return outcomes, associations

