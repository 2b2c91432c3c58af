"""One association to a DICOM peer: the peer (:class:`Peer`), the files to send and their
outcomes (:class:`OutgoingFile`, :class:`FileOutcome`), and :func:`send_over_association`, C-STORE
of files over one association with one presentation context per SOP class, optionally over TLS.

The node's sender (:mod:`qsmnode.node.sender`) records these outcomes and retries; the
STOW-RS transport (:mod:`qsmnode.node.stow`) has the same contract; the scanner-like SCU of
the simulator and the demo (:mod:`qsmnode.node.storescu`) resumes a lost association.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from qsmnode import compat
from qsmnode.node.config import ClientTLSConfig, DestinationConfig

MAX_CONTEXTS = 128
"""Presentation contexts one association can propose (odd context IDs 1-255)."""
_WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})
"""PS3.7 Annex C warnings besides 0xBxxx (0xB000, 0xB006, 0xB007 for storage): stored."""


@dataclass(frozen=True)
class Peer:
    """Where to send: a configured destination, or one given as ``HOST:PORT:AE``."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "QSMNODE"
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    stow_url: str | None = None
    """DICOMweb STOW-RS instead of C-STORE (:mod:`qsmnode.node.stow`)."""

    @classmethod
    def from_config(cls, destination: DestinationConfig) -> Peer:
        return cls(destination.name, destination.ae_title, destination.host, destination.port,
                   destination.calling_ae_title, destination.tls, destination.stow_url)

    @classmethod
    def parse(cls, text: str, destinations: Sequence[DestinationConfig] = (),
              calling_ae_title: str = "QSMNODE") -> Peer:
        """A configured destination by name, else ``HOST:PORT:AE``.

        Raises:
            ValueError: neither (the message lists the configured names).
        """
        for destination in destinations:
            if destination.name == text:
                return cls.from_config(destination)
        host, _, rest = text.rpartition(":")
        host, _, port = host.rpartition(":")
        ae = rest
        if host and port.isdigit() and 0 < int(port) < 65536 and 0 < len(ae.strip()) <= 16:
            return cls(text, ae, host.strip("[]"), int(port), calling_ae_title)
        names = ", ".join(d.name for d in destinations) or "none configured"
        raise ValueError(f"{text!r}: not a configured destination ({names}) nor HOST:PORT:AE")

    def __str__(self) -> str:
        if self.stow_url:
            return f"{self.name} (STOW-RS {self.stow_url})"
        return (f"{self.name} ({self.ae_title}@{self.host}:{self.port}"
                f"{', TLS' if self.tls.enabled else ''})")


def client_ssl_context(tls: ClientTLSConfig) -> ssl.SSLContext | None:
    """The TLS context towards a destination (None when TLS is off): the server is verified
    against ``ca_file`` (else the system's CAs) and its host name; ``cert_file`` and
    ``key_file`` give the node a client certificate."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=None if tls.ca_file is None else str(tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def describe_status(status: int) -> str:
    """``0xA700 (Refused: Out of Resources)``."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown status"))[1]
    return f"0x{status:04X} ({meaning})"


DUPLICATE_SOP_INSTANCE = 0x0111
"""A failure status that some archives answer to a C-STORE of an instance they already hold."""


def is_success(status: int) -> bool:
    """Success or a warning (PS3.7 Annex C: 0x0001, 0x0107, 0x0116, 0xBxxx): the peer
    stored the object; or 0x0111 (Duplicate SOP Instance): it holds it already, and since the
    node's UIDs are deterministic (the same source and version give the same object), that is
    this object. Retrying it would never end."""
    return (status in (0, DUPLICATE_SOP_INSTANCE) or status in _WARNING_STATUSES
            or 0xB000 <= status <= 0xBFFF)


_RESULTS = {1: "permanent", 2: "transient"}
_SOURCES = {1: "service user", 2: "service provider (ACSE)",
            3: "service provider (presentation)"}


