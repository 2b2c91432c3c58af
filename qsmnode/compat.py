"""Every use of a library internal, in one place, checked against the installed versions.

qsmnode relies on a few things pynetdicom and highdicom do not promise. Each is used only
through this module; :func:`check_versions` (at start-up) refuses an installed library outside
the range these uses were written and tested against (:data:`TESTED`: ``pyproject.toml`` pins
the same ranges, ``tests/test_compat.py`` compares them), with an error that names the library,
the installed version and the range, instead of a silent slowdown or a traceback later; and
:func:`install` puts in place what is changed process-wide. Importing this module changes
nothing and imports neither library nor anything of qsmnode, so the DICOM code and the node
can both use it. The start-up (``qsmnode.__main__.main``, the worker child, a Dask task of the
BIDS App) calls ``check_versions()`` then ``install()``.

The internals, by library (each tested over the range of :data:`TESTED`):

pynetdicom (>= 3.0, < 3.1):

- ``DULServiceProvider._run_loop_delay``, the DUL reactor's polling sleep: shortened for each
  association, the latency of every C-STORE (:func:`shorten_dul_idle_sleep`);
- ``Association.dul.socket`` (the ``AssociationSocket``) and its ``socket`` (the connected
  socket): TCP_NODELAY, the TLS handshake in the connection's thread, closing a connection
  (:func:`association_socket`, :func:`raw_socket`);
- how the DUL reads a PDU: ``AssociationSocket.recv(6)`` for the header, then
  ``recv(length)`` for the body, and nothing else (``dul._read_pdu_data``); a short read of
  the header is taken as "connection closed" (event 17) without a log line. :class:`PduGate`
  stands in for ``recv`` on an acceptor's socket, so that a PDU is measured before its body
  is read, and refused (with nothing buffered) when it is larger than allowed;
- an acceptor's association thread waits for the A-ASSOCIATE-RQ in
  ``dul.receive_pdu(wait=True, timeout=acse_timeout)`` and ends quietly when that gives None:
  :class:`PduGate` puts None in ``dul.to_user_queue`` when it closes a connection that has
  not sent its request, so the thread ends at once instead of after the ACSE timeout;
- ``Association.dimse.msg_queue`` and the state machine's event name ``Evt17`` (connection
  closed): an empty message ``(None, None)`` wakes a C-STORE waiting for its response when
  the connection closes, instead of after the DIMSE timeout (:func:`wake_dimse_on_close`);
- pynetdicom's threads carry their association (the DUL thread as ``assoc``, the association
  thread is it): :func:`peer_of_current_thread` names the peer in a log line;
- the text of ``pynetdicom.transport``'s record ``TCP Initialisation Error: <OS error>`` on a
  failed connect, logged a second time with its traceback: :func:`capture_connect_errors`
  keeps the OS error and drops the traceback;
- the accept loop wraps each accepted socket with ``ssl_context.wrap_socket`` in the loop's
  own thread: :class:`LazyHandshakeContext` defers the handshake to the connection's thread.

highdicom (>= 0.23, < 0.29):

- ``highdicom._standard_utils.is_attribute_in_iod`` and the copies ``highdicom.base`` and
  ``highdicom.sr.content`` import: :func:`install` replaces them with a memoised version,
  which returns exactly what highdicom's does (``tests/test_derived.py`` checks it): highdicom
  walks the standard's module tables on every call (several milliseconds), thousands of times
  per acquisition, about half of the build time of the derived objects.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

log = logging.getLogger(__name__)

TESTED: dict[str, tuple[str, str]] = {
    "pynetdicom": ("3.0", "3.1"),
    "highdicom": ("0.23", "0.29"),
}
"""Distribution name -> (lowest version, first version not supported) of each library whose
internals are used: the range they were written and tested against. ``pyproject.toml`` pins
each as :func:`requirement` writes it."""


class IncompatibleLibrary(RuntimeError):
    """An installed library is outside the range of :data:`TESTED`, or missing."""


def requirement(name: str) -> str:
    """The dependency string of ``name`` in ``pyproject.toml``: ``name>=low,<high``."""
    low, high = TESTED[name]
    return f"{name}>={low},<{high}"


def _version_tuple(text: str) -> tuple[int, ...]:
    """The release numbers of a version (``3.0.4`` -> (3, 0, 4); ``3.1.0rc1`` -> (3, 1, 0))."""
    parts = []
    for part in text.split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        parts.append(int(digits or 0))
        if len(digits) < len(part):
            break  # a pre-release, post-release or local suffix ends the release numbers
    return tuple(parts)


def check_versions(*names: str) -> None:
    """Raise :class:`IncompatibleLibrary` unless every library of :data:`TESTED` (or only
    ``names``) is installed in its tested range; the message names each library outside it,
    its installed version and the range."""
    problems: dict[str, str] = {}
    for name in names or tuple(TESTED):
        low, high = TESTED[name]
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems[name] = f"{name} is not installed (qsmnode needs {name} >= {low}, < {high})"
            continue
        if not _version_tuple(low) <= _version_tuple(installed) < _version_tuple(high):
            problems[name] = (f"{name} {installed} is installed, but qsmnode uses internals of "
                              f"{name} tested only with versions >= {low}, < {high}")
    if problems:
        fix = " ".join(f"'{requirement(name)}'" for name in problems)
        raise IncompatibleLibrary(f"{'; '.join(problems.values())} (see qsmnode/compat.py); "
                                  f"install a tested version: pip install {fix}")


def install() -> None:
    """Put in place what qsmnode changes process-wide (idempotent): highdicom's memoised
    :func:`is_attribute_in_iod`. pynetdicom's tweaks are made per association, by the node's
    event handlers (:func:`shorten_dul_idle_sleep`, :class:`PduGate`, ...): nothing to do for
    them here."""
    import highdicom._standard_utils as standard_utils
    import highdicom.base
    import highdicom.sr.content

    original = _highdicom_is_attribute_in_iod()
    for module in (standard_utils, highdicom.base, highdicom.sr.content):
        if getattr(module, "is_attribute_in_iod", None) is original:
            module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------
# highdicom: the memoised IOD look-up


@functools.cache
def _highdicom_is_attribute_in_iod() -> Callable[..., bool]:
    """highdicom's own ``is_attribute_in_iod`` (taken before :func:`install` replaces it)."""
    import highdicom._standard_utils as standard_utils

    return standard_utils.is_attribute_in_iod  # type: ignore[no-any-return]


