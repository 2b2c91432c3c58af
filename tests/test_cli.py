"""The command line: simulate to a folder, send by C-STORE to dcmtk's storescp, round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmnode.demo.pacs import free_port
from qsmnode.dicom.nifti import BidsError, read_megre
from tests.conftest import REPO, require_tool
from tests.deliveryutil import DroppingStoreSCP


def qsmnode(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qsmnode", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )



def test_cli_lists_the_simulators_sizes_and_styles() -> None:
    from qsmnode.cli import SIM_SIZES, SIM_STYLES
    from qsmnode.sim.scanner import PRESETS
    from qsmnode.sim.vendor_dicom import STYLES

    assert set(SIM_SIZES) == set(PRESETS) and set(SIM_STYLES) == set(STYLES)


def test_version_and_console_script() -> None:
    result = qsmnode("--version")
    assert result.returncode == 0 and result.stdout.startswith("qsmnode ")
    script = Path(sys.executable).parent / "qsmnode"
    assert script.exists(), "the qsmnode console script is installed"
    assert subprocess.run([script, "--version"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    result = qsmnode("simulate", "--size", "tiny", "--seed", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_simulate_writes_dicom_truth_and_nifti(tiny_study: Path) -> None:
    dicoms = list((tiny_study / "dicom").rglob("*.dcm"))
    assert len(dicoms) == 40 * 4 * 2  # slices × echoes × (magnitude, phase)
    chi = nib.load(tiny_study / "truth" / "chi_ppm.nii.gz")
    gre = read_megre(tiny_study / "nifti")
    assert np.allclose(chi.affine, gre.affine)
    assert gre.n_echoes == 4 and gre.field_strength_t == 7.0
    assert gre.phase.min() >= -np.pi and gre.phase.max() < np.pi
    assert (tiny_study / "truth" / "truth.json").exists()


def test_bids_reader_names_the_problem(tiny_study: Path, tmp_path: Path) -> None:
    for path in (tiny_study / "nifti").iterdir():
        if "echo-2_part-phase" not in path.name:
            (tmp_path / path.name).symlink_to(path)
    with pytest.raises(BidsError, match="echo 2 has no part-phase file"):
        read_megre(tmp_path)


def test_simulate_sends_to_dcmtk_storescp(tmp_path: Path) -> None:
    storescp = require_tool("storescp", "dcmtk")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    server = subprocess.Popen(  # TCP_NODELAY: else each response waits ~40 ms (delayed ACK)
        [storescp, "--aetitle", "QSMNODE", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        time.sleep(0.5)
        result = qsmnode("simulate", "--size", "tiny", "--style", "philips",
                         "--send", f"127.0.0.1:{port}", "--out", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        assert "sent 320 of 320 instances" in result.stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert len(list(received.iterdir())) == 320


def _sop_uids(paths: list[Path]) -> dict[Path, str]:
    import pydicom

    return {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_a_dropped_association_is_resumed_from_the_first_unacknowledged_file(
        tiny_study: Path) -> None:
    from qsmnode.node.storescu import send_paths

    files = sorted((tiny_study / "dicom").rglob("*.dcm"))[:40]
    uids = _sop_uids(files)
    peer = DroppingStoreSCP(drop_at=15, drops=2)
    try:
        progress: list[int] = []
        report = send_paths(files, "127.0.0.1", peer.port, "QSMNODE", "SCANNER7T",
                            timeout_s=30, retry_delay_s=0.05,
                            on_sent=lambda done, total: progress.append(done))
    finally:
        peer.close()
    assert report.ok, report.errors
    assert report.associations == 3
    assert set(report.statuses) == set(files)
    assert peer.stored == set(uids.values())
    assert progress == list(range(1, 41))  # every file acknowledged once


def test_a_send_that_keeps_being_dropped_names_exactly_the_files_not_stored(
        tiny_study: Path) -> None:
    from qsmnode.node.storescu import send_paths

    files = sorted((tiny_study / "dicom").rglob("*.dcm"))[:40]
    uids = _sop_uids(files)
    peer = DroppingStoreSCP(drop_at=5, drops=100)
    try:
        report = send_paths(files, "127.0.0.1", peer.port, "QSMNODE", "SCANNER7T",
                            timeout_s=30, reassociations=2, retry_delay_s=0.05)
    finally:
        peer.close()
    assert not report.ok and report.associations == 3
    not_stored = {p for p, uid in uids.items() if uid not in peer.stored}
    assert set(report.errors) == not_stored
    assert len(not_stored) == 40 - 3 * 4  # four acknowledged per association
    assert all("association was lost" in e or "no response" in e
               for e in report.errors.values()), report.errors
    assert all(report.statuses[p] == 0 for p in set(files) - not_stored)


def test_send_to_nobody_is_a_clear_error(tmp_path: Path) -> None:
    result = qsmnode("simulate", "--size", "tiny", "--send", f"127.0.0.1:{free_port()}",
                     "--out", str(tmp_path))
    assert result.returncode == 1
    assert "cannot connect to QSMNODE@127.0.0.1" in result.stderr
    assert "Connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_tables_show_control_characters_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """A series description from a peer may hold an escape sequence or a newline: the status
    table shows them as escapes, never acting on the operator's terminal."""
    from qsmnode.commands.status import table

    table(("SERIES", "DESCRIPTION"), [("5", "gre\x1b[2J\x1b[31mred\nfake line")])
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("\n") == 2
    assert "gre\\x1b[2J\\x1b[31mred\\nfake line" in out


