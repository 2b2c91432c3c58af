"""Sections of where the results go: the DICOM destinations (C-STORE or DICOMweb STOW-RS),
the sender's retries, and the follow-up comparison with earlier reports in a PACS."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from qsmnode.node.config.fields import (
    AE_TITLE_EXPECT,
    HOST_EXPECT,
    NAME_EXPECT,
    format_number,
    is_ae_title,
    is_host,
    is_name,
    rule,
)
from qsmnode.node.config.network import ClientTLSConfig


@dataclass(frozen=True)
class DestinationConfig:
    """``[[destinations]]``: one C-STORE SCP (PACS) that receives the derived objects."""

    name: str = field(metadata=rule(expect=NAME_EXPECT, check=is_name))
    ae_title: str = field(metadata=rule(expect=AE_TITLE_EXPECT, check=is_ae_title))
    host: str = field(metadata=rule(expect=HOST_EXPECT, check=is_host))
    port: int = field(metadata=rule(ge=1, le=65535))
    calling_ae_title: str = field(
        default="QSMNODE", metadata=rule(expect=AE_TITLE_EXPECT, check=is_ae_title)
    )
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    stow_url: str | None = field(default=None, metadata=rule(
        expect="an http:// or https:// DICOMweb base URL (e.g. http://pacs:8042/dicom-web)",
        check=lambda text: bool(re.fullmatch(r"https?://[^\s]+", text))))
    """When set, the objects go to this DICOMweb service by STOW-RS instead of C-STORE (the
    AE title, host and port then only name the PACS in logs)."""


@dataclass(frozen=True)
class SenderConfig:
    """``[sender]``: retries of C-STORE to the destinations."""

    retry_initial_s: float = field(default=10.0, metadata=rule(unit="seconds", gt=0))
    retry_max_s: float = field(default=3600.0, metadata=rule(unit="seconds", gt=0))
    max_attempts: int = field(default=0, metadata=rule(expect="an integer >= 0 (0 = forever)",
                                                       ge=0))
    timeout_s: float = field(default=60.0, metadata=rule(unit="seconds", gt=0))
    """How long to wait for a destination: to connect, to negotiate, and for each C-STORE
    response (a large Parametric Map on a busy archive takes a while)."""

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.retry_max_s < self.retry_initial_s:
            yield (
                f"{at}retry_max_s",
                f"expected a number (seconds) >= {at}retry_initial_s "
                f"({format_number(self.retry_initial_s)}), "
                f"got {format_number(self.retry_max_s)}",
            )


@dataclass(frozen=True)
class FollowUpConfig:
    """``[follow_up]``: compare each result with the patient's earlier qsmnode reports in PACS
    (off until ``pacs`` names a destination).

    ``pacs``: the ``[[destinations]]`` entry (by name) queried by C-FIND and retrieved from by
    C-GET (``retrieve = "get"``) or C-MOVE to a temporary listener of this node with
    ``move_ae_title`` on ``move_port`` (``retrieve = "move"``; the PACS must know that AE).
    ``timeout_s`` bounds each step; a PACS that is down or slow gives results without the
    comparison, saying why. ``max_studies``: the newest earlier studies looked at.
    The limits are the test–retest variation of each measure: a change beyond it is flagged
    (defaults and their sources: :mod:`qsmnode.m1.followup`).
    """

    pacs: str | None = field(default=None, metadata=rule(expect="a destination name"))
    retrieve: str = field(default="get", metadata=rule(choices=("get", "move")))
    move_ae_title: str = field(default="QSMNODE_FU",
                               metadata=rule(expect=AE_TITLE_EXPECT, check=is_ae_title))
    move_port: int = field(default=0, metadata=rule(
        expect="a port 1-65535 (0: none; needed for retrieve = \"move\")", ge=0, le=65535))
    timeout_s: float = field(default=30.0, metadata=rule(unit="seconds", gt=0))
    max_studies: int = field(default=10, metadata=rule(ge=1))
    chi_limit_ppm: float = field(default=0.010, metadata=rule(unit="ppm", gt=0))
    thickness_limit_mm: float = field(default=0.25, metadata=rule(unit="mm", gt=0))
    t2star_ratio_limit: float = field(default=0.05, metadata=rule(gt=0))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.pacs is not None and self.retrieve == "move" and self.move_port == 0:
            yield (f"{at}move_port", 'expected a port 1-65535 with retrieve = "move", got 0')

