"""The command line: simulate to a folder, send by C-STORE to dcmtk's storescp, round trips."""

from __future__ import annotations

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
    from qsmnode.cli import _table

    _table(("SERIES", "DESCRIPTION"), [("5", "gre\x1b[2J\x1b[31mred\nfake line")])
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("\n") == 2
    assert "gre\\x1b[2J\\x1b[31mred\\nfake line" in out
