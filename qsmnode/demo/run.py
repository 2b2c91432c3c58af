"""``qsmnode demo``: the whole product on one machine, in a few minutes.

It starts a receiving PACS (Orthanc when installed, otherwise a built-in receiver) and a real
``qsmnode serve`` with a temporary state folder, simulates a 7T scanner sending a multi-echo
GRE slab over the motor cortex (the anatomy phantom, with an ALS-like deep-layer χ increase in
the left hand area), and follows the study through reception, grouping, QSM, the M1 analysis
and delivery. It ends with the M1 measurements, where the derived objects are, PNG copies of
the key images and the latency of each stage.

``--follow-up`` (:data:`FOLLOW_UP_VISITS`): two visits of the same simulated patient a year
apart, the second with a larger ALS-like change. The PACS is Orthanc (it answers C-FIND and
C-GET); the node's ``[follow_up]`` asks it for the first visit's report when it processes the
second, and the demo ends with the change of each area's deep layer since the first visit.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from qsmnode.demo.pacs import Pacs, free_port, start_pacs
from qsmnode.demo.progress import Console, Line, bar, seconds
from qsmnode.node.jobs import STAGE_NAMES, read_progress
from qsmnode.node.store import JobRecord, Store, StoreError

SCANNER_AE = "DEMO7T"
NODE_AE = "QSMNODE"
ALS_CHANGE = {"left_hand": 0.03}
"""The ALS-like deep-layer χ increase (ppm) the simulated patient has."""


@dataclass(frozen=True)
class Visit:
    """One simulated study of the demo's patient."""

    seed: int
    """The study (UIDs) and the scanner noise."""
    study_date: str
    als: dict[str, float]
    label: str


VISIT = Visit(7, "20240101", ALS_CHANGE, "")
FOLLOW_UP_VISITS = (
    Visit(6, "20250605", {"left_hand": 0.01}, "visit 1 of 2 (2025-06-05)"),
    Visit(7, "20260605", ALS_CHANGE, "visit 2 of 2 (2026-06-05, a year later)"),
)
"""``--follow-up``: the same patient a year apart, the left-hand deep-layer change growing
from +0.01 to +0.03 ppm."""
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MARKER = ".qsmnode-demo"
T = TypeVar("T")


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why (and where the log is)."""


@dataclass
class Timeline:
    """Wall-clock times (s since the epoch) of what the demo saw, for the latency report."""

    marks: dict[str, float] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"marks": self.marks, "stages": self.stages}


# ------------------------------------------------------------------------------------------------
# the node


def node_config(state_dir: Path, port: int, http_port: int, pacs: Pacs, workers: int = 1,
                follow_up: bool = False) -> str:
    """A complete configuration for the demo's node (TOML); ``follow_up``: compare with the
    patient's earlier reports in the PACS."""
    extra = '\n[follow_up]\npacs = "pacs"\n' if follow_up else ""
    return f"""# written by `qsmnode demo`
[paths]
state_dir = {json.dumps(str(state_dir))}

[listener]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = {port}
min_free_disk_mb = 200

[[listener.allowed_senders]]
ae_title = "{SCANNER_AE}"
hosts = ["127.0.0.1"]

[tracker]
quiet_period_s = 2
max_wait_s = 300

[workers]
processes = {workers}

[sender]
retry_initial_s = 1
retry_max_s = 10

[http]
host = "127.0.0.1"
port = {http_port}

[logging]
level = "INFO"

[[destinations]]
name = "pacs"
ae_title = "{pacs.ae_title}"
host = "127.0.0.1"
port = {pacs.dicom_port}
calling_ae_title = "{NODE_AE}"
""" + extra


