"""Loading the configuration: which file is read, the environment overrides, and
:func:`load_settings`, which reads, validates and returns the :class:`Settings`."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qsmnode.node.config.fields import ConfigError
from qsmnode.node.config.reader import (
    Reader,
    describe,
    expect_words,
    toml_fields,
    type_hints,
    without_none,
)
from qsmnode.node.config.settings import DEFAULT_CONFIG, Settings
from qsmnode.node.tomlfile import TomlFileError, read_toml

CONFIG_ENV = "QSMNODE_CONFIG"
"""Environment variable naming the configuration file when no path is given."""

ENV_PREFIX = "QSMNODE_"


def _overridable(
    cls: type | None = None, parts: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], type, Mapping[str, Any]]]:
    """The keys the environment may override: Path fields and int fields marked ``port``."""
    cls = Settings if cls is None else cls
    hints = type_hints(cls)
    for name, spec in toml_fields(cls).items():
        typ = without_none(hints[name])
        if dataclasses.is_dataclass(typ):
            yield from _overridable(typ, (*parts, name))
        elif typ is Path or (typ is int and spec.metadata.get("port")):
            yield (*parts, name), typ, spec.metadata


def _env_name(parts: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(parts).upper()


ENV_OVERRIDES: dict[str, str] = {_env_name(parts): ".".join(parts) for parts, _, _ in
                                 _overridable()}
"""Environment variable -> the dotted key it overrides."""


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Write the environment overrides into the parsed TOML; return dotted key -> variable."""
    origins: dict[str, str] = {}
    for parts, typ, meta in _overridable():
        variable = _env_name(parts)
        if variable not in env:
            continue
        text = env[variable]
        value: Any = text
        if typ is int:
            if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):
                raise ConfigError(
                    f"{variable} (environment, overrides {'.'.join(parts)}): "
                    f"expected {expect_words(int, meta)}, got {describe(text)}"
                )
            value = int(text)
        table = raw
        for part in parts[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                break  # the file has a non-table here: validating the file reports it
        else:
            table[parts[-1]] = value
            origins[".".join(parts)] = variable
    return origins


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        return read_toml(path)
    except TomlFileError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def load_settings(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read, validate and return the configuration.

    ``path`` defaults to ``$QSMNODE_CONFIG``, else :data:`DEFAULT_CONFIG`; ``env`` (default
    ``os.environ``) supplies ``QSMNODE_CONFIG`` and the overrides. Raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    label_suffix = ""
    if path is None:
        chosen = env.get(CONFIG_ENV)
        if chosen is None:
            path = DEFAULT_CONFIG
        elif not chosen.strip():
            raise ConfigError(f"{CONFIG_ENV}: expected the path of a TOML file, got an empty "
                              "string")
        else:
            path, label_suffix = chosen, f" (from {CONFIG_ENV})"
    path = Path(path)
    raw = _read_toml(path, f"{path}{label_suffix}")
    origins = _apply_env(raw, env)
    source = path.absolute()
    reader = Reader(f"{path}{label_suffix}", source.parent, origins)
    settings = reader.table(Settings, raw, "")
    return dataclasses.replace(
        settings, source=source, env_overrides=tuple(sorted(set(origins.values())))
    )