@functools.cache
def _cached_is_attribute_in_iod(attribute: str, sop_class_uid: str,
                                exclude: tuple[str, ...] | None) -> bool:
    return bool(_highdicom_is_attribute_in_iod()(attribute, sop_class_uid,
                                                 None if exclude is None else list(exclude)))


def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                        exclude_path_elements: Sequence[str] | None = None) -> bool:
    """highdicom's ``is_attribute_in_iod``, memoised on its arguments."""
    exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
    return _cached_is_attribute_in_iod(str(attribute), str(sop_class_uid), exclude)


# ------------------------------------------------------------------------------------------------
# pynetdicom: an association's DUL, DIMSE and socket

_dul_knob_missing_logged = False


def shorten_dul_idle_sleep(assoc: Any, seconds: float) -> None:
    """Set the DUL reactor's idle sleep of ``assoc`` to at most ``seconds``; if this pynetdicom
    has no such attribute, log it once and leave pynetdicom's default."""
    global _dul_knob_missing_logged
    dul = getattr(assoc, "dul", None)
    current = getattr(dul, "_run_loop_delay", None)
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        dul._run_loop_delay = min(float(current), seconds)  # type: ignore[union-attr]
    elif not _dul_knob_missing_logged:
        _dul_knob_missing_logged = True
        log.warning("pynetdicom's DUL has no _run_loop_delay: its default polling delay is kept")


def association_socket(assoc: Any) -> Any:
    """pynetdicom's ``AssociationSocket`` of ``assoc`` (None when there is none)."""
    return getattr(getattr(assoc, "dul", None), "socket", None)


def raw_socket(assoc: Any) -> socket.socket | None:
    """The connected socket of ``assoc`` (None once pynetdicom has closed it)."""
    return getattr(association_socket(assoc), "socket", None)


def wake_dimse_on_close(event: Any) -> None:
    """An ``EVT_FSM_TRANSITION`` handler: when the connection closed (Evt17: the peer died or
    aborted) while a request awaits its response, pynetdicom would notice only after the
    DIMSE timeout; an empty message wakes that wait now (it reads as "no response")."""
    if getattr(event, "fsm_event", None) == "Evt17":
        try:
            event.assoc.dimse.msg_queue.put((None, None))
        except AttributeError:
            pass


