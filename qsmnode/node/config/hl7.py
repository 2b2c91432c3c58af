"""Sections of the results sent to the RIS as HL7 v2.5.1 ORU^R01 messages over MLLP: the
flags, the viewer link and the HL7 destinations."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from qsmnode.node.config.fields import (
    HOST_EXPECT,
    NAME_EXPECT,
    format_number,
    is_host,
    is_name,
    rule,
)
from qsmnode.node.config.network import ClientTLSConfig

# HL7 v2 HD namespace IDs and application names: printable ASCII without the delimiters
# (| ^ ~ \\ &), 1-20 characters (MSH-3..6, HD.1 is IS of length 20 in v2.5.1).
_HL7_NAME = re.compile(r"[\x20-\x5b\x5d\x5f-\x7b\x7d]{1,20}")
HL7_NAME_EXPECT = ("1-20 printable ASCII characters without the HL7 delimiters | ^ ~ \\ & "
                   "and no leading or trailing spaces")
VIEWER_URL_FIELDS = ("study_uid", "accession_number", "sr_uid", "seg_uid")
"""The placeholders ``[hl7] viewer_url`` may use."""


def is_hl7_name(text: str) -> bool:
    """True for an HL7 application or facility name (see :data:`HL7_NAME_EXPECT`)."""
    return bool(_HL7_NAME.fullmatch(text)) and text.strip(" ") == text and "&" not in text


def viewer_url_problem(template: str) -> str | None:
    """Why ``template`` is not a usable viewer URL template (None when it is)."""
    import string

    if not re.match(r"https?://", template):
        return "expected an http:// or https:// URL"
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return f"not a valid template ({exc}; write a literal brace as {{{{ or }}}})"
    unknown = [name for name in fields if name not in VIEWER_URL_FIELDS]
    if unknown:
        return (f"unknown placeholder {{{unknown[0]}}} (known: "
                + ", ".join(f"{{{n}}}" for n in VIEWER_URL_FIELDS) + ")")
    return None


@dataclass(frozen=True)
class HL7DestinationConfig:
    """``[[hl7.destinations]]``: one RIS that receives an HL7 v2.5.1 ORU^R01 per result over
    MLLP (:mod:`qsmnode.node.hl7_sender`)."""

    name: str = field(metadata=rule(expect=NAME_EXPECT, check=is_name))
    host: str = field(metadata=rule(expect=HOST_EXPECT, check=is_host))
    port: int = field(metadata=rule(ge=1, le=65535))
    receiving_application: str = field(metadata=rule(expect=HL7_NAME_EXPECT,
                                                     check=is_hl7_name))
    receiving_facility: str = field(metadata=rule(expect=HL7_NAME_EXPECT, check=is_hl7_name))
    sending_application: str = field(
        default="QSMNODE", metadata=rule(expect=HL7_NAME_EXPECT, check=is_hl7_name))
    sending_facility: str = field(
        default="QSMNODE", metadata=rule(expect=HL7_NAME_EXPECT, check=is_hl7_name))
    timeout_s: float = field(default=30.0, metadata=rule(unit="seconds", gt=0))
    """How long to wait to connect, and for each acknowledgement."""
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)


@dataclass(frozen=True)
class HL7Config:
    """``[hl7]``: results to the RIS as HL7 v2.5.1 ORU^R01 messages (none without
    destinations). Retries follow ``[sender]`` (``retry_initial_s``, ``retry_max_s``,
    ``max_attempts``).

    ``z_high`` and ``z_critical``: a z-score at or beyond them (either sign) flags its
    observation H or HH (L or LL below the norm), and a deep-layer χ so flagged makes the
    finding. ``viewer_url``: a link to the results sent in the ORU, with the placeholders
    :data:`VIEWER_URL_FIELDS` (e.g. ``https://pacs/viewer?StudyInstanceUIDs={study_uid}``).
    """

    z_high: float = field(default=2.0, metadata=rule(gt=0))
    z_critical: float = field(default=3.0, metadata=rule(gt=0))
    viewer_url: str | None = field(default=None, metadata=rule(
        expect="an http:// or https:// URL template"))
    destinations: tuple[HL7DestinationConfig, ...] = ()

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.z_critical < self.z_high:
            yield (f"{at}z_critical",
                   f"expected a number >= {at}z_high ({format_number(self.z_high)}), got "
                   f"{format_number(self.z_critical)}")
        if self.viewer_url is not None:
            problem = viewer_url_problem(self.viewer_url)
            if problem is not None:
                yield f"{at}viewer_url", problem
        seen: dict[str, int] = {}
        for index, destination in enumerate(self.destinations):
            if destination.name in seen:
                yield (f"{at}destinations[{index}].name",
                       f"duplicate name {json.dumps(destination.name)} "
                       f"(also {at}destinations[{seen[destination.name]}].name)")
            seen.setdefault(destination.name, index)
