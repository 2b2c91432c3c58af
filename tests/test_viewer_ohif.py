"""Every derived object in a real viewer: OHIF 3 in headless Chromium, reading Orthanc's DICOMweb.

The test starts Orthanc with Debian's DICOMweb plugin on free loopback ports, stores a simulated
study in it (the source images, as the scanner sends them, and every derived object), serves
OHIF's built viewer (npm ``@ohif/app``, its ``dist/`` in ``viewer/ohif``) with an app-config
pointing at a same-origin proxy of Orthanc's ``/dicom-web``, and drives Debian's ``chromium``
with ``puppeteer-core`` (``viewer/drive-ohif.mjs``). For each derived series it loads the
series as a user would (double-click the thumbnail, accept the load prompt) and reports the
console, OHIF's panels and the viewport pixels; the assertions below are on those.

Everything it needs is installed by ``scripts/setup.sh``; nothing is downloaded here. A missing
piece fails the test with its name. Screenshots are kept under ``$TMPDIR/qsmnode-ohif/``.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qsmnode.demo.pacs import free_port
from qsmnode.dicom.derived import DerivedObjects, build_derived_objects, source_reader
from qsmnode.dicom.load import LoadedAcquisition, load_folder
from qsmnode.m1.followup import FollowUp, PriorResult, Protocol, compare, current_values
from qsmnode.m1.result import M1Result
from qsmnode.sim.scanner import preset, simulate
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom
from tests.derivedutil import m1_from_truth
from tests.orthanc import DICOMWEB_PLUGIN, DicomWebOrthanc

ROOT = Path(__file__).resolve().parents[1]
VIEWER = ROOT / "viewer"
OHIF_DIST = VIEWER / "ohif"
DRIVER = VIEWER / "drive-ohif.mjs"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
VERSION = "1.2.3"


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium is missing: install the Debian package chromium (scripts/setup.sh)")


def require_viewer() -> None:
    """Fail, naming what is missing, when a piece of the viewer test is not installed."""
    missing = []
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        missing.append("Orthanc (Debian package orthanc)")
    if not DICOMWEB_PLUGIN.exists():
        missing.append(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} (Debian orthanc-dicomweb)")
    if shutil.which("node") is None:
        missing.append("node (Debian package nodejs)")
    if not (VIEWER / "node_modules" / "puppeteer-core").is_dir():
        missing.append("viewer/node_modules/puppeteer-core (npm ci in viewer/)")
    if not (OHIF_DIST / "index.html").exists():
        missing.append("viewer/ohif (OHIF's dist/: viewer/install-ohif.sh)")
    if missing:
        pytest.fail("the OHIF viewer test needs: " + "; ".join(missing)
                    + " (scripts/setup.sh installs them)")


# --- OHIF on the same origin as Orthanc's DICOMweb -----------------------------------------


def app_config() -> str:
    """OHIF's app-config.js: one DICOMweb data source, the proxy's ``/dicom-web``."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "qsmnode test Orthanc",
            "name": "orthanc",
            "wadoUriRoot": "/wado",
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "showStudyList": True,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "dicomweb",
        "investigationalUseDialog": {"option": "never"},
        "extensions": [],
        "modes": [],
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class ViewerServer:
    """OHIF's dist/ over HTTP on loopback, with ``/dicom-web`` and ``/wado`` passed through to
    Orthanc (one origin: no CORS), ``/app-config.js`` from :func:`app_config`, and every other
    unknown path answered with index.html (OHIF routes in the browser)."""

    def __init__(self, dist: Path, orthanc_url: str) -> None:
        self.dist = dist
        self.orthanc_url = orthanc_url
        self.port = free_port()
        self.config = app_config().encode()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ViewerServer:
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(outer.dist), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith(("/dicom-web/", "/wado")):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, "application/javascript", outer.config)
                elif path != "/" and (outer.dist / path.lstrip("/")).is_file():
                    super().do_GET()
                else:
                    self._send(200, "text/html", (outer.dist / "index.html").read_bytes())

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _proxy(self) -> None:
                # the Host header goes through: Orthanc's DICOMweb writes BulkDataURIs from it,
                # and OHIF must fetch them from this origin
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("accept", "range", "host")}
                request = urllib.request.Request(outer.orthanc_url + self.path, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        body = response.read()
                        status = response.status
                        content_type = response.headers.get("Content-Type", "")
                except urllib.error.HTTPError as exc:
                    body, status = exc.read(), exc.code
                    content_type = exc.headers.get("Content-Type", "text/plain")
                self._send(status, content_type, body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --- the study --------------------------------------------------------------------------


@dataclass
class ViewerStudy:
    study_uid: str
    loaded: LoadedAcquisition
    objects: DerivedObjects
    m1: M1Result
    sources: list[Path]
    derived: list[Path]


def follow_up_of(loaded: LoadedAcquisition, m1: M1Result) -> FollowUp:
    """A follow-up visit: the patient's prior report (not in the PACS: only referenced) had
    0.02 ppm less deep-layer χ in the left hand area, a year before."""
    values = dict(current_values(m1))
    values[("left_hand", "deep", "chi_mean_ppm")] -= 0.02
    gre = loaded.gre
    protocol = Protocol(gre.field_strength_t, tuple(gre.voxel_size_mm), tuple(gre.echo_times_s))
    prior = PriorResult("1.2.826.0.1.3680043.8.498.1", dt.date(2023, 1, 1),
                        "1.2.826.0.1.3680043.8.498.3", "1.2.826.0.1.3680043.8.498.2",
                        "1.2.840.10008.5.1.4.1.1.88.34", VERSION, protocol, values)
    follow = compare(m1, dt.date(2024, 1, 1), protocol, VERSION, [prior])
    assert follow.exceeding(), follow.note
    return follow


def make_study(root: Path) -> ViewerStudy:
    """A simulated oblique 4-echo study (classic Siemens files) and its derived objects, with
    the M1 regions and values of the simulator's truth, as a follow-up visit (the SR with its
    change groups, the key images with the trend)."""
    sim = simulate(preset("tiny", shape=(42, 50, 24), voxel_size_mm=(4.0, 4.0, 6.0),
                          echo_times_s=(0.005, 0.0105, 0.016, 0.0215)))
    sources = write_dicom(sim.gre, root / "source", "siemens", SimStudyInfo(seed=11))
    (loaded,) = load_folder(root / "source")
    assert isinstance(loaded, LoadedAcquisition)
    # as the pipeline gives them: values inside the brain mask, NaN (stored as 0) outside
    inside = sim.truth.brain_mask
    chi = np.where(inside, sim.truth.chi_ppm, np.nan).astype(np.float32)
    r2star = np.where(inside, sim.truth.r2star_per_s, np.nan).astype(np.float32)
    m1 = m1_from_truth(sim)
    objects = build_derived_objects(loaded, chi, r2star, m1, source_reader(sources), VERSION,
                                    follow_up=follow_up_of(loaded, m1))
    out = root / "derived"
    out.mkdir(parents=True, exist_ok=True)
    derived = []
    for ds in objects.datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        derived.append(path)
    return ViewerStudy(loaded.study_uid, loaded, objects, m1, sources, derived)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ViewerServer, ViewerStudy]]:
    require_viewer()
    chromium()
    root = tmp_path_factory.mktemp("ohif")
    study = make_study(root)
    orthanc = DicomWebOrthanc(root / "orthanc").start()
    server = None
    try:
        orthanc.upload(study.sources + study.derived)
        server = ViewerServer(OHIF_DIST, orthanc.url).start()
        yield server, study
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


