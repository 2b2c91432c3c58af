"""The BIDS App on bad input: a clear error naming the problem, exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def qsm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qsmnode", "qsm", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def refused(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert message in done.stderr, done.stderr


def test_a_dataset_without_megre_is_refused(tmp_path: Path) -> None:
    for sub in ("01", "02"):
        anat = tmp_path / "bids" / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{sub}_T1w.nii.gz").write_bytes(b"")
    refused(qsm(tmp_path / "bids", tmp_path / "out", "participant"),
            "no anat/*_echo-<n>_part-<mag|phase>_MEGRE.nii[.gz] files in any of 2 subjects")
    assert not (tmp_path / "out").exists(), "nothing is written for a refused dataset"


def test_a_folder_that_is_not_a_dataset_is_refused(tmp_path: Path) -> None:
    refused(qsm(tmp_path, tmp_path / "out", "participant"), "no sub-<label> folders")
    refused(qsm(tmp_path / "absent", tmp_path / "out", "participant"), "absent: not a folder")


def test_bad_labels_are_named(tmp_path: Path) -> None:
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    refused(qsm(tmp_path, tmp_path / "out", "participant", "--participant-label", "01;rm"),
            "participant label '01;rm' is not a BIDS label")
    refused(qsm(tmp_path, tmp_path / "out", "participant", "--participant-label", "02"),
            "no participant sub-02 (present: sub-01)")
    refused(qsm(tmp_path, tmp_path / "out", "participant", "--session-label", "pre-op"),
            "session label 'pre-op' is not a BIDS label")


def test_the_group_level_needs_the_participant_level(tmp_path: Path) -> None:
    refused(qsm(tmp_path, tmp_path / "out", "group"), "no participant-level results")
    refused(qsm(tmp_path, tmp_path / "out", "group", "--participant-label", "a_b"),
            "participant label 'a_b' is not a BIDS label")


def test_a_bad_normative_table_is_named(tmp_path: Path) -> None:
    anat = tmp_path / "bids" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for part in ("mag", "phase"):
        (anat / f"sub-01_echo-1_part-{part}_MEGRE.nii").write_bytes(b"")
    (tmp_path / "norms.toml").write_text("schema = 1\n[areas.left_hand.deep]\nchi_sd_ppm = -1\n")
    refused(qsm(tmp_path / "bids", tmp_path / "out", "participant", "--m1", "--normative",
                tmp_path / "norms.toml"), "--normative")


def test_bad_cluster_options_are_named(tmp_path: Path) -> None:
    anat = tmp_path / "bids" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for part in ("mag", "phase"):
        (anat / f"sub-01_echo-1_part-{part}_MEGRE.nii").write_bytes(b"")
    refused(qsm(tmp_path / "bids", tmp_path / "out", "participant", "--n-workers", "0"),
            "argument --n-workers: '0': expected a whole number of at least 1")
    refused(qsm(tmp_path / "bids", tmp_path / "out", "participant", "--memory-limit", "lots"),
            "cannot start a local Dask cluster of 1 worker(s): Could not interpret 'lots'")
