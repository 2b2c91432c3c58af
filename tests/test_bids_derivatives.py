"""One unit of work in this process (qsmnode.bids.derivatives), without a cluster: the
record, skipping finished work, failures named, and the file helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmnode.bids.derivatives import (
    Options,
    fingerprint,
    is_finished,
    process_acquisition,
    record_path,
    write_json,
    write_tsv,
)
from qsmnode.bids.layout import find_acquisitions
from qsmnode.dicom.nifti import write_megre
from qsmnode.sim.scanner import preset, simulate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bids")
    sim = simulate(preset("tiny", seed=8))
    write_megre(sim.gre, root / "sub-01" / "anat", "sub-01_run-1")
    write_megre(sim.gre, root / "sub-02" / "anat", "sub-02")
    broken = root / "sub-02" / "anat" / "sub-02_echo-2_part-phase_MEGRE.nii"
    broken.write_bytes(b"not a NIfTI file")
    return root


def test_a_finished_acquisition_is_skipped_until_its_inputs_or_options_change(
        dataset: Path, tmp_path: Path) -> None:
    layout = find_acquisitions(dataset, ["01"])
    (acquisition,) = layout.acquisitions
    options = Options()
    root = tmp_path / "qsmnode"
    assert not is_finished(root, acquisition, options)
    record = process_acquisition(acquisition, dataset, tmp_path, options)
    assert record["status"] == "done", record.get("error")
    assert record["acquisition"] == "sub-01_run-1" and record["entities"] == {"run": "1"}
    assert json.loads(record_path(root, acquisition).read_text())["status"] == "done"
    assert "sub-01/anat/sub-01_run-1_Chimap.nii.gz" in record["outputs"]
    assert is_finished(root, acquisition, options)
    assert not is_finished(root, acquisition, Options(m1=True))
    assert fingerprint(acquisition, options) != fingerprint(acquisition, Options(m1=True))
    # an output removed since: not finished
    (root / "sub-01/anat/sub-01_run-1_T2starmap.nii.gz").unlink()
    assert not is_finished(root, acquisition, options)


def test_an_unreadable_file_fails_its_acquisition_by_name(dataset: Path, tmp_path: Path) -> None:
    (acquisition,) = find_acquisitions(dataset, ["02"]).acquisitions
    record = process_acquisition(acquisition, dataset, tmp_path, Options())
    assert record["status"] == "failed"
    assert record["error"].startswith("sub-02: ") or record["error"].startswith(str(dataset))
    assert "sub-02_echo-2_part-phase_MEGRE.nii: not a readable NIfTI file" in record["error"]
    assert not is_finished(tmp_path / "qsmnode", acquisition, Options())
    assert not list((tmp_path / "qsmnode").glob("sub-02/anat/*.nii.gz"))


def test_json_and_tsv_helpers_write_bids_values(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": math.nan, "y": np.float32(1.5), "z": (1, 2),
                                     "p": tmp_path})
    assert json.loads((tmp_path / "a.json").read_text()) == {
        "x": None, "y": 1.5, "z": [1, 2], "p": str(tmp_path)}
    write_tsv(tmp_path / "t.tsv", ["a", "b", "c", "d"], [[None, math.nan, True, 0.123456789]])
    assert (tmp_path / "t.tsv").read_text() == "a\tb\tc\td\nn/a\tn/a\ttrue\t0.123457\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.tsv"]  # no temporaries


def test_the_written_map_is_the_acquisitions_grid(dataset: Path, tmp_path: Path) -> None:
    (acquisition,) = find_acquisitions(dataset, ["01"]).acquisitions
    process_acquisition(acquisition, dataset, tmp_path, Options())
    source = nib.load(dataset / "sub-01/anat/sub-01_run-1_echo-1_part-mag_MEGRE.nii")
    chi = nib.load(tmp_path / "qsmnode/sub-01/anat/sub-01_run-1_Chimap.nii.gz")
    assert chi.shape == source.shape and np.allclose(chi.affine, source.affine)
    assert chi.get_data_dtype() == np.float32
    mask = nib.load(tmp_path / "qsmnode/sub-01/anat/sub-01_run-1_desc-brain_mask.nii.gz")
    assert mask.get_data_dtype() == np.uint8
