"""The receiver: a pynetdicom Storage SCP that keeps every instance it acknowledges.

For each C-STORE the encoded dataset is written **as received** (a Part 10 preamble and file
meta, then the dataset bytes exactly as they came off the wire) to the :class:`Spool`, fsynced
and renamed, then recorded in the :class:`Store`; only then is 0x0000 returned. The dataset is
parsed only to check its structure and read its UIDs; it is never decoded and re-encoded.

Durability: the spool file is the durable record of an acknowledged instance. Before 0x0000
goes out the file is fsynced under a temporary name, renamed, and its folder fsynced (two
fsyncs). Its store row is then committed with ``synchronous=NORMAL`` (no fsync of its own:
:meth:`Store.add_instance` with ``file_is_durable``), which survives a crash of the process;
after a power loss the last rows may be gone, and :func:`recover`, run at every start, adds
every spool file the store does not know. So a crash at any point loses no acknowledged
instance: before the rename nothing was acknowledged (a leftover temporary file is deleted);
after it the file is complete and durable, and the row is either there or redone from it.

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
own called AE title are accepted; others get A-ASSOCIATE-RJ (permanent, service user, "calling
AE title not recognised" or "called AE title not recognised") and a log line. With TLS, the
handshake runs in the connection's own thread (never in the accept loop), and a failed
handshake (e.g. no trusted client certificate) closes the connection and is logged.

Logs carry AE titles, addresses and UIDs, never patient names or IDs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import sqlite3
import ssl
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from qsmnode import __version__
from qsmnode.dicom.headers import MR_SOP_CLASSES
from qsmnode.node import pynetdicom_compat as compat
from qsmnode.node.config import Settings
from qsmnode.node.spool import MIB, Spool, SpoolError, is_uid
from qsmnode.node.store import InstanceRecord, Store, StoreError

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'qsmnode/receiver').int}"
IMPLEMENTATION_VERSION_NAME = f"QSMNODE_{__version__}"[:16]

SPOOL_DIRNAME = "spool"
QUARANTINE_DIRNAME = "quarantine"

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
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07
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


# ------------------------------------------------------------------------------------------------
# Parsing: structure check and the few attributes the store needs


class DatasetError(ValueError):
    """The received dataset cannot be parsed. The message names the reason in few words (it
    becomes the Error Comment, 64 characters at most); ``offset`` is where, when known."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 64
