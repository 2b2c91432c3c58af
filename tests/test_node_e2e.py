"""The whole node against real peers: dcmtk ``storescu`` sends to ``qsmnode serve`` (a
subprocess), the tracker groups, the worker children load, and ``qsmnode status`` reports.

Simulated Siemens, Siemens XA, Philips and Enhanced studies (four senders at once) and the real
scanner files in ../shared/data each become one acquisition whose job ends done; the phase in
the spool loads as the simulation's truth. SIGKILL in mid-transfer and in mid-job, incomplete
studies, and worker crashes leave the node serving and the store right. Waits are deadlines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest

from qsmnode.dicom.load import AcquisitionPlan, group_acquisitions, load_acquisition
from qsmnode.dicom.load import summarize_files as summarize_paths
from tests.dicomutil import PHASE_STEP, angle_error, voxel_map
from tests.nodeutil import (
    HOOKS_ENV,
    Node,
    make_node,
    small_simulation,
    study_uid,
    wait_for,
    write_study,
)

pytestmark = pytest.mark.slow

# These tests are about reception, grouping, loading and jobs: the pipeline only checks and
# summarizes what it loaded (QSM and after have tests of their own).
CHECK_ONLY = {"pipeline": {"qsm": False}}
QUICK = {"tracker": {"quiet_period_s": 1, "max_wait_s": 120}, **CHECK_ONLY}
HOOKED = "tests.nodeutil:hooked_job"
STYLES = {31: "siemens", 32: "siemens-xa", 33: "philips", 34: "enhanced"}


def spool_plans(node: Node, study: str) -> list[AcquisitionPlan]:
    files = sorted((node.state_dir / "spool" / study).rglob("*.dcm"))
    return [p for p in group_acquisitions(summarize_paths(files))
            if isinstance(p, AcquisitionPlan)]


def instance_number(files: list[Path], part: str, *numbers: int) -> list[Path]:
    """Siemens-style files of a part (``M`` or ``P``) by instance number (slice-fastest, echo
    by echo: echo ``e``, slice ``k`` is ``12 e + k + 1`` in the small study)."""
    return [f for f in files if f.parent.name.endswith(f"_{part}") and int(f.stem) in numbers]


def copy_without(files: list[Path], leave_out: list[Path], out: Path) -> Path:
    for f in files:
        if f not in leave_out:
            target = out / f.parent.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    return out


@pytest.fixture(scope="module")
def four_studies(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("four")
    for seed, style in STYLES.items():
        write_study(out / str(seed), style, seed)
    return {seed: out / str(seed) for seed in STYLES}


def test_four_senders_at_once_make_four_acquisitions_with_the_true_phase(
    nodes: list[Node], tmp_path: Path, four_studies: dict[int, Path]
) -> None:
    # a 2 s quiet period: four senders on a busy machine may pause for a second
    node = make_node(nodes, tmp_path / "node", sections={
        "tracker": {"quiet_period_s": 2, "max_wait_s": 120}, "workers": {"processes": 2},
        **CHECK_ONLY,
    }).start()
    env = {**os.environ, "TCP_NODELAY": "1"}
    senders = [subprocess.Popen(node.storescu_command("+sd", "+r", folder), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for folder in four_studies.values()]
    for sender in senders:
        output, _ = sender.communicate(timeout=180)
        assert sender.returncode == 0, output
    jobs = node.wait_jobs(4)
    assert [(j.state, j.attempts) for j in jobs] == [("done", 1)] * 4

    report = node.status_json()
    assert report["summary"]["instances"] == 3 * 72 + 1
    acquisitions = {a["study_uid"]: a for a in report["acquisitions"]}
    assert acquisitions.keys() == {study_uid(seed) for seed in STYLES}
    truth = small_simulation().gre
    series_per_style = {"siemens": 2, "siemens-xa": 6, "philips": 1, "enhanced": 1}
    results = {j["acquisition_id"]: j["result"]["acquisition"] for j in report["jobs"]}
    for seed, style in STYLES.items():
        acquisition = acquisitions[study_uid(seed)]
        summary = acquisition["summary"]
        assert acquisition["state"] == "accepted"
        assert len(acquisition["series_uids"]) == series_per_style[style]
        assert summary["n_echoes"] == 3 and summary["shape"] == list(truth.shape)
        assert summary["echo_times_s"] == pytest.approx(truth.echo_times_s, abs=1e-9)
        result = results[acquisition["id"]]
        assert result["shape"] == summary["shape"]
        assert result["echo_times_s"] == pytest.approx(summary["echo_times_s"])
        assert np.allclose(result["affine"], summary["affine"])
        assert result["field_strength_t"] == pytest.approx(7.0)

        # what the job loaded is the truth: load it again from the spool and compare
        [plan] = spool_plans(node, study_uid(seed))
        loaded = load_acquisition(plan).gre
        assert np.allclose(loaded.affine, summary["affine"])
        ia, ib = voxel_map(loaded.affine, truth.affine, truth.shape)
        for e in range(truth.n_echoes):
            got = loaded.phase[..., e][ia].reshape(truth.shape)
            want = truth.phase[..., e][ib].reshape(truth.shape)
            assert angle_error(got, want) <= PHASE_STEP[style] * 0.5 + 1e-5, style

    # classic series complete after the quiet period, the Enhanced file by its count
    completions = {s["sop_class_uid"]: set() for s in report["series"]}
    for s in report["series"]:
        completions[s["sop_class_uid"]].add(s["completion"])
    assert completions == {"1.2.840.10008.5.1.4.1.1.4": {"quiet"},
                           "1.2.840.10008.5.1.4.1.1.4.1": {"count"}}
    assert report["counts"]["jobs"]["done"] == 4 and not report["problems"]

    table = node.status()
    assert table.returncode == 0, table.stderr
    assert "acquisitions: 4 accepted; jobs: 4 done; problems: 0 open, 0 resolved" in table.stdout
    assert "series 5, 6 'gre_qsm_7T', 3 echoes (TE 5, 10.5, 16 ms), 24×28×12, siemens 7 T" \
        in table.stdout
    node.stop()
    log = node.log()
    assert "SIM^PHANTOM" not in log and "QSMNODE-SIM-0001" not in log


def test_real_scanner_files_become_one_acquisition_each(
    nodes: list[Node], tmp_path: Path, shared_data: Path
) -> None:
    # the classic and the Enhanced Philips files share their series UID: two nodes
    classic = make_node(nodes, tmp_path / "classic", sections=QUICK).start()
    enhanced = make_node(nodes, tmp_path / "enhanced", sections=QUICK).start()
    siemens = shared_data / "siemens-3t-megre-1slice"
    philips = shared_data / "philips-3t-2echo"
    for node, folders in ((classic, [siemens / "mag", siemens / "phase", philips / "classic"]),
                          (enhanced, [philips / "enhanced"])):
        for folder in folders:
            sent = node.storescu("+sd", "+r", folder)
            assert sent.returncode == 0, sent.stdout + sent.stderr
    jobs = classic.wait_jobs(2) + enhanced.wait_jobs(1)
    assert [j.state for j in jobs] == ["done"] * 3, [j.last_error for j in jobs]

    first = pydicom.dcmread(sorted((siemens / "mag").iterdir())[0], stop_before_pixels=True)
    expected = {
        "siemens": ([0.004, 0.010, 0.016], [int(first.Columns), int(first.Rows), 1], 2),
        "philips": ([0.0023, 0.0046], [80, 80, 53], 1),
    }
    for node in (classic, enhanced):
        for acquisition in node.read(lambda s: s.acquisitions(), []):
            summary = acquisition.summary
            tes, shape, n_series = expected[summary["vendor"]]
            assert summary["echo_times_s"] == pytest.approx(tes, abs=1e-7)
            assert summary["shape"] == shape and summary["n_echoes"] == len(tes)
            assert len(acquisition.series_uids) == n_series
            assert summary["field_strength_t"] == pytest.approx(3.0)

    # the Enhanced file is the classic files in one: the job loaded the same arrays
    [from_classic] = [j.result["acquisition"] for j in jobs[:2]
                      if j.result["acquisition"]["vendor"] == "philips"]
    from_enhanced = jobs[2].result["acquisition"]
    assert np.allclose(from_classic["affine"], from_enhanced["affine"])
    for key in ("phase_range", "magnitude_range", "echo_times_s"):
        assert from_classic[key] == pytest.approx(from_enhanced[key]), key
    assert from_classic["phase_scaling"] == from_enhanced["phase_scaling"]
    classic.stop()
    enhanced.stop()


def test_sigkill_mid_transfer_then_the_rest_completes_the_acquisition(
    nodes: list[Node], tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    files = write_study(folder, "siemens", 71)
    node = make_node(nodes, tmp_path / "node", sections=QUICK).start()
    env = {**os.environ, "TCP_NODELAY": "0"}  # ~25 instances/s: easy to kill mid-transfer
    sender = subprocess.Popen(node.storescu_command(*files), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: node.count() >= 15, "15 instances stored", 60, 0.01, node.log)
        node.kill()
        sender.wait(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert 15 <= node.count() < 72 and sender.returncode != 0

    node.start()
    resent = node.storescu(*files)  # the scanner sends the study again
    assert resent.returncode == 0, resent.stderr
    [job] = node.wait_jobs(1)
    assert (job.state, job.attempts) == ("done", 1)
    [acquisition] = node.read(lambda s: s.acquisitions(), [])
    assert acquisition.summary["instances"] == 72 and node.count() == 72
    assert not node.read(lambda s: s.problems(), [])  # any problem of the partial study resolved
    node.stop()


def test_sigkill_while_a_job_runs_reruns_it_exactly_once(
    nodes: list[Node], tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    hooks = {study_uid(72): {"marker": str(marker), "delay_s": 60, "slow_attempts": 1}}
    node = make_node(nodes, tmp_path / "node", sections=QUICK, job_function=HOOKED,
                     env={HOOKS_ENV: json.dumps(hooks)}).start()
    write_study(tmp_path / "study", "siemens", 72)
    sent = node.storescu("+sd", "+r", tmp_path / "study")
    assert sent.returncode == 0, sent.stderr
    wait_for(marker.exists, "the job to start in its worker", 60, 0.1, node.log)
    worker_pid = int(marker.read_text().split()[0])
    assert [j.state for j in node.jobs_in("running")] == ["running"]
    node.kill()

    def gone() -> bool:  # a zombie counts as gone: who reaps orphans is up to PID 1
        try:
            return psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, "the orphaned worker to exit", 30, 0.1)  # it must not go on alone
    node.start()
    [job] = node.wait_jobs(1)
    assert (job.state, job.attempts) == ("done", 2)
    runs = [line.split() for line in marker.read_text().splitlines()]
    assert [run[2] for run in runs] == ["1", "2"]  # attempt 1 killed, attempt 2 done: once
    assert f"job {job.id} queued again: interrupted: the node stopped while attempt 1 was " \
           "running" in node.log()
    node.stop()


def test_worker_crash_and_out_of_memory_fail_the_attempt_and_the_node_serves(
    nodes: list[Node], tmp_path: Path
) -> None:
    hooks = {study_uid(73): {"exit": 9}, study_uid(74): {"allocate_mb": 1024}}
    node = make_node(nodes, tmp_path / "node", job_function=HOOKED,
                     env={HOOKS_ENV: json.dumps(hooks)},
                     sections={**QUICK, "workers": {"job_attempts": 1, "memory_budget_mb": 256,
                                                    "processes": 2}}).start()
    for seed in (73, 74):
        files = write_study(tmp_path / str(seed), "enhanced", seed)
        assert node.storescu(*files).returncode == 0
    node.wait_jobs(2)
    assert node.echoscu().returncode == 0  # the node goes on serving, and processing
    files = write_study(tmp_path / "75", "enhanced", 75)
    assert node.storescu(*files).returncode == 0
    node.wait_jobs(3)
    by_study = node.read(lambda s: {s.acquisition(j.acquisition_id).study_uid: j  # type: ignore[union-attr]
                                    for j in s.jobs()}, {})
    crash, memory, fine = (by_study[study_uid(seed)] for seed in (73, 74, 75))
    assert (crash.state, crash.attempts, crash.last_error) == (
        "failed", 1, "the worker process exited with status 9 without a result")
    assert (memory.state, memory.attempts) == ("failed", 1)
    assert memory.last_error.startswith("out of memory: the job needed more than the memory "
                                        "budget of 256 MiB")
    assert (fine.state, fine.attempts) == ("done", 1)
    table = node.status().stdout
    assert "jobs: 1 done, 2 failed" in table
    assert "the worker process exited with status 9 without a result" in table
    assert node.process is not None and node.process.poll() is None
    node.stop()


def test_incomplete_studies_are_problems_without_jobs(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = make_node(nodes, tmp_path / "node", sections=QUICK).start()
    a = write_study(tmp_path / "a", "siemens", 81)
    b = write_study(tmp_path / "b", "siemens", 82)
    c = write_study(tmp_path / "c", "siemens", 83)
    missing = instance_number(a, "M", 18)  # magnitude echo 2, one slice
    folders = [
        copy_without(a, missing, tmp_path / "send-a"),
        copy_without(b, instance_number(b, "P", 12, 24, 36), tmp_path / "send-b"),
        copy_without(c, [f for f in c if int(f.stem) > 12], tmp_path / "send-c"),
    ]
    for folder in folders:
        assert node.storescu("+sd", "+r", folder).returncode == 0

    wait_for(lambda: len(node.read(lambda s: s.problems(), [])) == 3, "three problems", 60,
             0.2, node.log)
    report = node.status_json()
    problems = {p["study_uid"]: p["reason"] for p in report["problems"]}
    assert ("missing slices: magnitude echo 2 (TE 10.5 ms, series 5) has 11 of 12 slices, "
            "1 slice missing") in problems[study_uid(81)]
    assert "phase is one slice short of magnitude: phase echo 1 (TE 5 ms, series 6) has 11 " \
           "of 12 slices, 1 slice missing" in problems[study_uid(82)]
    assert "1 echo, the rule needs at least 2" in problems[study_uid(83)]
    assert not report["acquisitions"] and not report["jobs"]
    table = node.status().stdout
    assert "problems: 3 open, 0 resolved" in table and "1 slice missing" in table
    log = node.log()
    assert f"study {study_uid(81)}: problem" in log and "has 11 of 12 slices" in log

    # the missing slice arrives (late): the study is grouped again, and processed
    assert node.storescu(*missing).returncode == 0
    [job] = node.wait_jobs(1)
    assert job.state == "done"
    resolved = node.read(lambda s: {p.study_uid: p.resolved_at
                                    for p in s.problems(include_resolved=True)}, {})
    assert resolved[study_uid(81)] is not None
    assert resolved[study_uid(82)] is None and resolved[study_uid(83)] is None
    assert [a.study_uid for a in node.read(lambda s: s.acquisitions(), [])] == [study_uid(81)]
    assert "re-opened" in node.log()
    node.stop()


# ------------------------------------------------------------------------------------------------
# the real-data corpus


def _dicom_files(folder: Path) -> list[Path]:
    """The DICOM Part 10 files under ``folder`` (NIfTI, JSON, licences and READMEs are not
    sent: a scanner sends DICOM)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                head = f.read(132)
            if head[128:132] == b"DICM":
                found.append(path)
    return found


