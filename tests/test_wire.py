"""DICOM on the wire (``qsmnode.dicom.wire``): the structure check and header of a received
dataset, the inflate limit, and the Part 10 file the receiver writes around the dataset.

The receiver's behaviour with these (statuses, spool, recovery) is in ``test_receiver.py``.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from qsmnode.dicom import wire
from qsmnode.dicom.headers import MR_IMAGE_STORAGE
from qsmnode.dicom.wire import (
    IMPLEMENTATION_CLASS_UID,
    DatasetError,
    dataset_offset,
    file_holds_dataset,
    file_prefix,
    file_prefix_from_meta,
    inspect_dataset,
    read_part10,
)
from tests.nodeutil import write_study


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One classic MR image of a small simulated Siemens study."""
    return write_study(tmp_path_factory.mktemp("study"), "siemens", 3)[0]


def _encode(ds: pydicom.Dataset, syntax: pydicom.uid.UID = ExplicitVRLittleEndian) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax.is_little_endian
    buffer.is_implicit_VR = syntax.is_implicit_VR
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _encodings(source: Path) -> dict[str, tuple[bytes, str]]:
    """The same dataset in four transfer syntaxes, with an undefined-length sequence added."""
    ds = pydicom.dcmread(source)
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-A0100", "SRT", "Brain"
    ds.AnatomicRegionSequence = pydicom.Sequence([item])
    ds["AnatomicRegionSequence"].is_undefined_length = True
    out: dict[str, tuple[bytes, str]] = {}
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        out[syntax.name] = (_encode(ds, syntax), str(syntax))
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    explicit = out[ExplicitVRLittleEndian.name][0]
    deflated = deflater.compress(explicit) + deflater.flush()
    out[DeflatedExplicitVRLittleEndian.name] = (deflated, str(DeflatedExplicitVRLittleEndian))
    return out


def _uids_only(sop_uid: str) -> bytes:
    """The UIDs of a minimal MR instance in explicit VR little endian (no pixel data)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MR_IMAGE_STORAGE, sop_uid, "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.1"
    return _encode(ds)


def _pixel_data_header(length: int) -> bytes:
    return struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", length)


def test_inspect_dataset_reads_uids_and_refuses_every_truncation(source: Path) -> None:
    expected = pydicom.dcmread(source, stop_before_pixels=True)
    for name, (data, syntax) in _encodings(source).items():
        header = inspect_dataset(data, syntax)
        assert header.sop_instance_uid == expected.SOPInstanceUID, name
        assert header.series_uid == expected.SeriesInstanceUID, name
        assert header.study_uid == expected.StudyInstanceUID, name
        assert header.series_number == expected.SeriesNumber, name
        cuts = sorted({*range(1, len(data), max(1, len(data) // 97)), len(data) - 1})
        if syntax == DeflatedExplicitVRLittleEndian:
            cuts = cuts[::8]
        for cut in cuts:
            with pytest.raises(DatasetError, match=r"^(truncated|corrupt|unreadable)"):
                inspect_dataset(data[:cut], syntax)
    with pytest.raises(DatasetError, match="corrupt"):
        inspect_dataset(b"this is not DICOM, not at all",
                        str(expected.file_meta.TransferSyntaxUID))
    with pytest.raises(DatasetError, match="empty"):
        inspect_dataset(b"", ImplicitVRLittleEndian)


def test_deflate_bombs_are_refused_before_they_take_the_memory(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deflated dataset may inflate to at most max(256 MiB, 64 x its size): a bomb (zeros
    deflate about 1000:1) is refused with a reason, having taken no more memory than that."""
    pixels = 64 * 2**20
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    parts = [deflater.compress(_uids_only("1.2.3.1.1") + _pixel_data_header(pixels))]
    zeros = bytes(2**20)
    parts += [deflater.compress(zeros) for _ in range(pixels // len(zeros))]
    bomb = b"".join(parts) + deflater.flush()
    syntax = str(DeflatedExplicitVRLittleEndian)
    assert len(bomb) < pixels // 500  # so 64 x its size is < 64 MiB / 8
    # the floor of 256 MiB made small, for a test that needs not take 256 MiB
    monkeypatch.setattr(wire, "_INFLATE_FLOOR", 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"^too large: deflated data inflates beyond"):
            inspect_dataset(bomb, syntax)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2**20, peak  # not the 64 MiB it inflates to
    small = _uids_only("1.2.3.1.2") + _pixel_data_header(64) + bytes(64)
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert inspect_dataset(deflater.compress(small) + deflater.flush(), syntax).series_uid \
        == "1.2.3.1"


def test_file_prefix_is_what_pydicom_writes() -> None:
    """The ASCII fast path writes the same file meta bytes as pydicom does (the fallback)."""
    sop_uid, syntax = "1.2.3.1.7", str(ExplicitVRLittleEndian)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE_STORAGE, sop_uid
    meta.TransferSyntaxUID = syntax
    for ae in ("SCANNER7T", "ODD"):  # even and odd lengths: the padding
        prefix = file_prefix(MR_IMAGE_STORAGE, sop_uid, syntax, ae)
        assert prefix[:132] == b"\x00" * 128 + b"DICM"
        assert prefix == file_prefix_from_meta(meta, ae)
    with pytest.raises(UnicodeEncodeError):
        file_prefix(MR_IMAGE_STORAGE, sop_uid, syntax, "SCANNÉR")


def test_a_part10_file_is_read_back_as_written(tmp_path: Path) -> None:
    sop_uid = "1.2.3.1.5"
    payload = _uids_only(sop_uid) + _pixel_data_header(64) + bytes(64)
    prefix = file_prefix(MR_IMAGE_STORAGE, sop_uid, str(ExplicitVRLittleEndian), "SCANNER7T")
    path = tmp_path / f"{sop_uid}.dcm"
    path.write_bytes(prefix + payload)

    assert dataset_offset(prefix) == len(prefix)
    instance = read_part10(path)
    assert instance.header.sop_instance_uid == instance.media_sop_instance_uid == sop_uid
    assert instance.header.sop_class_uid == instance.media_sop_class_uid == MR_IMAGE_STORAGE
    assert (instance.header.study_uid, instance.header.series_uid) == ("1.2.3", "1.2.3.1")
    assert instance.transfer_syntax == ExplicitVRLittleEndian
    assert instance.source_ae == "SCANNER7T" and instance.size == len(prefix) + len(payload)
    assert pydicom.dcmread(path).file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID

    assert file_holds_dataset(path, payload)
    assert not file_holds_dataset(path, payload[:-1] + b"\x01")
    assert not file_holds_dataset(path, payload + b"\x00\x00")
    assert not file_holds_dataset(tmp_path / "gone.dcm", payload)
    with pytest.raises(DatasetError, match="group length"):
        dataset_offset(payload)