_PIXELS_AND_AFTER = 0x7FE00008  # (7FE0,0008) Float Pixel Data and later
_KNOWN_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """Walks the element structure of an encoded dataset without decoding values.

    Checks that every length fits in the bytes received and every undefined-length sequence
    or item ends with its delimiter: this catches truncated and garbled payloads, which
    pydicom reads without complaint when it stops before the pixel data.

    On the way it notes where the top-level elements in ``wanted`` are (``found``: tag to VR,
    value offset and length; up to the pixel data, as pydicom reads the header), and whether it
    met anything that pydicom might read otherwise (``unusual``: a VR pydicom does not know, a
    wanted tag twice), so that :func:`inspect_dataset` can read the header without a second
    pass in most cases.
    """

    def __init__(self, data: bytes | memoryview, implicit: bool, little: bool,
                 wanted: frozenset[int] = frozenset()) -> None:
        self.data = memoryview(data)
        self.implicit = implicit
        order = "<" if little else ">"
        self._tag_length = struct.Struct(order + "HHL")  # implicit VR, and item tags
        self._tag_vr_length = struct.Struct(order + "HH2sH")  # explicit VR, short length
        self._length = struct.Struct(order + "L")
        self.wanted = wanted
        self.found: dict[int, tuple[bytes | None, int, int]] = {}
        self.unusual = False

    def fail(self, what: str, pos: int) -> DatasetError:
        return DatasetError(what, pos)

    def header(self, pos: int, end: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Tag, VR (None when implicit or an item tag), value length, header size."""
        if pos + 8 > end:
            raise self.fail("truncated: element header cut short", pos)
        if implicit:
            group, element, length = self._tag_length.unpack_from(self.data, pos)
            return group << 16 | element, None, length, 8
        group, element, vr, length = self._tag_vr_length.unpack_from(self.data, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            return tag, None, self._length.unpack_from(self.data, pos + 4)[0], 8
        if vr not in _KNOWN_VRS:
            if not (vr.isalpha() and vr.isupper()):
                raise self.fail(f"corrupt: {_tag_text(tag)} has no valid VR", pos)
            self.unusual = True
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise self.fail("truncated: element header cut short", pos)
            return tag, vr, self._length.unpack_from(self.data, pos + 8)[0], 12
        return tag, vr, length, 8

    def elements(self, pos: int, end: int, implicit: bool, depth: int, in_item: bool) -> int:
        """Walk elements from ``pos``; inside an undefined-length item stop after its end."""
        if depth > _MAX_DEPTH:
            raise self.fail("corrupt: sequences nested too deep", pos)
        wanted = self.wanted if depth == 0 else frozenset()
        while pos < end:
            tag, vr, length, size = self.header(pos, end, implicit)
            if tag == _ITEM_END:
                if not in_item:
                    raise self.fail("corrupt: item delimiter outside an item", pos)
                return pos + 8
            if tag in (_ITEM, _SEQUENCE_END):
                raise self.fail(f"corrupt: unexpected {_tag_text(tag)}", pos)
            pos += size
            if tag in wanted:
                if tag in self.found:
                    self.unusual = True  # twice: leave it to pydicom
                self.found[tag] = (vr, pos, length)
            elif tag >= _PIXELS_AND_AFTER and depth == 0:
                wanted = frozenset()  # the header is what comes before the pixel data
            if length == _UNDEFINED:
                fragments = tag == 0x7FE00010 or vr in (b"OB", b"OW")
                # an undefined-length UN is a sequence encoded in implicit VR little endian
                pos = self.items(pos, end, implicit or vr == b"UN", depth + 1, fragments)
            elif pos + length > end:
                raise self.fail(
                    f"truncated: {_tag_text(tag)} needs {length} bytes, {end - pos} left", pos
                )
            else:
                pos += length
        if in_item:
            raise self.fail("truncated: item without its delimiter", pos)
        return pos

    def items(self, pos: int, end: int, implicit: bool, depth: int, fragments: bool) -> int:
        """Walk the items of an undefined-length sequence; return the position after it."""
        while True:
            if pos + 8 > end:
                raise self.fail("truncated: sequence without its delimiter", pos)
            tag, _, length, _ = self.header(pos, end, True)
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise self.fail(f"corrupt: expected an item, found {_tag_text(tag)}", pos - 8)
            if length == _UNDEFINED:
                if fragments:
                    raise self.fail("corrupt: pixel data fragment of undefined length", pos - 8)
                pos = self.elements(pos, end, implicit, depth + 1, in_item=True)
            elif pos + length > end:
                raise self.fail(f"truncated: item needs {length} bytes, {end - pos} left", pos)
            else:
                pos += length


def _encoding(transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a transfer syntax; encapsulated ones are explicit LE."""
    if transfer_syntax == ImplicitVRLittleEndian:
        return True, True
    if transfer_syntax == ExplicitVRBigEndian:
        return False, False
    return False, True


_INFLATE_FLOOR = 256 * MIB
_INFLATE_RATIO = 64


def _inflate_limit(deflated_size: int) -> int:
    """The most a deflated dataset of ``deflated_size`` bytes may inflate to: 256 MiB, or 64
    times its size when that is more. Real datasets stay far below (a blank image is all the
    64x room is for); a deflate bomb (about 1000:1) is refused before it takes the memory."""
    return max(_INFLATE_FLOOR, _INFLATE_RATIO * deflated_size)


def _inflate(payload: bytes | memoryview) -> bytes:
    limit = _inflate_limit(len(payload))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise DatasetError(f"corrupt: deflated data does not inflate ({exc})") from None
    if len(data) > limit:
        raise DatasetError(f"too large: deflated data inflates beyond {limit // MIB} MiB")
    if not inflater.eof:
        raise DatasetError("truncated: deflated data cut short")
    return data


_HEADER_TAGS: tuple[int, ...] = (
    0x00080005,  # SpecificCharacterSet
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080060,  # Modality
    0x0008103E,  # SeriesDescription
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
    0x00200011,  # SeriesNumber
    0x00200013,  # InstanceNumber
    0x00201002,  # ImagesInAcquisition
    0x00280008,  # NumberOfFrames
)


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of a received instance that the store records."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None
    series_uid: str | None
    series_number: int | None
    instance_number: int | None
    number_of_frames: int | None
    images_in_acquisition: int | None
    modality: str | None
    series_description: str | None


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    return str(value).strip(" \x00") or None


def _int(ds: Dataset, keyword: str) -> int | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        return int(float(text.split("\\")[0]))
    except ValueError:
        return None


def header_of(ds: Dataset) -> InstanceHeader:
    """The recorded attributes of a (partially read) dataset; absent or invalid ones are None."""
    return InstanceHeader(
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        number_of_frames=_int(ds, "NumberOfFrames"),
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        modality=_text(ds, "Modality"),
        series_description=_text(ds, "SeriesDescription"),
    )


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) >= _PIXELS_AND_AFTER