def test_every_real_file_is_accounted_for(nodes: list[Node], tmp_path: Path,
                                          shared_data: Path) -> None:
    """Every DICOM file under ../shared/data, sent with storescu to a running node (QSM, M1 and
    derived objects on): no traceback in the log; every series is in an acquisition, passed
    over with a reason, or in a problem with a reason; the right acquisitions are processed
    (Philips: done; the Siemens single slice: failed once, saying QSM needs a 3-D volume); the
    XA30 session leaves no problem; the derived objects pass dciodvfy; no patient name or ID
    reaches the log or the status. The Enhanced Philips file shares its series UID with the
    classic files (the same scan exported twice), so it goes to a second node."""
    from tests.conftest import require_tool
    from tests.derivedutil import dciodvfy_errors

    require_tool("dciodvfy", "dicom3tools")
    files = _dicom_files(shared_data)
    enhanced = [f for f in files if "philips-3t-2echo/enhanced" in f.as_posix()]
    rest = [f for f in files if f not in enhanced]
    assert enhanced and len(rest) > 300
    config = {"tracker": {"quiet_period_s": 2, "max_wait_s": 300},
              "workers": {"job_attempts": 3}}
    main = make_node(nodes, tmp_path / "main", sections=config).start()
    second = make_node(nodes, tmp_path / "second", sections=config).start()
    for node, sent in ((main, rest), (second, enhanced)):
        folder = tmp_path / f"send-{node.root.name}"
        for n, path in enumerate(sent):  # one folder: one storescu association
            target = folder / f"{n:05d}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
        done = node.storescu("-R", "+sd", folder)  # -R: propose the files' SOP classes
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda node=node, sent=sent: node.count() == len(sent), "every file stored",
                 120, 0.2, node.log)
    jobs = main.wait_jobs(2, timeout_s=600) + second.wait_jobs(1, timeout_s=600)

    secrets, shown = set(), set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(ds.get(keyword) or "").strip()
            if len(value) >= 4:
                secrets.add(value)
        for keyword in ("StudyDescription", "SeriesDescription"):  # shown on purpose
            shown.add(str(ds.get(keyword) or "").strip())
    secrets -= shown  # an anonymiser wrote the Philips study description as its patient name
    for node in (main, second):
        wait_for(lambda node=node: not node.read(lambda store: store.studies_ready(), [None]),
                 "every study grouped", 60, 0.2, node.log)
        report = node.status_json()
        table = node.status().stdout
        log = node.log()
        assert "Traceback" not in log, log[-4000:]
        for secret in secrets:
            assert secret not in log and secret not in table and secret not in json.dumps(
                report), "patient data in the log or the status"
        in_acquisition = {u for a in report["acquisitions"] for u in a["series_uids"]}
        in_problem = {u: p["reason"] for p in report["problems"] if p["resolved_at"] is None
                      for u in p["series_uids"]}
        for series in report["series"]:
            uid = series["series_uid"]
            explained = (uid in in_acquisition or series["passed_over"]
                         or in_problem.get(uid))
            assert explained, f"series {series['series_number']} "\
                              f"'{series['series_description']}' is not accounted for"
        xa30 = {s["study_uid"] for s in report["series"]
                if str(s["series_description"]).startswith("DWI_dir80")}
        assert not any(p["study_uid"] in xa30 for p in report["problems"])

    done = [j for j in jobs if j.state == "done"]
    assert len(done) == 2, [(j.state, j.last_error) for j in jobs]
    assert {j.result["acquisition"]["vendor"] for j in done} == {"philips"}
    [single] = [j for j in jobs if j.state == "failed"]
    assert single.attempts == 1 and "QSM needs a 3-D volume" in (single.last_error or "")
    outbox = sorted((main.state_dir / "outbox").rglob("*.dcm")) + sorted(
        (second.state_dir / "outbox").rglob("*.dcm"))
    assert outbox
    failures = {p.name: dciodvfy_errors(p) for p in outbox}
    assert not any(failures.values()), {n: e for n, e in failures.items() if e}
    main.stop()
    second.stop()
