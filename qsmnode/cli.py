"""The `qsmnode` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qsmnode import __version__


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


def _simulate(args: argparse.Namespace) -> int:
    from qsmnode.sim.run import run_simulation

    return run_simulation(args)


def _demo(args: argparse.Namespace) -> int:
    from qsmnode.sim.run import run_demo

    return run_demo(args.out)


def _serve(args: argparse.Namespace) -> int:
    from qsmnode.node.service import main

    return main(args.config)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def _status(args: argparse.Namespace) -> int:
    import json
    import time

    from qsmnode.node.config import ConfigError, load_settings
    from qsmnode.node.store import Store, StoreError, describe_summary

    try:
        settings = load_settings(args.config)
        with Store.in_state_dir(settings.paths.state_dir, readonly=True) as store:
            summary = store.summary()
            series = store.series()
            path, version = store.path, store.schema_version()
            counts = store.counts()
            new = version >= 2
            acquisitions = store.acquisitions() if new else []
            jobs = store.jobs() if new else []
            problems = store.problems(include_resolved=True) if new else []
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        report = {
            "store": str(path), "schema_version": version, "summary": summary,
            "counts": counts,
            "series": [s.as_dict() for s in series],
            "acquisitions": [a.as_dict() for a in acquisitions],
            "jobs": [j.as_dict() for j in jobs],
            "problems": [p.as_dict() for p in problems],
        }
        print(json.dumps(report, indent=2))
        return 0

    def when(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    def tally(states: dict[str, int]) -> str:
        return ", ".join(f"{n} {state}" for state, n in states.items() if n) or "none"

    print(f"store: {path} (schema {version})")
    print(f"series: {summary['series']} ({summary['series_open']} open, "
          f"{summary['series_complete']} complete); instances: {summary['instances']} "
          f"({summary['bytes'] / 2**20:.1f} MiB)")
    open_problems = [p for p in problems if p.resolved_at is None]
    if new:
        print(f"acquisitions: {tally(counts['acquisitions'])}; jobs: {tally(counts['jobs'])}; "
              f"problems: {len(open_problems)} open, "
              f"{len(problems) - len(open_problems)} resolved")
    if series:
        print()
        _table(
            ("SERIES", "STATE", "INSTANCES", "EXPECTED", "MOD", "LAST RECEIVED", "DESCRIPTION",
             "SERIES UID"),
            [
                (
                    "-" if s.series_number is None else str(s.series_number), s.state,
                    str(s.received_count),
                    "-" if s.expected_count is None else str(s.expected_count),
                    s.modality or "-", when(s.last_received_at), s.series_description or "-",
                    s.series_uid,
                )
                for s in series
            ],
        )
    job_of = {j.acquisition_id: j for j in jobs}
    if acquisitions:
        print()
        _table(
            ("ACQ", "STATE", "JOB", "RECEIVED", "ACQUISITION", "STUDY UID"),
            [
                (
                    str(a.id), a.state if a.reason is None else f"{a.state}: {a.reason}",
                    str(job_of[a.id].id) if a.id in job_of else "-", when(a.created_at),
                    describe_summary(a.summary), a.study_uid,
                )
                for a in acquisitions
            ],
        )
    if jobs:
        print()
        _table(
            ("JOB", "ACQ", "STATE", "ATTEMPTS", "UPDATED", "LAST ERROR"),
            [
                (str(j.id), str(j.acquisition_id), j.state, str(j.attempts), when(j.updated_at),
                 j.last_error or "-")
                for j in jobs
            ],
        )
    if open_problems:
        print()
        _table(
            ("PROBLEM", "FOUND", "STUDY UID", "REASON"),
            [(str(p.id), when(p.created_at), p.study_uid, p.reason) for p in open_problems],
        )
    return 0


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
        "status", help="show the node's series, acquisitions, jobs and problems",
        description="Show what the node has received (series), the acquisitions found in it, "
        "their jobs (state, attempts, last error) and the problems found (images that make "
        "no acquisition, and why). Reads the store; works while the node runs.",
    )
    status.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="TOML file (default: $QSMNODE_CONFIG, else config/qsmnode.toml)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(run=_status)

    demo = commands.add_parser("demo", help="run the demonstration")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
