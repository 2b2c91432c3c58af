"""The receiver: a pynetdicom Storage SCP that keeps every instance it acknowledges.

For each C-STORE the encoded dataset is written **as received** (a Part 10 preamble and file
meta, then the dataset bytes exactly as they came off the wire) to the :class:`Spool`, fsynced
and renamed, then recorded in the :class:`Store`; only then is 0x0000 returned. The dataset is
parsed only to check its structure and read its UIDs (:mod:`qsmnode.dicom.wire`, where
all of its DICOM encoding lives); it is never decoded and re-encoded.

Durability: the spool file is the durable record of an acknowledged instance. Before 0x0000
goes out the file is fsynced under a temporary name, renamed, and its folder fsynced (two
fsyncs). Its store row is then committed with ``synchronous=NORMAL`` (no fsync of its own:
:meth:`Store.add_instance` with ``file_is_durable``), which survives a crash of the process;
after a power loss the last rows may be gone, and :func:`~qsmnode.node.recovery.recover`, run
at every start, adds every spool file the store does not know. So a crash at any point loses
no acknowledged instance: before the rename nothing was acknowledged (a leftover temporary file
is deleted); after it the file is complete and durable, and the row is either there or redone
from it.

Statuses:

- 0x0000: stored; or already stored (same SOP Instance UID: nothing is written again; if the
  dataset differs from the stored one, the stored one is kept and a warning logged); or a
  non-MR instance accepted and dropped because ``store_other_sop_classes`` is false.
- 0xA700: free disk would fall below ``min_free_disk_mb``; nothing written.
- 0xA701 / 0xA702: the spool write / the store commit failed (the scanner may retry).
- 0xA900: the dataset's SOP Class UID differs from the request's.
- 0xC210: the dataset cannot be parsed (truncated, corrupt, not DICOM; deflated data that
  would inflate beyond 256 MiB and 64 times its size).
- 0xC220: a UID is missing or invalid, or the dataset's SOP Instance UID differs from the
  request's.

Every failure carries an Error Comment naming the reason, and is logged.

Associations: only the configured calling AE titles (optionally from given hosts) and the node's
own called AE title are accepted (the policy and the TLS context: :mod:`qsmnode.node.access`);
others get A-ASSOCIATE-RJ (permanent, service user, "calling AE title not recognised" or
"called AE title not recognised") and a log line. With TLS, the handshake runs in the
connection's own thread (never in the accept loop), and a failed handshake (e.g. no trusted
client certificate) closes the connection and is logged.

Logs carry AE titles, addresses and UIDs, never patient names or IDs.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from qsmnode import compat
from qsmnode.dicom.headers import MR_SOP_CLASSES
from qsmnode.dicom.wire import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    DatasetError,
    InstanceHeader,
    file_holds_dataset,
    file_prefix,
    file_prefix_from_meta,
    inspect_dataset,
)
from qsmnode.node.access import AccessPolicy, server_ssl_context
from qsmnode.node.config import Settings
from qsmnode.node.spool import MIB, Spool, SpoolError, is_uid
from qsmnode.node.store import InstanceRecord, Store, StoreError

log = logging.getLogger(__name__)

SPOOL_DIRNAME = "spool"

# C-STORE statuses (see the module docstring)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SPOOL_WRITE_FAILED = 0xA701
STORE_COMMIT_FAILED = 0xA702
SOP_CLASS_MISMATCH = 0xA900
CANNOT_PARSE = 0xC210
BAD_IDENTIFIERS = 0xC220

# A-ASSOCIATE-RJ: result 1 = rejected-permanent, source 1 = DICOM UL service-user
_REJECT_PERMANENT, _SOURCE_USER = 0x01, 0x01
# A-ASSOCIATE-RJ: result 2 = rejected-transient, source 3 = service-provider (presentation)
_REJECT_TRANSIENT, _SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02

REQUEST_PDU_LIMIT = 64 * 1024
"""The largest PDU read from a connection before its association is accepted (an
A-ASSOCIATE-RQ proposing 128 presentation contexts takes about 16 KiB). A larger one is refused
unread, so a connection that has not yet given an allowed AE title holds at most this much."""

PENDING_PER_ADDRESS_FACTOR = 1
PENDING_TOTAL_FACTOR = 4
"""Connections without an association yet (unauthenticated) are bounded to ``max_associations``
times these, per source address and in all. A new connection beyond a bound closes the oldest
such connection (of the same address, else of any): silent sockets cannot keep the scanner
out, since its own connection sends its request at once."""

_LOGGERS_KEPT_QUIET = ("pynetdicom", "pydicom")  # their INFO/DEBUG lines can carry dataset text




DUL_IDLE_SLEEP_S = 0.0002
"""How long an association's DUL thread sleeps when it finds nothing to do (pynetdicom: 1 ms).

