"""Reading a TOML file, with each way it can fail said in plain words (for the configuration
and the M1 normative table)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class TomlFileError(ValueError):
    """Why a TOML file could not be read; the message does not name the file."""


def read_toml(path: Path) -> dict[str, Any]:
    """The file's table.

    Raises:
        TomlFileError: missing, a directory, unreadable, not UTF-8, or not valid TOML.
    """
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise TomlFileError("file not found") from None
    except IsADirectoryError:
        raise TomlFileError("is a directory, expected a TOML file") from None
    except OSError as exc:
        raise TomlFileError(f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TomlFileError(f"not UTF-8 text (bad byte at offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TomlFileError(f"TOML syntax error: {exc}") from None
