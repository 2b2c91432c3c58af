"""The M1 normative table at the edge: read from its TOML file into a
:class:`~qsmnode.m1.measure.NormativeTable`.

The file format is shown by ``config/m1_normative.example.toml``; the numerical core validates
the parsed mapping (:meth:`NormativeTable.from_mapping`) and never touches files. Here the file
is read, and every problem (missing, unreadable, not TOML, a bad table) becomes a
:class:`NormativeTableError` whose message names the file and the problem. The configuration
checks the table this way at load time (``[pipeline] m1_normative_table``), and each job reads
it again with :func:`load_normative_table` (cached per process).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from qsmnode.node.tomlfile import TomlFileError, read_toml

if TYPE_CHECKING:
    from qsmnode.m1.measure import NormativeTable


class NormativeTableError(ValueError):
    """The normative table cannot be used (the message names the file and the problem)."""


def read_normative_table(path: Path | str) -> NormativeTable:
    """Read and validate a normative table file.

    Raises:
        NormativeTableError: the file is missing, unreadable, not TOML, or not a valid table.
    """
    from qsmnode.m1.measure import NormativeTable

    path = Path(path)
    try:
        data = read_toml(path)
    except TomlFileError as exc:
        raise NormativeTableError(f"{path}: {exc}") from None
    try:
        return NormativeTable.from_mapping(data)
    except ValueError as exc:
        message = str(exc).removeprefix("normative table: ")
        raise NormativeTableError(f"{path}: not a valid normative table: {message}") from None


@functools.cache
def load_normative_table(path: str) -> NormativeTable:
    """:func:`read_normative_table`, once per process and path (the jobs' cache)."""
    return read_normative_table(path)