def artifacts() -> Path:
    out = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "qsmnode-ohif"
    out.mkdir(parents=True, exist_ok=True)
    return out


def drive(url: str, plan: dict[str, Any], out: Path, timeout_s: float = 600) -> dict[str, Any]:
    """Run viewer/drive-ohif.mjs: it opens ``url`` in headless Chromium, follows ``plan`` and
    prints one JSON report."""
    proc = subprocess.run(
        ["node", str(DRIVER), url, json.dumps(plan), str(out), chromium()],
        capture_output=True, text=True, timeout=timeout_s, cwd=VIEWER, check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the OHIF driver failed ({proc.returncode}):\n"
                             f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- the test -------------------------------------------------------------------------------

ERROR_MARKERS = (
    "Referenced Volume is missing",
    "not supported yet",
    "oblique to the acquisition plane",
    "sliceData is undefined",
    "Referenced displaySet is missing",
    "Cannot read properties",
)
"""Console text that means an object did not display (seen before the objects were fixed)."""


def errors(entry: dict[str, Any]) -> list[str]:
    """Console errors and page errors while a series loaded, and any line naming a failure
    from :data:`ERROR_MARKERS` (OHIF logs some of those as warnings)."""
    lines: list[str] = entry["consoleAfterLoad"]
    out = [line for line in lines if line.startswith(("error:", "pageerror:"))]
    out += [line for line in lines if any(m in line for m in ERROR_MARKERS)
            and "Unable to generate tool state" not in line]
    return list(dict.fromkeys(out))


def grid_difference(a: dict[str, Any], b: dict[str, Any]) -> int:
    """Largest difference between two viewports' 16 × 16 grey thumbnails (0..255)."""
    return max(abs(x - y) for x, y in zip(a["grid"], b["grid"], strict=True))


@pytest.mark.slow
def test_every_derived_object_displays_in_ohif(viewer: tuple[ViewerServer, ViewerStudy]) -> None:
    server, study = viewer
    objects = study.objects
    assert objects.segmentation is not None and objects.report is not None
    names = {
        "qsm_mr": str(objects.qsm_images[0].SeriesDescription),
        "r2s_mr": str(objects.r2star_images[0].SeriesDescription),
        "qsm_pm": str(objects.qsm_map.SeriesDescription),
        "r2s_pm": str(objects.r2star_map.SeriesDescription),  # type: ignore[union-attr]
        "seg": str(objects.segmentation.SeriesDescription),
        "sr": str(objects.report.SeriesDescription),
        "key": str(objects.key_images[0].SeriesDescription),
    }
    key_series = str(objects.key_images[0].SeriesInstanceUID)
    expected = [str(item.SegmentLabel) for item in objects.segmentation.SegmentSequence]
    plan = {"series": [
        {"name": names["qsm_mr"], "key": "qsm-mr"},
        {"name": names["r2s_mr"], "key": "r2star-mr"},
        # an overlay is loaded onto the series in the viewport when their frames of reference
        # match: the radiologist shows the map's series first (else OHIF may place it on the
        # 4-echo source, whose images the map does not reference)
        {"name": names["qsm_pm"], "key": "qsm-pm", "before": [names["qsm_mr"]],
         "waitForColour": True},
        {"name": names["r2s_pm"], "key": "r2star-pm", "before": [names["r2s_mr"]],
         "waitForColour": True},
        # a segment or measurement clicked in its panel: OHIF jumps to its slice
        {"name": names["seg"], "key": "seg", "before": [names["qsm_mr"]],
         "prompt": True, "panel": "panelSegmentation-btn", "clickAfter": expected[0],
         "waitForColour": True},
        {"name": names["sr"], "key": "sr", "prompt": True, "panel": "trackedMeasurements-btn",
         "clickAfter": expected[0]},
        # OHIF keeps the viewport type of the viewport a series is dropped on: the first series
        # of the study (the 4-echo source) opens in a volume viewport, where an image without
        # plane geometry (a Secondary Capture) cannot be placed. Opened as a radiologist opens
        # one series from a PACS link, the key images get a stack viewport.
        {"name": names["key"], "key": "key-images", "query": f"&SeriesInstanceUIDs={key_series}"},
    ]}
    out = artifacts()
    url = f"{server.url}/viewer?StudyInstanceUIDs={study.study_uid}"
    report = drive(url, plan, out)["series"]
    for key, entry in report.items():
        assert not entry.get("error"), (key, entry.get("error"))
        assert not errors(entry), (key, errors(entry))
        assert entry["canvas"] and entry["canvas"]["litFraction"] > 0.05, (key, entry["canvas"])

    # the derived MR series display as they are
    for key, name in (("qsm-mr", names["qsm_mr"]), ("r2star-mr", names["r2s_mr"])):
        assert name in report[key]["text"]["viewport"], report[key]["text"]["viewport"]

    # each Parametric Map is drawn in colour over the series it references (its derived MR)
    base = report["qsm-mr"]["canvas"]
    for key, shown_on in (("qsm-pm", names["qsm_mr"]), ("r2star-pm", names["r2s_mr"])):
        entry = report[key]
        pm = {"qsm-pm": names["qsm_pm"], "r2star-pm": names["r2s_pm"]}[key]
        [active] = [v for v in entry["viewports"] if v["active"]]
        assert active["series"] == [f"PMAP:{pm}"], entry["viewports"]
        assert shown_on in entry["text"]["viewport"], entry["text"]["viewport"]
        assert "Loading Parametric Map" not in entry["text"]["body"]
        assert entry["canvas"]["colouredFraction"] > 0.001, (key, entry["canvas"])
    assert grid_difference(report["qsm-pm"]["canvas"], base) > 5
    assert grid_difference(report["r2star-pm"]["canvas"], report["r2star-mr"]["canvas"]) > 5

    # the SEG: every segment, by name, in OHIF's segmentation service and panel, drawn in colour
    seg = report["seg"]
    assert [s["label"] for s in seg["ohif"]["segments"]] == expected
    for label in expected:
        assert label in seg["text"]["body"]
    assert seg["canvas"]["colouredFraction"] > 0.0005, seg["canvas"]
    assert names["qsm_mr"] in seg["text"]["viewport"]

    # the SR: every measurement group is placed on an image (its outline on the QSM MR image)
    # and carries its values; the measurement panel lists measurements
    [sr_set] = [d for d in report["sr"]["ohif"]["displaySets"] if d["modality"] == "SR"]
    assert sr_set["loaded"] is True
    measured = {m["id"]: m for m in sr_set["srMeasurements"]}
    regions = [m for m in study.m1.measurements if m.voxel_count > 0]
    assert len(measured) == len(regions) + 1, sorted(measured)  # + the quality control
    assert "Quality control" in measured
    for label in expected:
        assert measured[label]["loaded"] is True, measured[label]
        assert any(x.startswith("Magnetic Susceptibility: ") and "ppm" in x
                   for x in measured[label]["labels"]), measured[label]
    assert all(m["loaded"] for m in measured.values()), measured
    # a follow-up visit: the change since the prior report shows with the region's values
    assert "Change in mean susceptibility: 0.02 ppm" in measured["M1 left hand deep"]["labels"]
    # OHIF's measurement panel: every region (a rectangle on its slice), named
    panel = report["sr"]["text"]["body"]
    assert f"Measurements ({len(measured)})" in panel, panel[-3000:]
    for label in expected:
        assert label in panel, (label, panel[-3000:])

    # the key images: the summary (an RGB image with coloured outlines and the table)
    key = report["key-images"]
    assert names["key"] in key["text"]["viewport"]
    assert key["canvas"]["colouredFraction"] > 0.001, key["canvas"]