def test_status_shows_studies_by_accession_and_what_became_of_each_series(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`qsmnode status`: a study table by accession number, date, description and sending AE;
    a series passed over says why in its OUTCOME, and is not counted as a problem."""
    from qsmnode.cli import main
    from qsmnode.node.store import InstanceRecord, Store, StudyInfo

    state = tmp_path / "state"
    config = tmp_path / "qsmnode.toml"
    config.write_text(f'[paths]\nstate_dir = "{state}"\n')
    study = "1.2.826.0.1.3680043.10.999.7"
    with Store.in_state_dir(state) as store:
        for n, description in ((7, "func-bold_task-fa_run-1"), (8, "gre_me_qsm")):
            store.add_instance(InstanceRecord(
                sop_instance_uid=f"{study}.{n}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                study_uid=study, series_uid=f"{study}.{n}",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"spool/{n}.dcm", size=1, calling_ae="SCANNER7T", peer_address="127.0.0.1",
                received_at=1000.0 + n, series_number=n, series_description=description,
                modality="MR"))
            store.mark_series_complete(f"{study}.{n}", 1010.0)
        store.record_grouping(study, 2, [], [], 1020.0,
                              {f"{study}.7": "BOLD / fMRI (ImageType ORIGINAL\\PRIMARY\\FMRI)"},
                              StudyInfo(study, "ACC-88", "20220711", "120500", "Neuro 7T"))
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "problems: 0 open" in out
    [row] = [line for line in out.splitlines() if line.startswith("ACC-88")]
    assert "2022-07-11 12:05" in row and "Neuro 7T" in row and "SCANNER7T" in row
    [bold] = [line for line in out.splitlines() if line.startswith("7 ")]
    assert "passed over: BOLD / fMRI" in bold
    [other] = [line for line in out.splitlines() if line.startswith("8 ")]
    assert other.split()[-2] == "-"  # nothing became of it yet (not passed over)
    assert main(["status", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["studies"] == [{"study_uid": study, "accession_number": "ACC-88",
                                  "study_date": "20220711", "study_time": "120500",
                                  "study_description": "Neuro 7T", "senders": ["SCANNER7T"]}]
    assert report["series"][0]["passed_over"].startswith("BOLD")


def test_process_says_when_qsm_was_not_computed(tmp_path: Path) -> None:
    """``qsmnode process`` on a 2-D protocol with slice gaps: it says QSM was not computed and
    why, and writes the R2* objects (issue 13 item 4)."""
    from qsmnode.sim.scanner import preset, simulate
    from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom

    scan = preset("tiny", shape=(56, 68, 2), voxel_size_mm=(3.0, 3.0, 6.0),
                  centre_mm=(0.0, -18.0, 55.0))
    write_dicom(simulate(scan).gre, tmp_path / "in", "siemens",
                SimStudyInfo(seed=3, slice_thickness_mm=4.0, acquisition_type="2D"))
    done = qsmnode("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert ("series 5, 6: QSM was not computed: the slices have gaps (6 mm apart but 4 mm "
            "thick") in done.stderr
    assert "R2* and the M1 T2*-signal and thickness analysis are written instead" in done.stderr
    assert list((tmp_path / "out").rglob("*.dcm"))


def _slab_2d(out: Path, values: tuple[tuple[int, str, bytes], ...]) -> Path:
    """A 2-D multi-echo slab (quick: QSM is not computed) written to ``out`` with raw
    ``values`` (tag, VR, bytes as a careless scanner stores them) in every file."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from qsmnode.sim.scanner import preset, simulate
    from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom

    scan = preset("tiny", shape=(56, 68, 2), voxel_size_mm=(3.0, 3.0, 6.0),
                  centre_mm=(0.0, -18.0, 55.0))
    paths = write_dicom(simulate(scan).gre, out, "siemens",
                        SimStudyInfo(seed=3, slice_thickness_mm=4.0, acquisition_type="2D"))
    for path in paths:
        ds = pydicom.dcmread(path)
        for tag, vr, raw in values:
            ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
        ds.save_as(path)
    return out


_NAME, _MRN = b"Zqxfamily^Zqxgiven", b"ZQ40417 "
_QUOTED = (0x00100010, "PN", _NAME), (0x00100020, "IS", _MRN)
"""A PatientID the scanner declared IS (explicit VR): pydicom's reader warns quoting it."""


def _assert_no_value(*texts: str) -> None:
    for text in texts:
        for value in ("Zqxfamily", "Zqxgiven", "ZQ40417"):
            assert value not in text, (value, text)


def test_process_output_never_quotes_a_patient_value_pydicom_warns_of(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """In-process ``qsmnode process`` on files whose PatientID is declared IS: pydicom's
    reader warning quoted it (``Invalid value for VR IS: 'ZQ40417'``); now the output names
    the attribute (the header check) and carries no value, in stdout, stderr, the log and
    the warnings (issue 14)."""
    import logging
    import warnings

    from qsmnode.commands.process import run_process

    folder = _slab_2d(tmp_path / "in", _QUOTED)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        status = run_process(folder, tmp_path / "out")
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "PatientID not a valid value (left empty)" in err + caplog.text
    _assert_no_value(out, err, caplog.text, *(str(w.message) for w in caught))


def quoting_processor(loaded: object, files: list[str], *args: object,
                      **kwargs: object) -> tuple[dict[str, object], list[object]]:
    """A pipeline whose libraries quote the patient's values in a warning, in pydicom's log
    and in the error it raises (as highdicom's ``Unable to convert`` does)."""
    import logging
    import warnings

    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    name, mrn = str(ds.PatientName), ds.get_item("PatientID").value.decode().strip()
    warnings.warn(f"cannot use {name!r}", UserWarning, stacklevel=1)
    logging.getLogger("pydicom").warning("value %r of %s", mrn, "PatientID")
    logging.getLogger("highdicom.sr").warning("no %s", name)
    raise ValueError(f"Unable to convert {mrn!r} for {name}")


def test_process_redacts_what_its_libraries_quote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Warnings, library log records and the failure reason of an in-process run show
    ``<PatientName>``/``<PatientID>`` where a library quoted the values, as a worker
    child's do."""
    import logging
    import warnings

    from qsmnode.commands.process import run_process

    folder = _slab_2d(tmp_path / "in", _QUOTED)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        status = run_process(folder, tmp_path / "out",
                             processor=quoting_processor)
    out, err = capsys.readouterr()
    assert status == 1
    assert "failed: the input could not be handled (ValueError: Unable to convert " \
           "'<PatientID>' for <PatientName>)" in err, err
    assert "UserWarning: cannot use '<PatientName>'" in caplog.text, caplog.text
    assert "value '<PatientID>' of PatientID" in caplog.text
    assert "no <PatientName>" in caplog.text
    _assert_no_value(out, err, caplog.text, *(str(w.message) for w in caught))
