"""The demo's parts: the built-in receiving PACS, the progress lines and the report helpers.
(The whole demo runs from a fresh clone in ``test_fresh_clone.py``.)"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom

from qsmnode.demo.pacs import BuiltinPacs, start_pacs
from qsmnode.demo.progress import Console, bar
from qsmnode.demo.run import Timeline, deep_contrast, latency_rows, measurement_table, run_demo
from qsmnode.node.storescu import send_paths
from tests.nodeutil import write_study


def test_builtin_pacs_stores_what_it_is_sent_and_counts_series(tmp_path: Path) -> None:
    files = write_study(tmp_path / "study", "siemens", 5)
    pacs = start_pacs("builtin", tmp_path / "pacs")
    assert isinstance(pacs, BuiltinPacs)
    seen: list[tuple[int, int]] = []
    try:
        report = send_paths(files, "127.0.0.1", pacs.dicom_port, pacs.ae_title, "DEMO7T",
                            on_sent=lambda done, total: seen.append((done, total)))
    finally:
        pacs.stop()
    assert report.ok and len(report.statuses) == len(files)
    assert seen[-1] == (len(files), len(files)) and len(seen) == len(files)
    stored = sorted((tmp_path / "pacs" / "received").glob("*.dcm"))
    assert len(stored) == len(files)
    assert sum(pacs.series_counts().values()) == len(files)
    sent = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert {pydicom.dcmread(f).SOPInstanceUID for f in stored} == sent
    assert "built-in receiver" in pacs.kept()


def test_progress_bar_and_lines_on_a_pipe() -> None:
    assert bar(0, 10, width=10) == "[░░░░░░░░░░] 0/10"
    assert bar(5, 10, width=10) == "[█████░░░░░] 5/10"
    assert bar(3, 0, width=4) == "[░░░░] 3"
    stream = io.StringIO()
    console = Console(stream, heartbeat_s=0.0)
    line = console.line("QSM")
    line.update("running 1.0 s")
    line.finish("8.3 s")
    lines = stream.getvalue().splitlines()
    assert lines == ["  QSM            running 1.0 s …", "  QSM            ✓ 8.3 s"]


def test_report_helpers() -> None:
    measurements = [
        {"area": a, "layer": "deep", "covered": True, "chi_mean_ppm": chi, "chi_sd_ppm": 0.01,
         "t2star_signal_ratio": 0.9, "r2star_mean_per_s": 40.0, "thickness_mean_mm": 2.5,
         "voxel_count": 100}
        for a, chi in (("left_hand", 0.05), ("right_hand", 0.02), ("left_foot", 0.02))
    ] + [{"area": "right_foot", "layer": "deep", "covered": False, "voxel_count": 3}]
    m1 = {"measurements": measurements}
    rows = measurement_table(m1)
    assert "left_hand   deep          +0.0500" in rows[2]
    assert "not covered" in rows[-1]
    assert "+0.0300 ppm" in (deep_contrast(m1) or "")
    timeline = Timeline(marks={"last_image_received": 100.0, "job_created": 102.0,
                               "job_started": 103.0, "job_done": 150.0,
                               "last_object_acknowledged": 160.0},
                        stages={"load": 3.0, "qsm": 30.0, "m1": 10.0})
    latency = dict(latency_rows(timeline))
    assert latency["total: last image received → last object acknowledged"] == 60.0
    assert latency["worker: QSM"] == 30.0
    assert latency["worker start-up and hand-over to the outbox"] == 4.0
    assert latency["sending to the PACS"] == 10.0


def test_demo_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    stream = io.StringIO()
    assert run_demo(tmp_path, console=Console(stream)) == 1
    assert "is not empty and not an earlier demo's folder" in stream.getvalue()
    assert (tmp_path / "precious.txt").read_text() == "keep me"