pynetdicom's DUL reactor polls: it sleeps between checks of the socket and of the responses
queued by the handler, so each C-STORE waits up to that long twice (to see the request, to
send the response). Its maintainers name ``DULServiceProvider._run_loop_delay`` as the knob
for this trade-off between latency and idle CPU (pydicom/pynetdicom#650). At 0.2 ms the
slab study (640 instances from storescu) arrived 13-30% faster in interleaved runs; an open
but idle association then costs about 9% of a core instead of 6%.
"""

def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


@dataclass
class _Pending:
    """A connection without an association yet: since when, from where, and its gate."""

    assoc: Any
    address: str
    since: float
    gate: compat.PduGate


@dataclass
class _Tally:
    """Per-association counts, logged when the connection closes."""

    peer: str
    stored: int = 0
    duplicates: int = 0
    dropped: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)


class Receiver:
    """The Storage SCP. :meth:`start` listens in background threads; :meth:`stop` ends it.

    ``store`` and ``spool`` are the node's; the spool must live under ``state_dir`` (instance
    paths are recorded relative to it).
    """

    def __init__(self, settings: Settings, store: Store, spool: Spool) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.state_dir = settings.paths.state_dir
        self.policy = AccessPolicy.from_settings(settings)
        self._server: ThreadedAssociationServer | None = None
        self._tallies: dict[int, _Tally] = {}
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}  # connections without an association yet
        self._admitted: dict[int, Any] = {}  # associations past the policy check
        listener = settings.listener
        compat.check_versions("pynetdicom")
        ae = AE(ae_title=listener.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        # pynetdicom counts every open connection, silent ones too, against its limit: the
        # receiver counts admitted associations itself (_on_requested) and bounds the rest.
        ae.maximum_associations = max(listener.max_associations, 1) * 1024
        ae.maximum_pdu_size = listener.max_pdu_bytes
        ae.acse_timeout = listener.acse_timeout_s
        ae.dimse_timeout = listener.dimse_timeout_s
        ae.network_timeout = listener.network_timeout_s
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
        self.ae = ae

    @property
    def port(self) -> int:
        """The port listened on (useful when the configured port is 0)."""
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        listener = self.settings.listener
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self.handle_store),
        ]
        self._server = self.ae.start_server(
            (listener.host, listener.port), block=False,
            ssl_context=server_ssl_context(self.settings), evt_handlers=handlers,
        )
        log.info(
            "listening as %s on %s:%d%s (max %d associations, PDU %d bytes, disk floor %d MiB)",
            listener.ae_title, listener.host, self.port,
            " with TLS" if listener.tls.enabled else "", listener.max_associations,
            listener.max_pdu_bytes, listener.min_free_disk_mb,
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; let running associations finish for ``grace_s``, then abort them."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        with self._lock:
            pending = list(self._pending.values())
        for connection in pending:
            connection.gate.close("the node is stopping")
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            log.warning("aborting association with %s at shutdown", _peer_of(assoc))
            assoc.abort()
        for assoc in self.ae.active_associations:
            assoc.join(timeout=2.0)
        log.info("listener stopped")

    # -------------------------------------------------------------------------- association events

    def _on_conn_open(self, event: evt.Event) -> None:
        compat.shorten_dul_idle_sleep(event.assoc, DUL_IDLE_SLEEP_S)
        self._gate(event.assoc)
        sock = compat.association_socket(event.assoc)
        raw = compat.raw_socket(event.assoc)
        if not isinstance(raw, ssl.SSLSocket):
            return
        previous = raw.gettimeout()
        raw.settimeout(self.settings.listener.acse_timeout_s)
        try:
            raw.do_handshake()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            reason = compat.printable(str(reason))
            log.warning("refused TLS connection from %s: handshake failed (%s)",
                        _endpoint_of(event.assoc), reason)
            self.store.audit.connection(_endpoint_of(event.assoc), "tls_refused",
                                        f"TLS handshake failed ({reason})")
            self._forget_pending(event.assoc)
            event.assoc.acse_timeout = 0.01  # end the association thread without waiting
            sock.close()
            return
        raw.settimeout(previous)
        cert = raw.getpeercert()
        subject = dict(pair for rdn in cert.get("subject", ()) for pair in rdn) if cert else {}
        log.info("TLS connection from %s (%s, client certificate %s)", _endpoint_of(event.assoc),
                 raw.version(), subject.get("commonName", "none"))

    # ------------------------------------------------------------ connections before association

    def _gate(self, assoc: Any) -> None:
        """Count a new connection as pending (closing the oldest pending one beyond a bound)
        and read its PDUs through a :class:`compat.PduGate`."""
        listener = self.settings.listener
        address = _address_of(assoc)
        gate = compat.PduGate(
            assoc, request_limit=REQUEST_PDU_LIMIT, pdata_limit=listener.max_pdu_bytes,
            deadline=time.monotonic() + listener.acse_timeout_s,
            idle_timeout_s=listener.network_timeout_s,
            on_refuse=lambda refused: self._on_refused(assoc, refused),
        )
        gate.install()
        per_address = listener.max_associations * PENDING_PER_ADDRESS_FACTOR
        total = listener.max_associations * PENDING_TOTAL_FACTOR
        evicted: list[tuple[_Pending, str]] = []
        with self._lock:
            for key, pending in list(self._pending.items()):
                if pending.assoc.ident is not None and not pending.assoc.is_alive():
                    del self._pending[key]  # its thread ended without telling us
            same = [p for p in self._pending.values() if p.address == address]
            if len(same) >= per_address:
                oldest = min(same, key=lambda p: p.since)
                evicted.append((oldest, f"more than {per_address} connections from {address} "
                                        "without an association"))
                del self._pending[id(oldest.assoc)]
            if len(self._pending) >= total:
                oldest = min(self._pending.values(), key=lambda p: p.since)
                evicted.append((oldest, f"more than {total} connections without an "
                                        "association"))
                del self._pending[id(oldest.assoc)]
            self._pending[id(assoc)] = _Pending(assoc, address, time.monotonic(), gate)
        for pending, reason in evicted:
            pending.gate.close(f"closed to make room: {reason}")

    def _forget_pending(self, assoc: Any) -> _Pending | None:
        with self._lock:
            return self._pending.pop(id(assoc), None)

    def _on_refused(self, assoc: Any, refused: compat.Refused) -> None:
        """One line and one audit event for a connection the gate closed (never a
        traceback)."""
        self._forget_pending(assoc)
        endpoint = _endpoint_of(assoc)
        if refused.kind == "reset" or refused.kind == "truncated":
            log.warning("connection from %s lost: %s", endpoint, refused.reason)
        else:
            log.warning("refused connection from %s: %s", endpoint, refused.reason)
        self.store.audit.connection(endpoint, refused.kind, refused.reason,
                                    associated=refused.established)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._forget_pending(assoc)
        request = assoc.requestor.primitive
        refusal = self.policy.check(str(request.calling_ae_title), str(request.called_ae_title),
                                    str(assoc.requestor.address))
        if refusal is None:
            self._admit(assoc)
            return
        log.warning("rejected association from %s (calling %s, called %s): %s",
                    _address_of(assoc), str(request.calling_ae_title).strip(),
                    str(request.called_ae_title).strip(), refusal.reason)
        self.store.audit.association(assoc, "rejected", refusal.reason)
        assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_USER, refusal.diagnostic)
        assoc.kill()

    def _admit(self, assoc: Any) -> None:
        """Count an allowed association against ``max_associations``; beyond it, reject it
        (transient: local limit exceeded)."""
        limit = self.settings.listener.max_associations
        with self._lock:
            for key, other in list(self._admitted.items()):
                if other.ident is not None and not other.is_alive():
                    del self._admitted[key]
            if len(self._admitted) < limit:
                self._admitted[id(assoc)] = assoc
                return
        reason = f"local limit exceeded ({limit} associations)"
        log.warning("rejected association from %s: %s", _peer_of(assoc), reason)
        self.store.audit.association(assoc, "rejected", reason)
        assoc.acse.send_reject(_REJECT_TRANSIENT, _SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
        assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections, e.g. too many associations
        reply = event.assoc.acceptor.primitive
        log.warning("rejected association from %s: result %s, source %s, diagnostic %s",
                    _peer_of(event.assoc), getattr(reply, "result_str", "?"),
                    getattr(reply, "source_str", "?"), getattr(reply, "reason_str", "?"))
        self.store.audit.association(event.assoc, "rejected", getattr(reply, "reason_str", "?"))

    def _on_accepted(self, event: evt.Event) -> None:
        peer = _peer_of(event.assoc)
        with self._lock:
            self._tallies[id(event.assoc)] = _Tally(peer)
        log.info("association accepted from %s", peer)
        self.store.audit.association(event.assoc, "accepted")

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
            self._admitted.pop(id(event.assoc), None)
            pending = self._pending.pop(id(event.assoc), None)
        if pending is not None and pending.gate.refused is None:
            endpoint = _endpoint_of(event.assoc)
            reason = "closed before an association request"
            log.info("connection from %s %s", endpoint, reason)
            self.store.audit.connection(endpoint, "no_request", reason)
        if tally is None:
            return
        log.info("association with %s closed after %.1f s: %d stored, %d duplicates, "
                 "%d dropped (not MR), %d failed", tally.peer,
                 time.monotonic() - tally.started, tally.stored, tally.duplicates,
                 tally.dropped, tally.failed)

    def _on_echo(self, event: evt.Event) -> int:
        log.debug("C-ECHO from %s", _peer_of(event.assoc))
        return SUCCESS

    def _count(self, event: evt.Event, what: str) -> None:
        with self._lock:
            tally = self._tallies.get(id(event.assoc))
            if tally is not None:
                setattr(tally, what, getattr(tally, what) + 1)

    # ------------------------------------------------------------------------------------ C-STORE

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """EVT_C_STORE: keep the instance durably, then answer (see the module docstring)."""
        try:
            return self._store(event)
        except Exception as exc:  # never let one instance take the association down
            log.exception("C-STORE from %s: unexpected error", _peer_of(event.assoc))
            return self._fail(event, 0xC211, str(event.request.AffectedSOPInstanceUID),
                              f"internal error: {type(exc).__name__}")

    def _fail(self, event: evt.Event, code: int, sop_uid: str, reason: str,
              detail: str = "") -> Dataset:
        self._count(event, "failed")
        log.warning("C-STORE of %s from %s failed with 0x%04X: %s%s", sop_uid,
                    _peer_of(event.assoc), code, reason, detail)
        return _status(code, reason)

    def _store(self, event: evt.Event) -> int | Dataset:
        received = getattr(event.request, "DataSet", None)
        if isinstance(received, BytesIO):
            # the bytes as received, without a copy (released before pynetdicom goes on)
            with received.getbuffer() as payload:
                return self._store_payload(event, payload)
        return self._store_payload(event, event.encoded_dataset(include_meta=False))

    def _store_payload(self, event: evt.Event, payload: bytes | memoryview) -> int | Dataset:
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_uid = str(request.AffectedSOPInstanceUID)
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            header = inspect_dataset(payload, transfer_syntax)
        except DatasetError as exc:
            where = "" if exc.offset is None else f" (byte {exc.offset} of the dataset)"
            return self._fail(event, CANNOT_PARSE, sop_uid, str(exc), where)
        if header.sop_class_uid is not None and header.sop_class_uid != sop_class:
            return self._fail(event, SOP_CLASS_MISMATCH, sop_uid,
                              "SOP Class UID differs from the request",
                              f" ({header.sop_class_uid} in the dataset, {sop_class} requested)")
        for name, uid in (("SOPInstanceUID", header.sop_instance_uid),
                          ("StudyInstanceUID", header.study_uid),
                          ("SeriesInstanceUID", header.series_uid)):
            if uid is None:
                return self._fail(event, BAD_IDENTIFIERS, sop_uid, f"{name} missing")
            if not is_uid(uid):
                return self._fail(event, BAD_IDENTIFIERS, sop_uid, f"{name} is not a valid UID",
                                  f" ({uid[:80]!r})")
        if header.sop_instance_uid != sop_uid:
            return self._fail(event, BAD_IDENTIFIERS, sop_uid,
                              "SOP Instance UID differs from the request",
                              f" (dataset: {header.sop_instance_uid})")
        assert header.study_uid is not None and header.series_uid is not None
        if sop_class not in MR_SOP_CLASSES and not self.settings.listener.store_other_sop_classes:
            log.info("dropped %s (SOP class %s, series %s) from %s: not MR and "
                     "store_other_sop_classes is false", sop_uid, sop_class, header.series_uid,
                     _peer_of(event.assoc))
            self._count(event, "dropped")
            return SUCCESS

        existing = self.store.instance(sop_uid)
        if existing is not None and (self.state_dir / existing.path).is_file():
            self._count(event, "duplicates")
            if file_holds_dataset(self.state_dir / existing.path, payload):
                log.debug("duplicate %s from %s: already stored", sop_uid, _peer_of(event.assoc))
            else:  # the same SOP Instance UID for other content: keep the first, say so
                log.warning("duplicate %s from %s differs from the stored copy (series %s, "
                            "%d bytes in %s; stored: series %s, transfer syntax %s): the "
                            "stored copy is kept, the new one dropped", sop_uid,
                            _peer_of(event.assoc), header.series_uid, len(payload),
                            transfer_syntax, existing.series_uid, existing.transfer_syntax_uid)
            return SUCCESS

        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            prefix = file_prefix(sop_class, sop_uid, transfer_syntax, calling_ae)
        except UnicodeEncodeError:  # not ASCII: let pydicom encode it
            prefix = file_prefix_from_meta(event.file_meta, calling_ae)
        size = len(prefix) + len(payload)
        if not self.spool.has_room(size):
            free_mib = self.spool.free_bytes() // MIB
            return self._fail(event, OUT_OF_RESOURCES, sop_uid,
                              f"disk full: {free_mib} MiB free, floor "
                              f"{self.settings.listener.min_free_disk_mb} MiB")
        path = self.spool.path_for(header.study_uid, header.series_uid, sop_uid)
        try:
            self.spool.write(path, (prefix, payload))
        except SpoolError as exc:
            why = os.strerror(exc.errno) if exc.errno else "I/O error"
            return self._fail(event, SPOOL_WRITE_FAILED, sop_uid, f"spool write failed: {why}",
                              f" ({exc.strerror})")
        record = instance_record(header, sop_class, sop_uid, transfer_syntax,
                         path.relative_to(self.state_dir).as_posix(), size, calling_ae,
                         _address_of(event.assoc), time.time())
        try:
            new = self.store.add_instance(record, file_is_durable=True)
        except (sqlite3.Error, StoreError) as exc:
            return self._fail(event, STORE_COMMIT_FAILED, sop_uid, "store commit failed",
                              f" ({exc})")
        if new:
            log.debug("stored %s (series %s) from %s", sop_uid, header.series_uid,
                      _peer_of(event.assoc))
            self._count(event, "stored")
        else:  # a concurrent association stored the same instance
            self._count(event, "duplicates")
        return SUCCESS


def instance_record(header: InstanceHeader, sop_class: str, sop_uid: str, transfer_syntax: str,
                    path: str, size: int, calling_ae: str, peer: str,
                    at: float) -> InstanceRecord:
    """The store's record of an instance from its header (the receiver's, and recovery's)."""
    assert header.study_uid is not None and header.series_uid is not None
    return InstanceRecord(
        sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_uid=header.study_uid,
        series_uid=header.series_uid, transfer_syntax_uid=transfer_syntax, path=path,
        size=size, calling_ae=calling_ae, peer_address=peer, received_at=at,
        series_number=header.series_number, instance_number=header.instance_number,
        number_of_frames=header.number_of_frames,
        images_in_acquisition=header.images_in_acquisition, modality=header.modality,
        series_description=header.series_description,
    )


def _address_of(assoc: Any) -> str:
    try:
        return str(assoc.requestor.address)
    except (ValueError, AttributeError):
        return "?"


def _endpoint_of(assoc: Any) -> str:
    try:
        return f"{assoc.requestor.address}:{assoc.requestor.port}"
    except (ValueError, AttributeError):
        return "?"


def _peer_of(assoc: Any) -> str:
    """``AE@address:port`` of the association's requestor, as far as known."""
    ae = str(getattr(assoc.requestor, "ae_title", "") or "").strip() or "?"
    try:
        return f"{ae}@{assoc.requestor.address}:{assoc.requestor.port}"
    except (ValueError, AttributeError):
        return f"{ae}@?"


def quiet_library_loggers(level: int) -> None:
    """Keep pynetdicom and pydicom at WARNING or above: their chatter can quote datasets."""
    for name in _LOGGERS_KEPT_QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
