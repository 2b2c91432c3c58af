"""The ``qsmnode`` command (console script and ``python -m qsmnode``): the start-up, then the
command line."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Check the libraries whose internals qsmnode uses and install its process-wide tweaks
    (:mod:`qsmnode.compat`), then run :func:`qsmnode.cli.main`. An unsupported library version
    is one line on stderr and exit status 1, before any command runs."""
    import sys

    from qsmnode import compat

    try:
        compat.check_versions()
    except compat.IncompatibleLibrary as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    compat.install()
    from qsmnode.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