class RejectionSeen:
    """The A-ASSOCIATE-RJ a requestor's DUL received, as an ``EVT_PDU_RECV`` handler.

    pynetdicom's requestor can miss a rejection: its DUL thread closes the connection as soon
    as it has the A-ASSOCIATE-RJ, and when the requesting thread looks only after that, it sees
    no connection and aborts, so the association reads as aborted, not rejected (on a loaded
    machine, 1 in 10 rejections by Orthanc). The DUL did decode the PDU: this keeps it.
    """

    def __init__(self) -> None:
        self.received: Any = None

    def handler(self, event: Any) -> None:
        from pynetdicom.pdu import A_ASSOCIATE_RJ

        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            self.received = event.pdu.to_primitive()

    def rejection(self, assoc: Any) -> Any:
        """The rejecting A-ASSOCIATE primitive of ``assoc``; None when it was not rejected."""
        if assoc.is_rejected:
            return assoc.acceptor.primitive
        return self.received


def peer_of_current_thread() -> str | None:
    """``host:port`` of the peer of the association whose thread (pynetdicom's association or
    DUL thread) is running, or None."""
    thread = threading.current_thread()
    assoc = getattr(thread, "assoc", None) if not hasattr(thread, "requestor") else thread
    requestor = getattr(assoc, "requestor", None)
    acceptor = getattr(assoc, "acceptor", None)
    remote = requestor if getattr(assoc, "is_acceptor", True) else acceptor
    try:
        return f"{remote.address}:{remote.port}"  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# pynetdicom: log text of a failed connect; the accept loop's TLS wrapping


class ConnectErrors(logging.Handler):
    """Keeps pynetdicom's "TCP Initialisation Error" text (the OS error of a failed connect)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("TCP Initialisation Error"):
            self.messages.append(message.partition(":")[2].strip())


def _no_traceback(record: logging.LogRecord) -> bool:
    """pynetdicom logs a failed TLS handshake a second time with its traceback
    (``LOGGER.exception``): the "TCP Initialisation Error" line already says it all."""
    return not record.exc_info


@contextmanager
def capture_connect_errors() -> Iterator[ConnectErrors]:
    """Within the block, the OS errors of failed connects (``messages``), without pynetdicom's
    second record and its traceback."""
    handler = ConnectErrors()
    logger = logging.getLogger("pynetdicom.transport")
    logger.addHandler(handler)
    logger.addFilter(_no_traceback)
    try:
        yield handler
    finally:
        logger.removeFilter(_no_traceback)
        logger.removeHandler(handler)


class LazyHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets defer the handshake.

    pynetdicom wraps accepted sockets in its accept loop, where a default handshake would let
    one slow or silent client stall every other connection. The receiver runs the handshake in
    the connection's thread instead (see ``Receiver._on_conn_open``).
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# pynetdicom: reading PDUs with limits

A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04
_PDU_TYPES = range(0x01, 0x08)
_HEADER = struct.Struct(">BBL")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Refused:
    """Why :class:`PduGate` closed a connection: ``kind`` is one of ``too_large``,
    ``undecodable``, ``bad_ae_title``, ``timeout``, ``reset``, ``truncated``, ``closed`` (by
    :meth:`PduGate.close`); ``reason`` is a line of plain text (control characters escaped)."""

    kind: str
    reason: str
    established: bool


def printable(text: str) -> str:
    """``text`` with control characters shown as ``\\x..`` escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _ae_problem(field: bytes) -> str | None:
    """Why a 16-byte AE title field of an A-ASSOCIATE-RQ is not a valid AE title, or None."""
    if any(b < 0x20 or b == 0x5C or b > 0x7E for b in field):
        return "control characters or a backslash"
    if not field.strip(b" "):
        return "empty"
    return None


def _pdata_problem(body: bytes | bytearray | memoryview) -> str | None:
    """Why the variable field of a P-DATA-TF PDU is not a sequence of PDV items, or None."""
    pos, end = 0, len(body)
    if end == 0:
        return "P-DATA-TF without a PDV item"
    while pos < end:
        if pos + 6 > end:
            return "P-DATA-TF with a cut PDV item header"
        (length,) = struct.unpack_from(">L", body, pos)
        if length < 2 or pos + 4 + length > end:
            return f"P-DATA-TF with a PDV item length of {length} at byte {pos}"
        pos += 4 + length
    return None


