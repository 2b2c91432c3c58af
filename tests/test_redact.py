"""Dataset values kept out of error text (qsmnode.node.redact)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset

from qsmnode.node.redact import Redactor, dataset_values


def write(path: Path, **values: object) -> str:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def test_names_are_redacted_by_component_and_free_text_only_whole(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", PatientName="Kestrel^Finch", PatientID="ZQ12345",
                 StudyDescription="Brain QSM research", InstitutionName="Canary Institute",
                 PatientBirthDate="19701301")
    redact = Redactor(dataset_values([path]))
    text = redact("cannot use 'Kestrel^Finch' (Finch) for ZQ12345, born 19701301: Brain QSM "
                  "research at Canary Institute")
    assert text == ("cannot use '<PatientName>' (<PatientName>) for <PatientID>, born "
                    "<PatientBirthDate>: <StudyDescription> at <InstitutionName>")
    # the words of a description are the words of ordinary messages: they stay
    assert redact("QSM needs a 3-D volume of the Brain") == "QSM needs a 3-D volume of the Brain"


def test_a_value_inside_a_longer_word_or_number_is_left(tmp_path: Path) -> None:
    path = write(tmp_path / "a.dcm", PatientID="12345", PatientName="Finch")
    redact = Redactor(dataset_values([path]))
    assert redact("series 123456 of Finchley; id 12345.") == (
        "series 123456 of Finchley; id <PatientID>.")


def test_reading_the_values_logs_none_of_them(tmp_path: Path, caplog) -> None:
    """A PatientID a scanner declared IS (explicit VR): pydicom's validation of it on reading
    both warns and logs (``pydicom`` logger) with the value quoted; reading the values to
    redact must do neither (a worker child reads them with its log already open)."""
    import logging
    import warnings

    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    path = write(tmp_path / "a.dcm", PatientName="Kestrel^Finch")
    ds = pydicom.dcmread(path)
    ds[0x00100020] = RawDataElement(Tag(0x00100020), "IS", 8, b"ZQ40417 ", 0, False, True)
    ds.save_as(path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        values = dataset_values([path])
    assert values["ZQ40417"] == "PatientID"
    assert "ZQ40417" not in caplog.text and not [w for w in caught if "ZQ40417" in str(w.message)]
