"""Every derived object in a real viewer: OHIF 3 in headless Chromium, reading Orthanc's DICOMweb.

The test starts Orthanc with Debian's DICOMweb plugin on free loopback ports; the scanner
archives a simulated study in it (C-STORE) and ``qsmnode process --send`` processes the study
and sends every derived object to it, as at a site (two visits of the demo's follow-up patient,
so that the second report is compared with the first, found in the PACS). It serves
OHIF's built viewer (npm ``@ohif/app``, its ``dist/`` in ``viewer/ohif``) with an app-config
pointing at a same-origin proxy of Orthanc's ``/dicom-web``, and drives Debian's ``chromium``
with ``puppeteer-core`` (``viewer/drive-ohif.mjs``). For each derived series it loads the
series as a user would (double-click the thumbnail, accept the load prompt) and reports the
console, OHIF's panels and the viewport pixels; the assertions below are on those.

Everything it needs is installed by ``scripts/setup.sh``; nothing is downloaded here. A missing
piece fails the test with its name. Screenshots are kept under ``$TMPDIR/qsmnode-ohif/``.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from qsmnode.demo.pacs import free_port
from qsmnode.demo.progress import Console
from qsmnode.demo.run import FOLLOW_UP_VISITS, simulate_scan
from qsmnode.node.storescu import send_paths
from tests.orthanc import DICOMWEB_PLUGIN, DicomWebOrthanc

ROOT = Path(__file__).resolve().parents[1]
VIEWER = ROOT / "viewer"
OHIF_DIST = VIEWER / "ohif"
DRIVER = VIEWER / "drive-ohif.mjs"
PMAP_SCRIPT = VIEWER / "qsmnode-pmap.js"
"""Real-world values, the map's window and a diverging colour map for Parametric Maps in OHIF."""
CHROMIUM_NAMES = ("chromium", "chromium-browser")


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
    """OHIF's app-config.js: one DICOMweb data source, the proxy's ``/dicom-web``, and the
    site script for qsmnode's Parametric Maps (:data:`PMAP_SCRIPT`) after it, as the README
    tells a site to add it."""
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
    return f"window.config = {json.dumps(config, indent=2)};\n\n" + PMAP_SCRIPT.read_text()


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

NODE_AE = "QSMNODE"
SCANNER_AE = "DEMO7T"
SIZE = "small-slab"
"""The demo's end-to-end scan: 0.8 × 0.8 × 1.2 mm, fine enough for the M1 analysis."""


@dataclass
class ViewerStudy:
    """The second visit of the demo's follow-up patient, as the PACS holds it after the scanner
    archived its images and ``qsmnode process --send`` sent its derived objects."""

    study_uid: str
    sources: list[Path]
    derived: list[Dataset]
    process_output: str

    def one(self, sop_class: str, image_type: str | None = None) -> list[Dataset]:
        """The derived instances of ``sop_class`` (and with ``image_type`` as ImageType[2])."""
        return [ds for ds in self.derived if ds.SOPClassUID == sop_class
                and (image_type is None or list(ds.ImageType)[2:3] == [image_type])]


def node_config(path: Path, orthanc: DicomWebOrthanc) -> Path:
    """The site's configuration for ``qsmnode process``: the PACS as a destination, and asked
    for the patient's earlier reports (the follow-up). QSM by single-step TV: what the viewer
    shows is built alike whatever the method, and the default's slower inversion is measured
    in the benchmarks and run by the fresh-clone demo."""
    path.write_text(
        f'[paths]\nstate_dir = "{path.parent / "state"}"\n\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "{orthanc.ae_title}"\n'
        f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\ncalling_ae_title = "{NODE_AE}"\n\n'
        '[follow_up]\npacs = "pacs"\n\n[pipeline]\nqsm_method = "single-step-tv"\n')
    return path