class NodeProcess:
    """``qsmnode serve`` in a subprocess, its log in ``<root>/node.log``."""

    def __init__(self, root: Path, pacs: Pacs, workers: int = 1,
                 follow_up: bool = False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.port, self.http_port = free_port(), free_port()
        self.config = root / "qsmnode.toml"
        self.config.write_text(node_config(self.state_dir, self.port, self.http_port, pacs,
                                           workers, follow_up))
        self.log_path = root / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 60.0) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "qsmnode", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log_file,
            )
        process = self.process
        until(lambda: "listening as" in self.log() or process.poll() is not None,
              timeout_s, "the node to start", self)
        if process.poll() is not None:
            raise DemoError(f"the node did not start; its log:\n{self.log()[-3000:]}")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise DemoError(f"the node stopped (exit {self.process.returncode}); its log "
                            f"{self.log_path}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def read(self, query: Callable[[Store], T]) -> T | None:
        """``query`` on the node's store, read-only; None while the store is not there."""
        try:
            with Store.in_state_dir(self.state_dir, readonly=True) as store:
                return query(store)
        except StoreError:
            return None


def until(check: Callable[[], Any], timeout_s: float, what: str, node: NodeProcess | None,
          interval_s: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; a dead node or the deadline is a
    :class:`DemoError` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if node is not None:
            node.check_alive()
        if time.monotonic() > deadline:
            where = f"; the node's log is {node.log_path}" if node is not None else ""
            raise DemoError(f"timed out after {timeout_s:g} s waiting for {what}{where}")
        time.sleep(interval_s)


# ------------------------------------------------------------------------------------------------
# the steps


def simulate_scan(console: Console, size: str, out: Path, visit: Visit = VISIT
                  ) -> tuple[list[Path], dict[str, Any]]:
    """Simulate the slab of one visit and write it as a Siemens-style study; the files and a
    summary."""
    from qsmnode.sim.anatomy import simulate_anatomy
    from qsmnode.sim.scanner import preset
    from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom

    scan = replace(preset(size), seed=visit.seed)
    text = (f"{scan.shape[0]}×{scan.shape[1]}×{scan.shape[2]} at "
            f"{'×'.join(f'{v:g}' for v in scan.voxel_size_mm)} mm, "
            f"{len(scan.echo_times_s)} echoes, {scan.field_strength_t:g} T")
    with console.working("scanner", f"simulating {text}") as line:
        sim = simulate_anatomy(scan, pose_seed=1, als=visit.als)
        files = write_dicom(sim.gre, out, "siemens",
                            SimStudyInfo(seed=visit.seed, study_date=visit.study_date))
        line.finish(f"simulated {text}, magnitude and phase: {len(files)} images "
                    f"in {seconds(line.elapsed_s)}")
    return files, {"shape": scan.shape, "voxel_size_mm": scan.voxel_size_mm,
                   "echoes": len(scan.echo_times_s), "files": len(files)}


def send_study(console: Console, files: list[Path], node: NodeProcess, timeline: Timeline
               ) -> None:
    """The scanner sends the study to the node (the latency clock starts at its last ack)."""
    line = console.line("receiving")
    _scanner_send(files, line, "127.0.0.1", node.port, NODE_AE, "the node")
    timeline.marks["last_image_acknowledged"] = time.time()
    rate = len(files) / max(line.elapsed_s, 1e-6)
    line.finish(f"{len(files)} images stored and fsynced by the node in "
                f"{seconds(line.elapsed_s)} ({rate:.0f}/s)")


def send_study_to_pacs(console: Console, files: list[Path], pacs: Pacs) -> None:
    """The scanner archives the same images in the PACS, as a site's scanner does, so that a
    viewer opened on the PACS shows the node's maps and segmentation over them."""
    line = console.line("archiving")
    _scanner_send(files, line, "127.0.0.1", pacs.dicom_port, pacs.ae_title, "the PACS")
    line.finish(f"{len(files)} images archived in the PACS too, as the scanner does")


def _scanner_send(files: list[Path], line: Line, host: str, port: int, ae_title: str,
                  who: str) -> None:
    from qsmnode.node.storescu import SendError, send_paths

    def sent(done: int, total: int) -> None:
        if done == total or done % 8 == 0:
            line.update(f"{bar(done, total)}  C-STORE {SCANNER_AE} → {ae_title}")

    try:
        report = send_paths(files, host, port, ae_title, SCANNER_AE, on_sent=sent)
    except SendError as exc:
        line.fail(str(exc))
        raise DemoError(f"the scanner could not send to {who}: {exc}") from None
    if not report.ok:
        bad = {**{str(p): f"status 0x{s:04X}" for p, s in report.statuses.items() if s},
               **{str(p): e for p, e in report.errors.items()}}
        line.fail(f"{len(bad)} images were not stored")
        raise DemoError(f"{who} did not store every image: " + "; ".join(
            f"{p}: {e}" for p, e in list(bad.items())[:3]))


def wait_for_job(console: Console, node: NodeProcess, timeline: Timeline,
                 known: frozenset[int] = frozenset()) -> JobRecord:
    """The first job not among ``known`` (the jobs of earlier visits)."""
    line = console.line("grouping")

    def job() -> JobRecord | None:
        summary = node.read(lambda s: s.summary())
        if summary:
            line.update(f"{summary['series_complete']} of {summary['series']} series complete")
        problems = node.read(lambda s: s.problems())
        if problems:
            raise DemoError(f"the node recorded a problem: {problems[0].reason}")
        jobs = [j for j in node.read(lambda s: s.jobs()) or [] if j.id not in known]
        return jobs[0] if jobs else None

    found: JobRecord = until(job, 300, "the acquisition to be grouped into a job", node)
    acquisitions = node.read(lambda s: s.acquisitions()) or []
    described = ""
    if acquisitions:
        summary = acquisitions[0].summary
        described = f": {summary.get('n_echoes', '?')} echoes, magnitude and phase"
    series = node.read(lambda s: s.series()) or []
    if series:
        timeline.marks["last_image_received"] = max(s.last_received_at for s in series)
        complete = [s.completed_at for s in series if s.completed_at is not None]
        if complete:
            timeline.marks["series_complete"] = max(complete)
    timeline.marks["job_created"] = found.created_at
    line.finish(f"{len(series)} series → 1 acquisition{described} → job {found.id}")
    return found


def _progress(node: NodeProcess, job: JobRecord) -> dict[str, Any] | None:
    return read_progress(node.state_dir, job.id, max(job.attempts, 1))


def follow_job(console: Console, node: NodeProcess, job_id: int, timeline: Timeline
               ) -> JobRecord:
    """Show each pipeline stage as the worker runs it, until the job is done."""
    lines: dict[str, Line] = {}
    finished: set[str] = set()

    def step() -> JobRecord | None:
        job = node.read(lambda s: s.job(job_id))
        if job is None:
            return None
        progress = _progress(node, job) or {}
        for stage, took in progress.get("done", {}).items():
            if stage not in finished:
                finished.add(stage)
                line = lines.pop(stage, None) or console.line(STAGE_NAMES.get(stage, stage))
                line.finish(f"{seconds(took)}")
        current = progress.get("stage")
        if current and current not in finished and job.state == "running":
            line = lines.setdefault(current, console.line(STAGE_NAMES.get(current, current)))
            line.update(f"running {seconds(time.time() - progress['since'])}")
        if job.state == "failed":
            raise DemoError(f"job {job.id} failed: {job.last_error}")
        return job if job.state == "done" else None

    job: JobRecord = until(step, 1800, f"job {job_id} to finish", node, interval_s=0.5)
    for stage, line in lines.items():
        if stage not in finished:
            line.finish("done")
    if job.started_at is not None:
        timeline.marks["job_started"] = job.started_at
    if job.finished_at is not None:
        timeline.marks["job_done"] = job.finished_at
    progress = _progress(node, job) or {}
    timeline.stages.update(progress.get("done", {}))
    return job


def follow_delivery(console: Console, node: NodeProcess, pacs: Pacs, timeline: Timeline
                    ) -> int:
    line = console.line("sending")

    def delivered() -> int | None:
        counts = node.read(lambda s: s.counts().get("sends", {})) or {}
        total = sum(counts.values())
        sent = counts.get("sent", 0)
        waiting = ""
        if counts.get("pending") and total:
            summary = node.read(lambda s: s.delivery()) or []
            if summary and summary[0].last_error:
                waiting = f"  (retrying: {summary[0].last_error})"
        line.update(f"{bar(sent, total)}  to {pacs.ae_title}{waiting}")
        if counts.get("failed"):
            raise DemoError(f"{counts['failed']} sends failed for good; see {node.log_path}")
        return total if total and sent == total else None

    total: int = until(delivered, 600, "the PACS to acknowledge every derived object", node)
    sends = node.read(lambda s: s.sends()) or []
    times = [s.sent_at for s in sends if s.sent_at is not None]
    if times:
        timeline.marks["last_object_acknowledged"] = max(times)
    line.finish(f"{total} derived objects acknowledged by the PACS in "
                f"{seconds(line.elapsed_s)}")
    return total


# ------------------------------------------------------------------------------------------------
# the report


def measurement_table(m1: dict[str, Any]) -> list[str]:
    """The M1 measurements as text rows."""
    rows = [f"  {'area':<11} {'layer':<12} {'χ mean':>8} {'χ SD':>7} {'T2* ratio':>9} "
            f"{'R2*':>6} {'thickness':>9} {'voxels':>7}",
            f"  {'':<11} {'':<12} {'ppm':>8} {'ppm':>7} {'':>9} {'1/s':>6} {'mm':>9} {'':>7}"]
    for m in m1.get("measurements", []):
        if not m["covered"]:
            rows.append(f"  {m['area']:<11} {m['layer']:<12} {'not covered':>8}"
                        f"{'':>35} {m['voxel_count']:>7}")
            continue
        rows.append(
            f"  {m['area']:<11} {m['layer']:<12} {m['chi_mean_ppm']:>+8.4f} "
            f"{m['chi_sd_ppm']:>7.4f} {m['t2star_signal_ratio']:>9.3f} "
            f"{m['r2star_mean_per_s']:>6.1f} {m['thickness_mean_mm']:>9.2f} "
            f"{m['voxel_count']:>7d}"
        )
    return rows


def deep_contrast(m1: dict[str, Any]) -> str | None:
    """How the left-hand deep layer stands out from the other areas' deep layers."""
    deep = {m["area"]: m["chi_mean_ppm"] for m in m1.get("measurements", [])
            if m["layer"] == "deep" and m["covered"]}
    if "left_hand" not in deep or len(deep) < 2:
        return None
    others = [v for a, v in deep.items() if a != "left_hand"]
    found = deep["left_hand"] - float(np.mean(others))
    return (f"deep-layer χ, left hand minus the other areas: {found:+.4f} ppm "
            f"(the simulated patient has {ALS_CHANGE['left_hand']:+.3f} ppm)")


def follow_up_table(follow: dict[str, Any]) -> list[str]:
    """The follow-up as text: what was compared, then each area's deep-layer χ change."""
    rows = [f"Follow-up: {follow.get('note', 'not run')}"]
    changes = [c for c in follow.get("changes", [])
               if c["layer"] == "deep" and c["measure"] == "chi_mean_ppm"]
    if changes:
        rows.append(f"  {'area':<11} {'deep χ before':>13} {'now':>8} {'change':>8} "
                    f"{'per year':>9}  beyond test-retest")
        for c in changes:
            per_year = "-" if c["per_year"] is None else f"{c['per_year']:+.4f}"
            rows.append(f"  {c['area']:<11} {c['prior']:>+13.4f} {c['current']:>+8.4f} "
                        f"{c['change']:>+8.4f} {per_year:>9}  "
                        f"{'yes' if c['exceeds'] else 'no'} (±{c['limit']:g} ppm)")
    return rows


def key_image_pngs(node: NodeProcess, out: Path, study_uid: str | None = None) -> list[Path]:
    """PNG copies of the key images in the outbox (of one study, when given)."""
    import pydicom
    from PIL import Image

    records = node.read(lambda s: s.outbox()) or []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        if record.sop_class_uid != SECONDARY_CAPTURE:
            continue
        ds = pydicom.dcmread(node.state_dir / record.path)
        if study_uid is not None and ds.StudyInstanceUID != study_uid:
            continue
        number = int(getattr(ds, "InstanceNumber", len(written) + 1))
        path = out / f"key-image-{number}.png"
        Image.fromarray(ds.pixel_array).save(path)
        written.append(path)
    return written


def latency_rows(timeline: Timeline) -> list[tuple[str, float]]:
    """The latency from the last image to the last acknowledgement, by stage."""
    m = timeline.marks
    rows: list[tuple[str, float]] = []
    if "last_image_received" in m and "job_created" in m:
        rows.append(("series complete, grouped, job queued", m["job_created"] -
                     m["last_image_received"]))
    if "job_created" in m and "job_started" in m:
        rows.append(("job waiting for a worker", m["job_started"] - m["job_created"]))
    for stage, took in timeline.stages.items():
        rows.append((f"worker: {STAGE_NAMES.get(stage, stage)}", took))
    if "job_started" in m and "job_done" in m:
        rows.append(("worker start-up and hand-over to the outbox",
                     m["job_done"] - m["job_started"] - sum(timeline.stages.values())))
    if "job_done" in m and "last_object_acknowledged" in m:
        rows.append(("sending to the PACS", m["last_object_acknowledged"] - m["job_done"]))
    if "last_image_received" in m and "last_object_acknowledged" in m:
        rows.append(("total: last image received → last object acknowledged",
                     m["last_object_acknowledged"] - m["last_image_received"]))
    return rows


# ------------------------------------------------------------------------------------------------
# the command


def run_demo(out: Path | None, size: str = "slab", pacs_kind: str = "auto",
             report_json: Path | None = None, console: Console | None = None,
             follow_up: bool = False) -> int:
    """Run the demo (see the module docstring); 0 on success, 1 with a clear error."""
    console = console or Console()
    if follow_up and pacs_kind == "builtin":
        console.say("error: --follow-up needs Orthanc as the PACS (it answers the node's C-FIND "
                    "and C-GET for the earlier visit's report); not --pacs builtin")
        return 1
    root = Path(tempfile.mkdtemp(prefix="qsmnode-demo-")) if out is None else out.resolve()
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).exists():
            console.say(f"error: {root} is not empty and not an earlier demo's folder; give "
                        "--out an empty or new folder")
            return 1
        shutil.rmtree(root)  # an earlier demo's output: start afresh
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by `qsmnode demo`; the next demo replaces it\n")
    console.say("qsmnode demo: a 7T scanner sends a multi-echo GRE slab over the motor cortex;")
    console.say("the node receives it, runs QSM and the M1 analysis, and sends the results "
                "to a PACS.")
    if follow_up:
        console.say("Follow-up: two visits of the same patient a year apart; the second is "
                    "compared with the first's report, found in the PACS.")
    console.say(f"everything goes to {root}")
    console.say()
    timeline = Timeline()
    pacs: Pacs | None = None
    node: NodeProcess | None = None
    visits = FOLLOW_UP_VISITS if follow_up else (VISIT,)
    jobs: list[JobRecord] = []
    try:
        line = console.line("PACS")
        # the node's AE title may query and retrieve (Orthanc refuses unknown AEs a C-FIND)
        pacs = start_pacs("orthanc" if follow_up else pacs_kind, root / "pacs",
                          {NODE_AE: ("127.0.0.1", 104)} if follow_up else None)
        line.finish(pacs.where())
        node = NodeProcess(root / "node", pacs, follow_up=follow_up)
        line = console.line("node")
        node.start()
        line.finish(f"{NODE_AE} listening on 127.0.0.1:{node.port}; status page "
                    f"http://127.0.0.1:{node.http_port}/")
        for n, visit in enumerate(visits):
            if visit.label:
                console.say()
                console.say(visit.label)
            folder = root / "scanner" if len(visits) == 1 else root / f"scanner-visit-{n + 1}"
            files, scan = simulate_scan(console, size, folder, visit)
            send_study(console, files, node, timeline)
            send_study_to_pacs(console, files, pacs)
            job = wait_for_job(console, node, timeline, frozenset(j.id for j in jobs))
            job = follow_job(console, node, job.id, timeline)
            n_sent = follow_delivery(console, node, pacs, timeline)
            jobs.append(job)
    except (DemoError, RuntimeError) as exc:
        console.say()
        console.say(f"error: {exc}")
        return 1
    finally:
        if node is not None:
            node.stop()
        if pacs is not None:
            pacs.stop()
    result = job.result or {}
    m1 = result.get("m1", {})
    console.say()
    if m1.get("error"):
        console.say(f"M1 analysis: {m1['error']}")
    else:
        console.say("M1 measurements (the Structured Report holds the same numbers):")
        for row in measurement_table(m1):
            console.say(row)
        contrast = deep_contrast(m1)
        if contrast:
            console.say()
            console.say(f"  {contrast}")
        failed = [f for f in m1.get("flags", []) if not f["passed"]]
        for flag in failed:
            console.say(f"  quality flag {flag['name']}: {flag['text']}")
    if follow_up:
        console.say()
        for row in follow_up_table(m1.get("follow_up") or {}):
            console.say(row)
    study = (result.get("acquisition") or {}).get("study_uid")
    pngs = key_image_pngs(node, root / "key-images", study) if node is not None else []
    console.say()
    console.say(f"derived objects: {n_sent}, delivered to {pacs.kept() if pacs else '-'}")
    console.say(f"  and in the node's outbox {node.state_dir / 'outbox' if node else '-'}")
    for png in pngs:
        console.say(f"key image preview: {png}")
    console.say()
    console.say("latency, by stage:")
    rows = latency_rows(timeline)
    for name, took in rows:
        console.say(f"  {name:<55} {seconds(took):>9}")
    if report_json is not None:
        report_json.write_text(json.dumps({"scan": scan, "timeline": timeline.as_dict(),
                                           "latency": dict(rows), "derived": n_sent,
                                           "result": result,
                                           "visits": [j.result or {} for j in jobs]},
                                          indent=2, default=str))
    return 0
