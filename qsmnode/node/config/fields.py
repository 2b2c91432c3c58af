"""What the configuration's fields share: the error, the field metadata and the value checks.

:class:`ConfigError` is the one exception of the configuration. :func:`rule` writes a field's
constraints into its metadata (read by :mod:`qsmnode.node.config.reader`); the checks and the
words for AE titles, hosts and names are used by the sections of several modules.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any


class ConfigError(Exception):
    """A configuration problem. The message names the file or variable, the key and the fix."""


def rule(
    *,
    expect: str | None = None,
    unit: str | None = None,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], bool] | None = None,
    port: bool = False,
) -> dict[str, Any]:
    """Field metadata: constraints, and the words used in error messages.

    ``expect`` replaces the generated description of what is expected; ``unit`` is added to it;
    ``ge``/``le``/``gt`` bound numbers; ``choices`` lists allowed strings; ``check`` is a predicate
    on the converted value; ``port`` marks an int field that the environment may override. For
    ``tuple[X, ...]`` fields the constraints apply to each item.
    """
    given = {
        "expect": expect, "unit": unit, "ge": ge, "le": le, "gt": gt,
        "choices": choices, "check": check,
    }
    meta: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    if port:
        meta["port"] = True
    return meta


INTERNAL: dict[str, Any] = {"internal": True}
"""Metadata of fields that are not TOML keys."""

# AE title: printable ASCII (0x20-0x7E) except backslash (0x5C), 1-16 characters.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

AE_TITLE_EXPECT = (
    "an AE title: 1-16 printable ASCII characters, no backslash, "
    "no leading or trailing spaces"
)
HOST_EXPECT = "a hostname or IP address"
NAME_EXPECT = (
    "a name of 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
)
"""What a destination's ``name`` expects (:func:`is_name`)."""


def is_ae_title(text: str) -> bool:
    """True for a valid DICOM AE title (leading and trailing spaces refused: not significant)."""
    return bool(_AE_TITLE.fullmatch(text)) and text.strip(" ") == text


def is_host(text: str) -> bool:
    """True for an IPv4/IPv6 address or an RFC 1123 hostname."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return True
    if len(text) > 253 or re.fullmatch(r"[0-9.]+", text):  # a malformed IPv4 address
        return False
    return bool(_HOSTNAME.fullmatch(text))


def is_name(text: str) -> bool:
    """True for the name of a destination (see :data:`NAME_EXPECT`)."""
    return bool(_NAME.fullmatch(text))


def format_number(value: float) -> str:
    """``30`` for 30.0, ``0.5`` for 0.5: numbers in messages without a needless ``.0``."""
    return str(int(value)) if float(value).is_integer() else repr(value)