# The dictionary VR of each header tag, and the values read without pydicom: printable ASCII
# with no backslash (one value, no character set escapes), and for IS a plain integer.
_HEADER_VRS = {
    0x00080005: b"CS", 0x00080016: b"UI", 0x00080018: b"UI", 0x00080060: b"CS",
    0x0008103E: b"LO", 0x0020000D: b"UI", 0x0020000E: b"UI", 0x00200011: b"IS",
    0x00200013: b"IS", 0x00201002: b"IS", 0x00280008: b"IS",
}
_WANTED = frozenset(_HEADER_TAGS)
_PLAIN_TEXT = re.compile(rb"[\x00\x20-\x5b\x5d-\x7e]*")
_PLAIN_INT = re.compile(r"[+-]?[0-9]{1,18}")


def _plain_header(data: memoryview, found: dict[int, tuple[bytes | None, int, int]],
                  ) -> InstanceHeader | None:
    """The header from the values the walker found, when they are all plain (see above);
    None when pydicom must read them (it gives the same result for plain values)."""
    text: dict[int, str | None] = {}
    for tag, (vr, offset, length) in found.items():
        if (vr is not None and vr != _HEADER_VRS[tag]) or length == _UNDEFINED:
            return None
        raw = data[offset:offset + length].tobytes()
        if not _PLAIN_TEXT.fullmatch(raw):
            return None
        text[tag] = raw.decode("ascii").strip(" \x00") or None

    def integer(tag: int) -> int | None:
        value = text.get(tag)
        if value is None:
            return None
        if not _PLAIN_INT.fullmatch(value):
            raise LookupError  # not plain: let pydicom read it
        return int(value)

    try:
        return InstanceHeader(
            sop_class_uid=text.get(0x00080016),
            sop_instance_uid=text.get(0x00080018),
            study_uid=text.get(0x0020000D),
            series_uid=text.get(0x0020000E),
            series_number=integer(0x00200011),
            instance_number=integer(0x00200013),
            number_of_frames=integer(0x00280008),
            images_in_acquisition=integer(0x00201002),
            modality=text.get(0x00080060),
            series_description=text.get(0x0008103E),
        )
    except LookupError:
        return None


def inspect_dataset(payload: bytes | memoryview, transfer_syntax: str) -> InstanceHeader:
    """Check the structure of an encoded dataset (no file meta) and read its header.

    One walk over the elements checks the structure and finds the header values; pydicom reads
    them only when they are not plain ASCII. Raises :class:`DatasetError` naming the reason
    when the dataset cannot be parsed.
    """
    if not payload:
        raise DatasetError("empty dataset")
    data = _inflate(payload) if transfer_syntax == DeflatedExplicitVRLittleEndian else payload
    implicit, little = _encoding(transfer_syntax)
    walker = _Walker(data, implicit, little, _WANTED)
    try:
        walker.elements(0, len(data), implicit, 0, in_item=False)
    except struct.error as exc:  # pragma: no cover - bounds are checked before unpacking
        raise DatasetError(f"corrupt: {exc}") from None
    if not walker.unusual:
        header = _plain_header(walker.data, walker.found)
        if header is not None:
            return header
    try:
        ds = read_dataset(BytesIO(data), implicit, little, stop_when=_stop_at_pixels,
                          specific_tags=list(_HEADER_TAGS))
        return header_of(ds)
    except Exception as exc:  # pydicom raises many types on garbage
        raise DatasetError(f"unreadable: {type(exc).__name__}: {exc}") from None