def _decode_problem(pdu_type: int, data: bytes) -> str | None:
    """Why pynetdicom cannot decode this (small, not P-DATA) PDU, or None."""
    from pynetdicom import pdu as pdus

    classes = {0x01: pdus.A_ASSOCIATE_RQ, 0x02: pdus.A_ASSOCIATE_AC, 0x03: pdus.A_ASSOCIATE_RJ,
               0x05: pdus.A_RELEASE_RQ, 0x06: pdus.A_RELEASE_RP, 0x07: pdus.A_ABORT_RQ}
    try:
        classes[pdu_type]().decode(data)
    except Exception as exc:  # pynetdicom raises many types on garbage (KeyError: 0, ...)
        return printable(f"{type(exc).__name__}: {exc}")[:200]
    return None


def _associate_rj(source: int, diagnostic: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU, rejected-permanent."""
    return bytes((0x03, 0, 0, 0, 0, 4, 0, 0x01, source, diagnostic))


_ABORT = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00))  # A-ABORT, service provider, no reason
_RJ_NO_REASON = _associate_rj(0x02, 0x01)  # service provider (ACSE), no reason given
_RJ_CALLED_AE = _associate_rj(0x01, 0x07)  # service user, called AE title not recognised
_RJ_CALLING_AE = _associate_rj(0x01, 0x03)  # service user, calling AE title not recognised


class PduGate:
    """Reads the PDUs of one acceptor association in pynetdicom's stead, within limits.

    Installed on a new connection (:meth:`install`, at EVT_CONN_OPEN, before pynetdicom reads
    anything), it reads each PDU's 6-byte header and refuses, before reading the body:

    - any PDU but P-DATA longer than ``request_limit``, and a P-DATA-TF PDU before any
      A-ASSOCIATE-RQ too;
    - a P-DATA-TF PDU longer than ``pdata_limit`` (the Maximum Length the node announced;
      0: no limit) after the request. The peer sends P-DATA once it has the accept, which
      can be before pynetdicom's thread marks the association established: judging it by
      that flag would refuse a scanner's first P-DATA on a busy machine.
    - an unknown PDU type.

    It then reads the body (waiting at most until ``deadline``, a ``time.monotonic`` value,
    before the association is established, and ``idle_timeout_s`` between bytes after) and
    checks that it decodes (AE titles without control characters; PDV items that add up) so
    that pynetdicom never logs a traceback for it. A refused connection gets an
    A-ASSOCIATE-RJ (before the association) or an A-ABORT (after) when the peer is still
    there, is shut down, and ``on_refuse`` is called once with a :class:`Refused`. pynetdicom
    then sees a closed connection.
    """

    def __init__(self, assoc: Any, *, request_limit: int, pdata_limit: int, deadline: float,
                 idle_timeout_s: float, on_refuse: Callable[[Refused], None]) -> None:
        self.assoc = assoc
        self.request_limit = request_limit
        self.pdata_limit = pdata_limit
        self.deadline = deadline
        self.idle_timeout_s = idle_timeout_s
        self.on_refuse = on_refuse
        self.refused: Refused | None = None
        self._body: bytearray | None = None
        self._lock = threading.Lock()
        self._closing: str | None = None
        self._requested = False  # an A-ASSOCIATE-RQ has passed the gate

    def install(self) -> None:
        """Read ``assoc``'s PDUs through this gate from now on."""
        self.assoc.dul.socket.recv = self.recv

    @property
    def established(self) -> bool:
        return bool(getattr(self.assoc, "is_established", False))

    def close(self, reason: str) -> None:
        """Close the connection from another thread (e.g. to make room for a newer one)."""
        with self._lock:
            if self.refused is not None or self._closing is not None:
                return
            self._closing = reason
        sock = raw_socket(self.assoc)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -------------------------------------------------------------------------------- reading

    def recv(self, nr_bytes: int) -> bytearray:
        """``AssociationSocket.recv`` as the DUL calls it: a 6-byte header, then its body."""
        if self._body is not None:
            body, self._body = self._body, None
            if len(body) == nr_bytes:
                return body
            return bytearray()  # pragma: no cover - the DUL asks for exactly the body
        if self.refused is not None:
            return bytearray()
        header = self._read(nr_bytes)
        if header is None:
            return bytearray()
        if len(header) < nr_bytes and not self.established:
            self._wake_acceptor()  # the peer closed before its request
        if nr_bytes != _HEADER.size or len(header) < nr_bytes:
            return header  # pragma: no cover - the DUL reads a header of 6 bytes
        pdu_type, _, length = _HEADER.unpack(header)
        established = self.established
        if pdu_type not in _PDU_TYPES:
            return self._refuse("undecodable", f"unknown PDU type 0x{pdu_type:02X}")
        if pdu_type == P_DATA_TF and (established or self._requested):
            limit = self.pdata_limit or (1 << 32)
            what = "the negotiated maximum"
        else:
            limit = self.request_limit
            what = "the limit before an association" if not established else "the limit"
        if length > limit:
            return self._refuse("too_large", f"{_pdu_name(pdu_type)} PDU of {length} bytes "
                                f"refused unread ({what} is {limit})")
        body = self._read(length)
        if body is None:
            return bytearray()
        if len(body) < length:
            return self._refuse("truncated", f"connection closed after {len(body)} of the "
                                f"{length} bytes of a {_pdu_name(pdu_type)} PDU", reply=False)
        problem = self._problem(pdu_type, header, body)
        if problem is not None:
            return problem
        self._body = body
        self._requested = self._requested or pdu_type == A_ASSOCIATE_RQ
        return header

    def _problem(self, pdu_type: int, header: bytes, body: bytearray) -> bytearray | None:
        if pdu_type == P_DATA_TF:
            why = _pdata_problem(body)
            return None if why is None else self._refuse("undecodable", why)
        if pdu_type == A_ASSOCIATE_RQ and len(body) >= 36:
            for field, name, reply in ((body[4:20], "called", _RJ_CALLED_AE),
                                       (body[20:36], "calling", _RJ_CALLING_AE)):
                why = _ae_problem(bytes(field))
                if why is not None:
                    text = printable(bytes(field).decode("latin-1").strip(" "))
                    return self._refuse("bad_ae_title", f"{name} AE title '{text}' is not "
                                        f"valid ({why})", wire=reply)
        why = _decode_problem(pdu_type, bytes(header) + bytes(body))
        if why is not None:
            return self._refuse("undecodable", f"{_pdu_name(pdu_type)} PDU does not decode "
                                f"({why})")
        return None

    def _read(self, nr_bytes: int) -> bytearray | None:
        """Up to ``nr_bytes`` (fewer: the peer closed); None when refused on the way."""
        sock = raw_socket(self.assoc)
        out = bytearray()
        if sock is None:
            return out
        progress = time.monotonic()
        try:
            while len(out) < nr_bytes:
                if self._closing is not None:
                    self._refuse("closed", self._closing, reply=False)
                    return None
                now = time.monotonic()
                if self.established:
                    wait = progress + self.idle_timeout_s - now
                    why = f"no data for {self.idle_timeout_s:g} s in the middle of a PDU"
                else:
                    wait = self.deadline - now
                    why = "no complete association request within the time allowed"
                if wait <= 0:
                    self._refuse("timeout", why, reply=False)
                    return None
                sock.settimeout(min(wait, 1.0))
                try:
                    chunk = sock.recv(min(nr_bytes - len(out), _CHUNK))
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self._closing is not None:
                        self._refuse("closed", self._closing, reply=False)
                    else:
                        self._refuse("reset", printable(f"{type(exc).__name__}: "
                                                        f"{exc.strerror or exc}"), reply=False)
                    return None
                if not chunk:
                    if self._closing is not None:
                        self._refuse("closed", self._closing, reply=False)
                        return None
                    return out
                out += chunk
                progress = time.monotonic()
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass
        return out

    def _refuse(self, kind: str, reason: str, *, reply: bool = True,
                wire: bytes | None = None) -> bytearray:
        with self._lock:
            if self.refused is not None:
                return bytearray()
            self.refused = Refused(kind, reason, self.established)
        sock = raw_socket(self.assoc)
        if sock is not None:
            if reply:
                message = wire or (_ABORT if self.refused.established else _RJ_NO_REASON)
                try:
                    sock.settimeout(1.0)
                    sock.sendall(message)
                except OSError:
                    pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake_acceptor()
        try:
            self.on_refuse(self.refused)
        except Exception:  # the caller's logging must never take pynetdicom's thread down
            log.exception("handling a refused connection failed")
        return bytearray()


    def _wake_acceptor(self) -> None:
        """End the association thread still waiting for this connection's request."""
        requestor = getattr(self.assoc, "requestor", None)
        if self.established or requestor is None:
            return
        if getattr(requestor, "primitive", None) is None:
            self.assoc.dul.to_user_queue.put(None)


def _pdu_name(pdu_type: int) -> str:
    return {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
            0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP",
            0x07: "A-ABORT"}.get(pdu_type, f"type 0x{pdu_type:02X}")
