"""The `qsmnode` command line."""

# The parser and the small commands; the larger ones are modules of qsmnode.commands (process,
# status), imported when they run. (The docstring above is the parser's description.)

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qsmnode import __version__
from qsmnode.qsm import DEFAULT_METHOD as DEFAULT_QSM_METHOD


def _config_check(args: argparse.Namespace) -> int:
    from qsmnode.node.config import ConfigError, load_settings

    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{settings.source}: OK")
    return 0


# The simulator's sizes and DICOM styles, named here so that every command starts without
# importing the simulator (a test checks they match qsmnode.sim).
SIM_SIZES = ("tiny", "small-slab", "slab", "brain")
SIM_STYLES = ("siemens", "siemens-xa", "philips", "enhanced")


def _als_setting(text: str) -> tuple[str, float]:
    from qsmnode.sim.phantom import M1_AREA_NAMES

    area, sep, value = text.partition("=")
    if not sep or area not in M1_AREA_NAMES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected AREA=PPM with AREA one of {', '.join(M1_AREA_NAMES)}"
        )
    try:
        return area, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number (ppm)") from None


def _peer(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:11112")
    return host, int(port)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


def _qsm(args: argparse.Namespace) -> int:
    """``qsmnode qsm``: one folder, or a BIDS dataset as a BIDS App (qsmnode.bids.app)."""
    from qsmnode.bids.app import run

    return run(args)


def _simulate(args: argparse.Namespace) -> int:
    from qsmnode.sim.run import run_simulation

    written = run_simulation(args)
    if isinstance(written, int):
        return written
    if not args.send:
        return 0
    from qsmnode.node.storescu import SendError, send_paths

    host, port = args.send
    try:
        report = send_paths(written, host, port, args.called_ae, args.calling_ae)
    except SendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = {p: s for p, s in report.statuses.items() if s != 0}
    resumed = (f" ({report.associations} associations: resumed after a lost one)"
               if report.associations > 1 else "")
    print(f"sent {len(report.statuses) - len(failed)} of {len(written)} "
          f"instances to {args.called_ae}@{host}:{port}{resumed}")
    for path, status in failed.items():
        print(f"error: {path}: status 0x{status:04X}", file=sys.stderr)
    for path, reason in report.errors.items():
        print(f"error: {path}: {reason}", file=sys.stderr)
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from qsmnode.demo.run import run_demo

    return run_demo(args.out, args.size, args.pacs, args.report_json,
                    follow_up=args.follow_up)


def _serve(args: argparse.Namespace) -> int:
    from qsmnode.node.service import main

    return main(args.config)


def _status(args: argparse.Namespace) -> int:
    from qsmnode.commands.status import run_status

    return run_status(args.config, as_json=args.json)


def _retry(args: argparse.Namespace) -> int:
    """``qsmnode retry``: queue failed jobs again, from the images still in the spool."""
    import time

    from qsmnode.node.config import ConfigError, load_settings
    from qsmnode.node.store import Store, StoreError

    try:
        settings = load_settings(args.config)
        state_dir = settings.paths.state_dir
        if not (state_dir / "qsmnode.sqlite3").is_file():
            raise StoreError(f"{state_dir}: no store here (has the node run yet?)")
        with Store.in_state_dir(state_dir) as store:
            if args.job is not None:
                job = store.job(args.job)
                if job is None or job.state != "failed":
                    why = "there is no such job" if job is None else f"it is {job.state}"
                    print(f"error: job {args.job} is not a failed job: {why}", file=sys.stderr)
                    return 1
                candidates = [job]
            else:
                candidates = store.jobs("failed")
                if args.study is not None:
                    studies = {a.id: a.study_uid for a in (
                        store.acquisition(j.acquisition_id) for j in candidates) if a}
                    candidates = [j for j in candidates
                                  if studies.get(j.acquisition_id) == args.study]
                    if not candidates:
                        print(f"error: study {args.study} has no failed job", file=sys.stderr)
                        return 1
            ready = []
            for job in candidates:
                images = store.job_instances(job.id)
                missing = [i for i in images if not (state_dir / i.path).is_file()]
                if images and not missing:
                    ready.append(job.id)
                    continue
                print(f"error: job {job.id} is not queued again: {len(missing)} of its "
                      f"{len(images)} images are no longer in the spool; send the series "
                      "again", file=sys.stderr)
            queued = store.retry_jobs(time.time(), job_ids=ready) if ready else []
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for job in queued:
        print(f"job {job.id} queued again (acquisition {job.acquisition_id})")
    print(f"{len(queued)} failed job{'' if len(queued) == 1 else 's'} queued again with "
          "their attempts reset; a running node starts them within seconds")
    return 0 if len(queued) == len(candidates) else 1


def _resend(args: argparse.Namespace) -> int:
    import time

    from qsmnode.node.config import ConfigError, load_settings
    from qsmnode.node.hl7_queue import HL7Queue
    from qsmnode.node.store import Store, StoreError

    try:
        settings = load_settings(args.config)
        if not (settings.paths.state_dir / "qsmnode.sqlite3").is_file():
            raise StoreError(f"{settings.paths.state_dir}: no store here (has the node run yet?)")
        with Store.in_state_dir(settings.paths.state_dir) as store:
            if args.study is not None:
                derived = {record.path for record in store.outbox(study_uid=args.study)}
                if not derived:
                    print(f"error: no derived instances of study {args.study} in the outbox",
                          file=sys.stderr)
                    return 1
                if not derived & store.outbox_paths():
                    [removed, *_] = [p for p in store.prunings(1000, args.study)
                                     if p.kind == "outbox"] or [None]
                    when = "" if removed is None else (
                        f" on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(removed.at))} "
                        f"({removed.reason} clean, pruning {removed.id})")
                    print(f"error: the derived instances of study {args.study} were removed by "
                          f"retention{when}: there is nothing left to send again",
                          file=sys.stderr)
                    return 1
            count = store.requeue_sends(
                time.time(), study_uid=args.study, failed_only=args.all_failed,
                destinations=[d.name for d in settings.destinations])
            oru = HL7Queue(store).requeue_failed(time.time(), study_uid=args.study)
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = f"study {args.study}" if args.study is not None else "failed sends"
    print(f"{count} send{'' if count == 1 else 's'} queued again ({what}); a running node "
          "sends them within a second")
    if oru:
        print(f"{oru} failed HL7 ORU message{'' if oru == 1 else 's'} queued again")
    return 0


def _process(args: argparse.Namespace) -> int:
    from qsmnode.commands.process import run_process

    return run_process(args.folder, args.out, args.send, args.config,
                       calling_ae=args.calling_ae)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsmnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qsmnode {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="configuration commands")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument(
        "file", nargs="?", type=Path, default=None,
        help="TOML file (default: $QSMNODE_CONFIG, else config/qsmnode.toml)",
    )
    check.set_defaults(run=_config_check)

    qsm = commands.add_parser(
        "qsm", help="run the QSM engine on BIDS MEGRE NIfTI: one folder, or a BIDS dataset "
        "as a BIDS App (researchers)",
        usage="qsmnode qsm DIR --out OUT\n"
              "       qsmnode qsm BIDS_DIR OUTPUT_DIR participant [--participant-label L ...] "
              "[--session-label L ...] [--m1] [--scheduler ADDRESS]\n"
              "       qsmnode qsm BIDS_DIR OUTPUT_DIR group",
        description="Reads <prefix>_echo-<n>_part-<mag|phase>_MEGRE.nii[.gz] with JSON "
        "sidecars (EchoTime, MagneticFieldStrength), as dcm2niix or qsm-forward write them. "
        "With --out: the one acquisition in DIR, written as plain NIfTI names (χ, R2*, T2*, "
        "magnitude, masks, fields) with the input's affine, plus quality.json. As a BIDS App: "
        "every anat/*_MEGRE acquisition of the dataset (sub-, ses-, acq-, run- entities) is "
        "one task on Dask distributed (a local cluster, or --scheduler), written as BIDS "
        "derivatives in OUTPUT_DIR/qsmnode (Chimap, R2starmap, T2starmap, masks, fields, "
        "JSON sidecars); finished acquisitions are skipped on a re-run. The group level "
        "writes OUTPUT_DIR/qsmnode/group/cohort.tsv and figures.",
    )
    qsm.add_argument("input", type=Path, metavar="DIR|BIDS_DIR",
                     help="a folder holding one BIDS MEGRE acquisition, or a BIDS dataset root")
    qsm.add_argument("output_dir", type=Path, nargs="?", default=None, metavar="OUTPUT_DIR",
                     help="BIDS App form: where the derivatives go (OUTPUT_DIR/qsmnode)")
    qsm.add_argument("analysis_level", nargs="?", default=None,
                     choices=("participant", "group"), metavar="{participant,group}",
                     help="BIDS App form: participant (each acquisition) or group (the "
                     "cohort table and figures)")
    qsm.add_argument("--out", type=Path, default=None,
                     help="single-folder form: output folder")
    qsm.add_argument("--method", default=DEFAULT_QSM_METHOD, metavar="NAME",
                     help=f"the QSM pipeline: tfi (preconditioned total field inversion, the "
                     f"node's; default {DEFAULT_QSM_METHOD}), pdf-tv-admm (PDF background "
                     "removal and TV-ADMM) or single-step-tv (the Laplacian single-step TV: "
                     "fastest, loses the grey/white contrast); benchmarks/RESULTS.md")
    qsm.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL",
                     help="only these participants (with or without sub-)")
    qsm.add_argument("--session-label", nargs="+", default=None, metavar="LABEL",
                     help="only these sessions (with or without ses-)")
    qsm.add_argument("--m1", action="store_true",
                     help="also run the M1 analysis: *_desc-m1_dseg.nii.gz with labels and "
                     "measurements TSV")
    qsm.add_argument("--normative", type=Path, default=None, metavar="TOML",
                     help="normative table for the M1 z-scores and the figures' norm band")
    qsm.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="a running Dask scheduler, e.g. tcp://host:8786 (default: a local "
                     "cluster on this machine)")
    qsm.add_argument("--wait-for-workers", type=float, default=60.0, metavar="SECONDS",
                     help="with --scheduler: how long to wait for its first worker "
                     "(default 60)")
    qsm.add_argument("--n-workers", type=_positive_int, default=None, metavar="N",
                     help="workers of the local cluster (default: one per core, at most one "
                     "per acquisition)")
    qsm.add_argument("--memory-limit", default=None, metavar="SIZE",
                     help="memory per local worker, e.g. 4GiB (default: the machine's memory "
                     "shared among the workers)")
    qsm.set_defaults(run=_qsm)

    sim = commands.add_parser(
        "simulate",
        help="simulate a 7T multi-echo GRE study with ground truth; write it or send it",
        description="Simulate the head phantom as a 7T scanner would acquire it. Writes the "
        "DICOM study, the ground truth (NIfTI) and BIDS MEGRE NIfTI, and can send the study "
        "by C-STORE.",
    )
    sim.add_argument("--size", choices=SIM_SIZES, default="tiny", help="default: tiny")
    sim.add_argument("--style", choices=SIM_STYLES, default="siemens",
                     help="how the scanner writes DICOM (default: siemens)")
    sim.add_argument("--seed", type=int, default=0, help="noise, phase offset and UIDs")
    sim.add_argument("--snr", type=float, default=None, help="echo-1 SNR in brain")
    sim.add_argument("--als", type=_als_setting, action="append", default=[],
                     metavar="AREA=PPM", help="deep-layer χ increase, e.g. left_hand=0.03")
    sim.add_argument("--out", type=Path, default=None,
                     help="output folder (default: a temporary one when sending)")
    sim.add_argument("--send", type=_peer, metavar="HOST:PORT", help="C-STORE the study")
    sim.add_argument("--called-ae", default="QSMNODE", help="the receiver's AE title")
    sim.add_argument("--calling-ae", default="SCANNER7T", help="the scanner's AE title")
    sim.set_defaults(run=_simulate)

    serve = commands.add_parser(
        "serve", help="run the node in the foreground (listener, tracker, workers); logs to "
        "stderr",
        description="Run the node: receive images by C-STORE into the spool and the store, "
        "group complete studies into acquisitions and process each one in a worker process. "
        "Logs go to stderr. SIGTERM or SIGINT stops it cleanly.",
    )
    serve.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="TOML file (default: $QSMNODE_CONFIG, else config/qsmnode.toml)")
    serve.set_defaults(run=_serve)

    status = commands.add_parser(
        "status", help="show the node's series, acquisitions, jobs, problems and deliveries",
        description="Show what the node has received (series), the acquisitions found in it, "
        "their jobs (state, attempts, last error), the problems found (images that make "
        "no acquisition, and why) and the delivery of the derived objects per destination "
        "(pending, sent, failed, attempts, last error). Reads the store; works while the "
        "node runs.",
    )
    status.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="TOML file (default: $QSMNODE_CONFIG, else config/qsmnode.toml)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(run=_status)

    resend = commands.add_parser(
        "resend", help="queue derived objects for sending again",
        description="Queue sends again, due now, with their attempts reset: every send of "
        "one study's derived objects (sent ones too, and to destinations added since), or "
        "every failed send; failed HL7 ORU messages (of the study, or all) too. Works while "
        "the node runs.",
    )
    which = resend.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="the study's derived objects")
    which.add_argument("--all-failed", action="store_true", help="every failed send")
    resend.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="TOML file (default: $QSMNODE_CONFIG, else config/qsmnode.toml)")
    resend.set_defaults(run=_resend)

    retry = commands.add_parser(
        "retry", help="run failed jobs again",
        description="Queue failed jobs again with their attempts reset, to run from the "
        "images in the spool (a job whose images retention removed is not: send the series "
        "again). Works while the node runs.",
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=int, metavar="N", help="one failed job")
    which.add_argument("--study", metavar="UID", help="the failed jobs of one study")
    which.add_argument("--all-failed", action="store_true", help="every failed job")
    retry.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="TOML file (default: $QSMNODE_CONFIG, else config/qsmnode.toml)")
    retry.set_defaults(run=_retry)

    process = commands.add_parser(
        "process", help="process a folder of DICOM files offline; write (and send) the "
        "derived objects",
        description="Run the node's pipeline on every acquisition in a folder of DICOM files "
        "and write the derived objects under --out (<study>/<series>/<sop>.dcm). With --send, "
        "C-STORE them to a configured destination or HOST:PORT:AE (one try).",
    )
    process.add_argument("folder", type=Path, metavar="DIR", help="folder of DICOM files")
    process.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="output folder")
    process.add_argument("--send", metavar="DEST",
                         help="a destination name from the configuration, or HOST:PORT:AE")
    process.add_argument("--calling-ae", default=None, metavar="AE",
                         help="our AE title when sending to HOST:PORT:AE (default QSMNODE)")
    process.add_argument("--config", type=Path, default=None, metavar="FILE",
                         help="TOML file for destinations and rules (needed for --send NAME)")
    process.set_defaults(run=_process)

    demo = commands.add_parser(
        "demo", help="the whole product on this machine: scanner → node → PACS",
        description="Start a receiving PACS (Orthanc when installed, else a built-in "
        "receiver) and a node with a temporary state folder, simulate a 7T scanner sending a "
        "multi-echo GRE slab over the motor cortex, and follow it through reception, QSM, the "
        "M1 analysis and delivery. Ends with the M1 measurements, the key images as PNG and "
        "the latency per stage.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"),
                      help="output folder (replaced if an earlier demo wrote it)")
    demo.add_argument("--size", choices=("slab", "small-slab"), default="slab",
                      help="the realistic 0.4 mm slab (default) or a quicker 0.8 mm one")
    demo.add_argument("--pacs", choices=("auto", "orthanc", "builtin"), default="auto",
                      help="the receiving PACS (default: Orthanc when installed)")
    demo.add_argument("--report-json", type=Path, default=None, metavar="FILE",
                      help="also write the timings and the result as JSON")
    demo.add_argument("--follow-up", action="store_true",
                      help="two visits of the same patient a year apart: the second is compared "
                           "with the first's report, found in the PACS (needs Orthanc)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