# ------------------------------------------------------------------------------------------------
# File meta information


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in explicit VR little endian."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def file_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the encoded File Meta Information of a received instance (the
    same bytes pydicom writes for them). Raises UnicodeEncodeError for non-ASCII text."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),  # FileMetaInformationVersion
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        _meta_element(0x0016, b"AE", _padded(source_ae, b" ")),
    ))
    length = _meta_element(0x0000, b"UL", struct.pack("<L", len(body)))
    return _PREAMBLE + length + body


# ------------------------------------------------------------------------------------------------
# Who may associate


@dataclass(frozen=True)
class Refusal:
    """Why an association request is refused: the A-ASSOCIATE-RJ diagnostic and the log text."""

    diagnostic: int
    reason: str


def _normal_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _resolve(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    ip = _normal_ip(host)
    if ip is not None:
        return {ip}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("cannot resolve allowed sender host %s: %s", host, exc)
        return set()
    return {ip for info in infos if (ip := _normal_ip(str(info[4][0]))) is not None}


@dataclass(frozen=True)
class AccessPolicy:
    """Which associations are accepted: our called AE title, and the allowed calling AE titles
    (each optionally tied to hosts). An empty ``senders`` mapping accepts any calling AE.

    ``senders`` maps a calling AE title to its hosts (empty: any address). Hostnames are
    resolved at each request, so DNS changes apply without a restart.
    """

    called_ae: str
    senders: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        listener = settings.listener
        return cls(listener.ae_title, {s.ae_title: s.hosts for s in listener.allowed_senders})

    def check(self, calling_ae: str, called_ae: str, address: str) -> Refusal | None:
        """None to accept, else the refusal."""
        calling, called = calling_ae.strip(), called_ae.strip()
        if called != self.called_ae:
            return Refusal(CALLED_AE_NOT_RECOGNISED,
                           f"called AE title {called!r} is not ours ({self.called_ae!r})")
        if not self.senders:
            return None
        if calling not in self.senders:
            return Refusal(CALLING_AE_NOT_RECOGNISED,
                           f"calling AE title {calling!r} is not an allowed sender")
        hosts = self.senders[calling]
        if not hosts:
            return None
        peer = _normal_ip(address)
        if peer is not None and any(peer in _resolve(host) for host in hosts):
            return None
        return Refusal(CALLING_AE_NOT_RECOGNISED,
                       f"calling AE title {calling!r} is not allowed from {address}")


# ------------------------------------------------------------------------------------------------
# TLS


class _LazyHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets defer the handshake.

    pynetdicom wraps accepted sockets in its accept loop, where a default handshake would let
    one slow or silent client stall every other connection. The receiver runs the handshake in
    the connection's thread instead (see ``Receiver._on_conn_open``).
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context from ``[listener.tls]``, or None when TLS is off."""
    tls = settings.listener.tls
    if not tls.enabled:
        return None
    context = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file is not None and tls.key_file is not None  # checked by the config
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=tls.ca_file)
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


# ------------------------------------------------------------------------------------------------
# The receiver


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
        compat.check_version()
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
        sock = event.assoc.dul.socket
        raw = sock.socket if sock is not None else None
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
            if _stored_dataset_is(self.state_dir / existing.path, payload):
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
            meta = event.file_meta
            meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
            meta.SourceApplicationEntityTitle = calling_ae
            prefix = _PREAMBLE + encode_file_meta(meta)
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
        record = _record(header, sop_class, sop_uid, transfer_syntax,
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


def _record(header: InstanceHeader, sop_class: str, sop_uid: str, transfer_syntax: str,
            path: str, size: int, calling_ae: str, peer: str, at: float) -> InstanceRecord:
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


# ------------------------------------------------------------------------------------------------
# Recovery after a crash


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` found: temp files removed, spool files added to the store, files
    quarantined (unreadable), and store entries whose file is missing."""

    temp_files_removed: int
    adopted: int
    quarantined: int
    missing: tuple[str, ...]


def recover(store: Store, spool: Spool, state_dir: Path) -> Recovery:
    """Make the spool and the store agree after a crash.

    A crash between a file's rename and its commit leaves a complete, fsynced file that the
    store does not know (and that the scanner was not told about); so does a power loss that
    takes the last instance rows, committed without fsync (acknowledged: see the module
    docstring). Either way the file is added to the store. Temporary files are deleted. A
    stored instance whose file is missing is reported.
    """
    removed = spool.remove_temp_files()
    known = store.instance_paths()
    adopted = quarantined = 0
    for path in sorted(spool.instance_files()):
        relative = path.relative_to(state_dir).as_posix()
        if relative in known:
            continue
        try:
            record = _record_of_file(path, relative)
        except Exception as exc:  # pydicom raises many types on a damaged file meta
            folder = state_dir / QUARANTINE_DIRNAME
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / path.name
            n = 1
            while target.exists():  # an earlier file of the same name stays too
                target = folder / f"{path.stem}.{n}{path.suffix}"
                n += 1
            os.replace(path, target)
            log.error("moved unreadable spool file %s to %s: %s", relative, target, exc)
            quarantined += 1
            continue
        store.add_instance(record)
        adopted += 1
    present = {p.relative_to(state_dir).as_posix() for p in spool.instance_files()}
    missing = tuple(sorted(known - present))
    for relative in missing:
        log.error("stored instance file is missing: %s", relative)
    if removed or adopted or quarantined:
        log.info("recovery: %d temporary files removed, %d spool files added to the store, "
                 "%d quarantined", removed, adopted, quarantined)
    return Recovery(removed, adopted, quarantined, missing)


def _record_of_file(path: Path, relative: str) -> InstanceRecord:
    """The record of a spool file. Its dataset is read as the receiver read it when it came in
    (:func:`inspect_dataset`, not pydicom's reader, which refuses some datasets the receiver
    accepts), so that whatever was acknowledged is adopted again."""
    data = path.read_bytes()
    start = _dataset_offset(data)
    meta = read_file_meta_info(path)
    transfer_syntax = _text(meta, "TransferSyntaxUID")
    if transfer_syntax is None:
        raise DatasetError("file meta without a transfer syntax")
    header = inspect_dataset(memoryview(data)[start:], transfer_syntax)
    sop_uid = header.sop_instance_uid or _text(meta, "MediaStorageSOPInstanceUID")
    sop_class = _text(meta, "MediaStorageSOPClassUID") or header.sop_class_uid
    if (header.study_uid is None or header.series_uid is None or sop_uid is None
            or sop_class is None or path.stem != sop_uid):
        raise DatasetError("identifying UIDs missing or not matching the file name")
    calling_ae = _text(meta, "SourceApplicationEntityTitle") or ""
    return _record(header, sop_class, sop_uid, transfer_syntax, relative, len(data),
                   calling_ae, "", path.stat().st_mtime)


_META_GROUP_LENGTH = b"DICM\x02\x00\x00\x00UL\x04\x00"  # after the preamble


def _dataset_offset(head: bytes) -> int:
    """Where the dataset starts in a spool file that begins with ``head`` (at least its first
    144 bytes): after the preamble and the file meta, whose group length comes first."""
    if len(head) < 144 or head[128:140] != _META_GROUP_LENGTH:
        raise DatasetError("file meta without its group length")
    return 144 + int(struct.unpack_from("<L", head, 140)[0])


def _stored_dataset_is(path: Path, payload: bytes | memoryview) -> bool:
    """Whether the spool file at ``path`` holds exactly ``payload`` as its dataset (False too
    when it cannot be read)."""
    view = memoryview(payload).cast("B")
    try:
        with path.open("rb") as file:
            file.seek(_dataset_offset(file.read(144)))
            done = 0
            while chunk := file.read(MIB):
                if view[done:done + len(chunk)] != chunk:
                    return False
                done += len(chunk)
        return done == len(view)
    except (OSError, DatasetError):
        return False


# ------------------------------------------------------------------------------------------------
# Running the node


def quiet_library_loggers(level: int) -> None:
    """Keep pynetdicom and pydicom at WARNING or above: their chatter can quote datasets."""
    for name in _LOGGERS_KEPT_QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