def process_and_send(folder: Path, out: Path, config: Path) -> str:
    """``qsmnode process FOLDER --send pacs``, as a site runs it; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "qsmnode", "process", str(folder), "--out", str(out),
         "--send", "pacs", "--config", str(config)],
        capture_output=True, text=True, timeout=1200, check=False, cwd=ROOT,
    )
    assert done.returncode == 0, f"qsmnode process failed:\n{done.stdout}\n{done.stderr}"
    assert "sent " in done.stdout and "Traceback" not in done.stderr, done.stdout
    return done.stdout + done.stderr


def archive(files: list[Path], orthanc: DicomWebOrthanc) -> None:
    """The scanner archives its images in the PACS (C-STORE), so the overlays have their
    anatomy there."""
    report = send_paths(files, "127.0.0.1", orthanc.dicom_port, orthanc.ae_title, SCANNER_AE)
    assert report.ok, (report.statuses, report.errors)


def make_study(root: Path, orthanc: DicomWebOrthanc) -> ViewerStudy:
    """The demo's follow-up patient (:data:`qsmnode.demo.run.FOLLOW_UP_VISITS`): two simulated
    7T slabs a year apart, each archived in the PACS by the scanner and processed with
    ``qsmnode process --send``; the second visit's report is compared with the first's, which
    the node finds in the PACS. The viewer opens the second visit."""
    console = Console(io.StringIO())
    config = node_config(root / "qsmnode.toml", orthanc)
    output = ""
    for n, visit in enumerate(FOLLOW_UP_VISITS, 1):
        files, _ = simulate_scan(console, SIZE, root / f"scanner-{n}", visit)
        archive(files, orthanc)
        output = process_and_send(root / f"scanner-{n}", root / f"derived-{n}", config)
    derived = [pydicom.dcmread(p) for p in sorted((root / f"derived-{n}").rglob("*.dcm"))]
    study_uids = {str(ds.StudyInstanceUID) for ds in derived}
    assert len(study_uids) == 1, study_uids
    return ViewerStudy(study_uids.pop(), files, derived, output)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ViewerServer, ViewerStudy]]:
    require_viewer()
    chromium()
    root = tmp_path_factory.mktemp("ohif")
    # the node's AE title may query and retrieve (the follow-up's C-FIND and C-GET)
    orthanc = DicomWebOrthanc(root / "orthanc", known_modalities={NODE_AE: ("127.0.0.1", 104)})
    orthanc.start()
    server = None
    try:
        study = make_study(root, orthanc)
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


def drive(url: str, plan: dict[str, Any], out: Path, timeout_s: float = 1200) -> dict[str, Any]:
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


def pmap_layer(entry: dict[str, Any]) -> dict[str, Any]:
    """The Parametric Map's layer in the viewport (OHIF's volume id ends ``pmap.<guid>``)."""
    layers = [layer for layer in entry.get("layers") or [] if "pmap." in str(layer["volumeId"])]
    assert len(layers) == 1, entry.get("layers")
    return layers[0]  # type: ignore[no-any-return]


def grid_difference(a: dict[str, Any], b: dict[str, Any]) -> int:
    """Largest difference between two viewports' 16 × 16 grey thumbnails (0..255)."""
    return max(abs(x - y) for x, y in zip(a["grid"], b["grid"], strict=True))


PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
TRACKING_IDENTIFIER = "112039"
PROBES = (-10.0, -5.0, -1.0, 0.0, 1.0, 5.0, 10.0)
"""Values at which the QSM map's colour and opacity in OHIF are read, in OHIF's scale (the
stored value × 100): χ of ±0.1, ±0.05, ±0.01 and 0 ppm."""


def sr_numbers(ds: Dataset, tracking: str | None = None) -> Iterator[tuple[str, Dataset]]:
    """Every NUM content item of the SR as (tracking identifier of its group, item)."""
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == (
                TRACKING_IDENTIFIER):
            tracking = str(item.TextValue)
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM":
            yield tracking or "", item
        elif "ContentSequence" in item:
            yield from sr_numbers(item, tracking)


def change_label(report: Dataset, region: str) -> str:
    """The label OHIF shows for ``region``'s deep χ change since the prior report: the NUM's
    meaning and its value as OHIF formats it (``Number(v).toFixed(2)``, then the unit)."""
    [change] = [item for tracking, item in sr_numbers(report) if tracking == region
                and item.ConceptNameCodeSequence[0].CodeMeaning == "Change in mean susceptibility"]
    value = change.MeasuredValueSequence[0]
    return (f"Change in mean susceptibility: {float(value.NumericValue):.2f} "
            f"{value.MeasurementUnitsCodeSequence[0].CodeValue}")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two visits through `qsmnode process` (~5 min), then OHIF
