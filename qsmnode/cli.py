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

    from qsmnode.sim.scanner import PRESETS
    from qsmnode.sim.vendor_dicom import STYLES

    sim = commands.add_parser(
        "simulate",
        help="simulate a 7T multi-echo GRE study with ground truth; write it or send it",
        description="Simulate the head phantom as a 7T scanner would acquire it. Writes the "
        "DICOM study, the ground truth (NIfTI) and BIDS MEGRE NIfTI, and can send the study "
        "by C-STORE.",
    )
    sim.add_argument("--size", choices=list(PRESETS), default="tiny", help="default: tiny")
    sim.add_argument("--style", choices=list(STYLES), default="siemens",
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

    demo = commands.add_parser("demo", help="run the demonstration")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