def describe_rejection(primitive: Any) -> str:
    """An A-ASSOCIATE-RJ in words: the reason, then whether it is permanent and who said so,
    then the raw result/source/diagnostic values."""
    result, source, diagnostic = (getattr(primitive, name, None)
                                  for name in ("result", "result_source", "diagnostic"))
    try:
        reason = str(primitive.reason_str)
    except Exception:  # an invalid source/diagnostic pair
        reason = "(no reason available)"
    if reason and reason[0].isupper() and not reason[:2].isupper():
        reason = reason[0].lower() + reason[1:]
    return (f"{reason} ({_RESULTS.get(result, '?')} rejection by the "
            f"{_SOURCES.get(source, '?')}; result {result}, source {source}, "
            f"diagnostic {diagnostic})")


class AssociationFailed(RuntimeError):
    """No association: refused (``rejected`` set), aborted, or no connection. The message
    names the peer and says why."""

    def __init__(self, message: str, rejected: bool = False) -> None:
        super().__init__(message)
        self.rejected = rejected


@dataclass(frozen=True)
class OutgoingFile:
    """One file to send, with what its presentation context needs."""

    key: Any
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str = ""


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file: a DIMSE ``status`` (success or not), or an ``error`` and
    no status. ``lost`` says the file is gone (retrying cannot help); ``suspect`` that the
    association ended while the file was out, unanswered (the peer may choke on it)."""

    status: int | None = None
    error: str | None = None
    lost: bool = False
    suspect: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and is_success(self.status)


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return uid if name == uid else f"{name} ({uid})"


def _syntaxes_by_class(files: Sequence[OutgoingFile]) -> dict[str, set[str]]:
    """The transfer syntaxes of the files, per SOP class: one presentation context each.

    Raises:
        ValueError: more SOP classes than one association can carry (:data:`MAX_CONTEXTS`).
    """
    syntaxes: dict[str, set[str]] = defaultdict(set)
    for item in files:
        syntaxes[item.sop_class_uid].add(item.transfer_syntax_uid)
    if len(syntaxes) > MAX_CONTEXTS:
        raise ValueError(f"{len(syntaxes)} SOP classes: more than one association can carry")
    return syntaxes


def _on_open(connected: threading.Event, event: Any) -> None:
    """The connection is open: say so, and send each PDU at once."""
    connected.set()
    # one PDU per C-STORE: without TCP_NODELAY each waits for the peer's delayed ACK
    sock = compat.raw_socket(event.assoc)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _association_failure(peer: Peer, assoc: Any, rejection: Any, connected: bool,
                         connect_errors: list[str]) -> AssociationFailed:
    """Why no association was established with ``peer`` (``rejection``: the A-ASSOCIATE-RJ
    received, or None), as the error to raise."""
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if rejection is not None:
        return AssociationFailed(f"association rejected by {where}: "
                                 f"{describe_rejection(rejection)}", rejected=True)
    if not connected:
        why = connect_errors[-1] if connect_errors else "no connection"
        return AssociationFailed(f"cannot connect to {where}: {why}")
    if assoc.is_aborted and assoc.accepted_contexts == [] and assoc.rejected_contexts:
        classes = ", ".join(_uid_name(cx.abstract_syntax) for cx in assoc.rejected_contexts)
        return AssociationFailed(f"{where} accepted none of the presentation contexts "
                                 f"({classes})")
    return AssociationFailed(f"association with {where} aborted or timed out during "
                             "negotiation")


def _associate(peer: Peer, syntaxes: dict[str, set[str]], timeout_s: float) -> Any:
    """An established association with ``peer`` proposing one context per SOP class.

    Raises:
        AssociationFailed: no association (rejected, aborted, no connection).
    """
    from pynetdicom import AE, evt
    from pynetdicom.presentation import build_context

    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    contexts = [build_context(uid, sorted(ts)) for uid, ts in syntaxes.items()]
    context = client_ssl_context(peer.tls)
    tls_args = None if context is None else (context, peer.host)
    connected = threading.Event()
    rejected = compat.RejectionSeen()
    handlers = [(evt.EVT_CONN_OPEN, partial(_on_open, connected)),
                (evt.EVT_PDU_RECV, rejected.handler),
                (evt.EVT_FSM_TRANSITION, compat.wake_dimse_on_close)]
    with compat.capture_connect_errors() as errors:
        assoc = ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title,
                             tls_args=tls_args, evt_handlers=handlers)
    if not assoc.is_established:
        raise _association_failure(peer, assoc, rejected.rejection(assoc), connected.is_set(),
                                   errors.messages)
    return assoc


_LOST = "the association was lost (aborted by the peer or the network)"


def _unsendable(item: OutgoingFile, assoc: Any, accepted: set[tuple[str, str]],
                peer: Peer) -> FileOutcome | None:
    """The outcome of a file that cannot be sent (the association is gone, the file is
    missing, or no context was accepted for it); None when it can be."""
    if not assoc.is_established:
        return FileOutcome(error=_LOST)
    if not item.path.is_file():
        return FileOutcome(error=f"outbox file missing: {item.path}", lost=True)
    if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
        return FileOutcome(
            error=f"{peer.ae_title} accepted no presentation context for "
                  f"{_uid_name(item.sop_class_uid)} in "
                  f"{_uid_name(item.transfer_syntax_uid)}")
    return None


def _c_store(assoc: Any, item: OutgoingFile) -> FileOutcome:
    """C-STORE one file; the peer's status, or why there is none (a peer that does not
    answer is aborted: it is not waited on again)."""
    try:
        status = assoc.send_c_store(item.path)
    except RuntimeError:  # the association ended since it was checked
        return FileOutcome(error=_LOST)
    except Exception as exc:  # an unreadable file (InvalidDicomError, EOFError...)
        return FileOutcome(error=f"cannot send {item.path}: {type(exc).__name__}: {exc}")
    if "Status" not in status:
        if assoc.is_established:
            assoc.abort()
        return FileOutcome(error="no response (the association was aborted or timed out)",
                           suspect=True)
    code = int(status.Status)
    return FileOutcome(status=code, error=None if is_success(code) else describe_status(code))


def _end(assoc: Any, stop: threading.Event | None) -> None:
    """Release the association, or abort it when the send was stopped."""
    if assoc.is_established:
        if stop is not None and stop.is_set():
            assoc.abort()
        else:
            assoc.release()


def send_over_association(peer: Peer, files: Sequence[OutgoingFile], timeout_s: float = 30.0,
                          stop: threading.Event | None = None,
                          on_sent: Callable[[int, int], None] | None = None,
                          on_outcome: Callable[[Any, FileOutcome], None] | None = None
                          ) -> dict[Any, FileOutcome]:
    """Send files over one association with one presentation context per SOP class (with the
    transfer syntaxes of its files). Returns an outcome per key; keys without one were not
    tried (``stop`` was set). At most :data:`MAX_CONTEXTS` SOP classes. ``on_sent(done,
    total)`` is called after each file the peer answered, ``on_outcome(key, outcome)`` as
    each outcome is known (what it raises ends the association and propagates).

    Raises:
        AssociationFailed: no association (rejected, aborted, no connection).
    """
    syntaxes = _syntaxes_by_class(files)
    outcomes: dict[Any, FileOutcome] = {}
    if not files:
        return outcomes
    assoc = _associate(peer, syntaxes, timeout_s)
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    try:
        for item in files:
            if stop is not None and stop.is_set():
                break
            outcome = _unsendable(item, assoc, accepted, peer)
            if outcome is None:
                outcome = _c_store(assoc, item)
            outcomes[item.key] = outcome
            if on_outcome is not None:
                on_outcome(item.key, outcome)
            if outcome.status is not None and on_sent is not None:
                on_sent(len(outcomes), len(files))
    finally:
        _end(assoc, stop)
    return outcomes