def test_every_derived_object_displays_in_ohif(viewer: tuple[ViewerServer, ViewerStudy]) -> None:
    server, study = viewer
    [qsm_mr] = {str(d.SeriesInstanceUID): d for d in study.one(MR_IMAGE, "QSM")}.values()
    [r2s_mr] = {str(d.SeriesInstanceUID): d for d in study.one(MR_IMAGE, "R2STAR")}.values()
    maps = {str(d.ReferencedSeriesSequence[0].SeriesInstanceUID): d
            for d in study.one(PARAMETRIC_MAP)}
    qsm_map, r2s_map = maps[str(qsm_mr.SeriesInstanceUID)], maps[str(r2s_mr.SeriesInstanceUID)]
    [segmentation] = study.one(SEGMENTATION)
    [report_sr] = study.one(COMPREHENSIVE_3D_SR)
    key_images = study.one(SECONDARY_CAPTURE)
    names = {
        "qsm_mr": str(qsm_mr.SeriesDescription),
        "r2s_mr": str(r2s_mr.SeriesDescription),
        "qsm_pm": str(qsm_map.SeriesDescription),
        "r2s_pm": str(r2s_map.SeriesDescription),
        "seg": str(segmentation.SeriesDescription),
        "sr": str(report_sr.SeriesDescription),
        "key": str(key_images[0].SeriesDescription),
    }
    key_series = str(key_images[0].SeriesInstanceUID)
    expected = [str(item.SegmentLabel) for item in segmentation.SegmentSequence]
    # the follow-up was found and compared: the SR holds the change since the first visit
    assert "follow-up:" in study.process_output, study.process_output
    left_deep_change = change_label(report_sr, "M1 left hand deep")
    plan = {"series": [
        {"name": names["qsm_mr"], "key": "qsm-mr"},
        {"name": names["r2s_mr"], "key": "r2star-mr"},
        # an overlay is loaded onto the series in the viewport when their frames of reference
        # match: the radiologist shows the map's series first (else OHIF may place it on the
        # 4-echo source, whose images the map does not reference)
        {"name": names["qsm_pm"], "key": "qsm-pm", "before": [names["qsm_mr"]],
         "waitForColour": "tinted", "probes": list(PROBES)},
        {"name": names["r2s_pm"], "key": "r2star-pm", "before": [names["r2s_mr"]],
         "waitForColour": True, "probes": [30.0]},
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
        # χ's diverging map is drawn pastel by OHIF (tinted); R2*'s rainbow in full colour
        measure = "tintedFraction" if key == "qsm-pm" else "colouredFraction"
        assert entry["canvas"][measure] > 0.001, (key, entry["canvas"])
    # the χ map over its own χ series changes hue, not grey level: the series alone is grey
    assert base["tintedFraction"] == 0, base
    assert grid_difference(report["r2star-pm"]["canvas"], report["r2star-mr"]["canvas"]) > 5

    # OHIF holds each map's stored values × 100 (its PMAP loader; docs/ohif/README.md), and with
    # viewer/qsmnode-pmap.js shows them in the window of the map's own Frame VOI LUT (× 100 too)
    for key, pm_ds in (("qsm-pm", qsm_map), ("r2star-pm", r2s_map)):
        layer = pmap_layer(report[key])
        stored = pm_ds.pixel_array
        assert layer["min"] == pytest.approx(100 * float(stored.min()), abs=1e-2), (key, layer)
        assert layer["max"] == pytest.approx(100 * float(stored.max()), abs=1e-2), (key, layer)
        voi = pm_ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
        centre, width = float(voi.WindowCenter), float(voi.WindowWidth)
        assert layer["voiRange"] == pytest.approx(
            {"lower": 100 * (centre - width / 2), "upper": 100 * (centre + width / 2)}), (
            key, layer)
    # χ: a diverging colour map centred on 0 ppm: 0 is transparent (the anatomy shows), negative
    # χ blue, positive χ red, both drawn
    probes = {p["value"]: p for p in pmap_layer(report["qsm-pm"])["probes"]}
    assert probes[0.0]["opacity"] == 0, probes
    for value in (-10, -5, 5, 10):  # ±0.1 and ±0.05 ppm, in OHIF's scale
        assert probes[value]["opacity"] >= 0.5, probes
    for value in (-10, -5):
        red, _, blue = probes[value]["rgb"]
        assert blue - red > 0.3, probes
    for value in (5, 10):
        red, _, blue = probes[value]["rgb"]
        assert red - blue > 0.3, probes
    canvas = report["qsm-pm"]["canvas"]
    assert canvas["reddishFraction"] > 0.001 and canvas["bluishFraction"] > 0.001, canvas

    # the SEG: every segment, by name, in OHIF's segmentation service and panel, drawn in colour
    seg = report["seg"]
    assert [s["label"] for s in seg["ohif"]["segments"]] == expected
    for label in expected:
        assert label in seg["text"]["body"]
    assert seg["canvas"]["colouredFraction"] > 0.0005, (seg["canvas"], seg.get("retried"))
    assert names["qsm_mr"] in seg["text"]["viewport"]

    # the SR: every measurement group is placed on an image (its outline on the QSM MR image)
    # and carries its values; the measurement panel lists measurements
    [sr_set] = [d for d in report["sr"]["ohif"]["displaySets"] if d["modality"] == "SR"]
    assert sr_set["loaded"] is True
    measured = {m["id"]: m for m in sr_set["srMeasurements"]}
    # each region the SEG names (each covered area and layer), each of those areas over all its
    # layers, and the quality control
    whole_areas = {label.rsplit(" ", 1)[0] + " all layers" for label in expected}
    assert set(measured) == {*expected, *whole_areas, "Quality control"}, sorted(measured)
    for label in expected:
        assert measured[label]["loaded"] is True, measured[label]
        assert any(x.startswith("Magnetic Susceptibility: ") and "ppm" in x
                   for x in measured[label]["labels"]), measured[label]
    assert all(m["loaded"] for m in measured.values()), measured
    # a follow-up visit: the change since the prior report shows with the region's values
    assert left_deep_change in measured["M1 left hand deep"]["labels"], (
        left_deep_change, measured["M1 left hand deep"]["labels"])
    # OHIF's measurement panel: every region (a rectangle on its slice), named
    panel = report["sr"]["text"]["body"]
    assert f"Measurements ({len(measured)})" in panel, panel[-3000:]
    for label in expected:
        assert label in panel, (label, panel[-3000:])

    # the key images: the summary (an RGB image with coloured outlines and the table)
    key = report["key-images"]
    assert names["key"] in key["text"]["viewport"]
    assert key["canvas"]["colouredFraction"] > 0.001, key["canvas"]

