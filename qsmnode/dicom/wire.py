"""DICOM on the wire: the received encoded dataset, checked and read without decoding it, and
the Part 10 file around it.

The receiver keeps every instance **as received**: the dataset bytes exactly as they came off
the network, behind a Part 10 preamble and File Meta Information. This module holds the DICOM
encoding side of that, so the service (``qsmnode/node``) never parses DICOM bytes itself:

- :func:`inspect_dataset` walks the element structure of an encoded dataset (no file meta) in
  any of the uncompressed transfer syntaxes (deflated ones are inflated first, within
  :func:`_inflate_limit`): every length must fit and every undefined-length sequence and item
  must end with its delimiter, which catches truncated and garbled payloads. On the way it reads
  the few attributes the store records (:class:`InstanceHeader`). A dataset that cannot be
  parsed raises :class:`DatasetError`, whose message (64 characters at most) names the reason.
- :func:`file_prefix` and :func:`file_prefix_from_meta`: the preamble, ``DICM`` and the encoded
  File Meta Information written before the dataset.
- :func:`dataset_offset`, :func:`file_holds_dataset` and :func:`read_part10`: the dataset of a
  file written so, found again (a duplicate's comparison, crash recovery).

Nothing here touches the network, the spool or the store.
"""

from __future__ import annotations

import re
import struct
import uuid
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR

from qsmnode import __version__

IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'qsmnode/receiver').int}"
"""The node's Implementation Class UID (file meta and association negotiation)."""
IMPLEMENTATION_VERSION_NAME = f"QSMNODE_{__version__}"[:16]

MIB = 1024 * 1024


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


def file_prefix_from_meta(meta: FileMetaDataset, source_ae: str) -> bytes:
    """:func:`file_prefix` for file meta whose text is not ASCII (pydicom encodes it): ``meta``
    gets the node's implementation identity and ``source_ae``, then is encoded in explicit VR
    little endian after the preamble."""
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = source_ae
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta)
    return _PREAMBLE + buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# Part 10 files written so, read again


_META_GROUP_LENGTH = b"DICM\x02\x00\x00\x00UL\x04\x00"  # after the preamble


def dataset_offset(head: bytes) -> int:
    """Where the dataset starts in a file that begins with ``head`` (at least its first 144
    bytes): after the preamble and the file meta, whose group length comes first."""
    if len(head) < 144 or head[128:140] != _META_GROUP_LENGTH:
        raise DatasetError("file meta without its group length")
    return 144 + int(struct.unpack_from("<L", head, 140)[0])


def file_holds_dataset(path: Path, payload: bytes | memoryview) -> bool:
    """Whether the Part 10 file at ``path`` holds exactly ``payload`` as its dataset (False too
    when it cannot be read)."""
    view = memoryview(payload).cast("B")
    try:
        with path.open("rb") as file:
            file.seek(dataset_offset(file.read(144)))
            done = 0
            while chunk := file.read(MIB):
                if view[done:done + len(chunk)] != chunk:
                    return False
                done += len(chunk)
        return done == len(view)
    except (OSError, DatasetError):
        return False


@dataclass(frozen=True)
class Part10Instance:
    """What a Part 10 file written by the receiver says of its instance: the dataset's header
    and, from the file meta, the transfer syntax, media storage UIDs and source AE title."""

    header: InstanceHeader
    transfer_syntax: str
    media_sop_class_uid: str | None
    media_sop_instance_uid: str | None
    source_ae: str | None
    size: int


def read_part10(path: Path) -> Part10Instance:
    """Read a Part 10 file as the receiver read its dataset when it came in
    (:func:`inspect_dataset`, not pydicom's reader, which refuses some datasets the receiver
    accepts). Raises :class:`DatasetError`, or pydicom's errors on a damaged file meta."""
    data = path.read_bytes()
    start = dataset_offset(data)
    meta = read_file_meta_info(path)
    transfer_syntax = _text(meta, "TransferSyntaxUID")
    if transfer_syntax is None:
        raise DatasetError("file meta without a transfer syntax")
    header = inspect_dataset(memoryview(data)[start:], transfer_syntax)
    return Part10Instance(
        header=header, transfer_syntax=transfer_syntax,
        media_sop_class_uid=_text(meta, "MediaStorageSOPClassUID"),
        media_sop_instance_uid=_text(meta, "MediaStorageSOPInstanceUID"),
        source_ae=_text(meta, "SourceApplicationEntityTitle"), size=len(data),
    )
