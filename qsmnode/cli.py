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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
