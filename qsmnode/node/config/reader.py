"""Generic validation: the parsed TOML converted into the dataclass tree of the schema.

:class:`Reader` walks the dataclass fields and their type hints (``str``, ``int``, ``float``,
``bool``, ``Path``, ``X | None``, ``tuple[X, ...]``, nested dataclasses, and tuples of
dataclasses for TOML arrays of tables), applies the constraints in each field's metadata (see
:func:`qsmnode.node.config.fields.rule`) and a dataclass's ``_cross_check(at)``, and raises
:class:`~qsmnode.node.config.fields.ConfigError` naming the file (or environment variable), the
dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
from collections.abc import Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any, NoReturn, get_args, get_origin, get_type_hints

from qsmnode.node.config.fields import ConfigError, format_number


def toml_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of dataclass ``cls`` that are TOML keys, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of dataclass ``cls`` (cached)."""
    return get_type_hints(cls)


def without_none(hint: Any) -> Any:
    """``X`` for ``X | None``, else the hint unchanged."""
    if isinstance(hint, types.UnionType):
        others = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(others) != 1:
            raise TypeError(f"unsupported union {hint!r}")
        return others[0]
    return hint


_TYPE_WORDS: dict[type, str] = {
    bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path",
}


def expect_words(typ: type, meta: Mapping[str, Any]) -> str:
    """What a field expects, in words, from its type and metadata."""
    if "expect" in meta:
        return str(meta["expect"])
    if "choices" in meta:
        return "one of " + ", ".join(meta["choices"])
    words = _TYPE_WORDS[typ]
    if "unit" in meta:
        words += f" ({meta['unit']})"
    ge, le, gt = meta.get("ge"), meta.get("le"), meta.get("gt")
    if ge is not None and le is not None:
        return f"{words} {format_number(ge)}-{format_number(le)}"
    conditions = []
    if gt is not None:
        conditions.append(f"> {format_number(gt)}")
    if ge is not None:
        conditions.append(f">= {format_number(ge)}")
    if le is not None:
        conditions.append(f"<= {format_number(le)}")
    return " ".join([words, " and ".join(conditions)]) if conditions else words


def describe(value: Any) -> str:
    """A TOML value, as quoted in an error message."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a date/time ({value})"


def _meets(value: Any, meta: Mapping[str, Any]) -> bool:
    if "ge" in meta and value < meta["ge"]:
        return False
    if "gt" in meta and value <= meta["gt"]:
        return False
    if "le" in meta and value > meta["le"]:
        return False
    if "choices" in meta and value not in meta["choices"]:
        return False
    return "check" not in meta or bool(meta["check"](value))


class Reader:
    """Converts the parsed TOML into the dataclass tree, raising ConfigError on any problem."""

    def __init__(self, label: str, base_dir: Path, origins: Mapping[str, str]) -> None:
        self.label = label  # the file, as named by the caller
        self.base_dir = base_dir  # relative paths in the file are relative to this
        self.origins = origins  # dotted key -> environment variable that set it

    def fail(self, key: str, message: str) -> NoReturn:
        variable = self.origins.get(key)
        if variable is not None:
            raise ConfigError(f"{variable} (environment, overrides {key}): {message}")
        raise ConfigError(f"{self.label}: {key}: {message}")

    def table(self, cls: type, raw: Any, at: str) -> Any:
        """Build dataclass ``cls`` from the TOML table ``raw``; ``at`` prefixes its keys."""
        known = toml_fields(cls)
        if not isinstance(raw, dict):
            self.fail(at.rstrip("."), f"expected a table, got {describe(raw)}")
        for key in raw:
            if key not in known:
                self._unknown(key, at, list(known))
        hints = type_hints(cls)
        values: dict[str, Any] = {}
        for name, spec in known.items():
            key = at + name
            if name in raw:
                values[name] = self.value(raw[name], hints[name], key, spec.metadata)
            elif spec.default is MISSING and spec.default_factory is MISSING:
                typ = without_none(hints[name])
                expect = expect_words(typ, spec.metadata) if typ in _TYPE_WORDS else "a value"
                self.fail(key, f"missing required key (expected {expect})")
        built = cls(**values)
        cross_check = getattr(built, "_cross_check", None)
        if cross_check is not None:
            for key, message in cross_check(at):
                self.fail(key, message)
        return built

    def _unknown(self, key: str, at: str, known: list[str]) -> NoReturn:
        what = "section" if not at else "key"
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {json.dumps(close[0])}? " if close else ""
        self.fail(at + key, f"unknown {what} ({hint}known {what}s: {', '.join(known)})")

    def value(self, raw: Any, hint: Any, key: str, meta: Mapping[str, Any]) -> Any:
        """Convert one TOML value to the field type ``hint``."""
        hint = without_none(hint)  # TOML has no null: an optional key is simply left out
        if dataclasses.is_dataclass(hint):
            return self.table(hint, raw, key + ".")
        if get_origin(hint) is tuple:
            item = get_args(hint)[0]
            if not isinstance(raw, list):
                if dataclasses.is_dataclass(item):
                    expect = f"an array of tables ([[{key}]])"
                else:
                    expect = f"an array (each item {expect_words(item, meta)})"
                self.fail(key, f"expected {expect}, got {describe(raw)}")
            if dataclasses.is_dataclass(item):
                return tuple(self.table(item, v, f"{key}[{i}].") for i, v in enumerate(raw))
            return tuple(self.value(v, item, f"{key}[{i}]", meta) for i, v in enumerate(raw))
        return self.scalar(raw, hint, key, meta)

    def scalar(self, raw: Any, typ: type, key: str, meta: Mapping[str, Any]) -> Any:
        if typ not in _TYPE_WORDS:
            raise TypeError(f"{key}: unsupported field type {typ!r}")
        if typ is bool:
            ok = isinstance(raw, bool)
        elif typ is int:
            ok = isinstance(raw, int) and not isinstance(raw, bool)
        elif typ is float:
            ok = isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw)
        else:
            ok = isinstance(raw, str) and raw != ""
        value = float(raw) if ok and typ is float else raw
        if not ok or not _meets(value, meta):
            self.fail(key, f"expected {expect_words(typ, meta)}, got {describe(raw)}")
        if typ is Path:
            path = Path(value).expanduser()
            base = Path.cwd() if key in self.origins else self.base_dir
            return path if path.is_absolute() else base / path
        return value
