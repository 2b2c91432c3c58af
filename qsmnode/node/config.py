"""Typed, validated configuration of the node.

The configuration is one TOML file, read with :mod:`tomllib` into a tree of frozen dataclasses
rooted at :class:`Settings`. Keys left out of the file take the dataclass defaults; these equal
the values in the documented default file ``config/qsmnode.toml``.

Which file is read: the ``path`` argument of :func:`load_settings`, else ``$QSMNODE_CONFIG``,
else the packaged default ``config/qsmnode.toml``. Relative paths inside the file are relative to
the file's folder, and ``~`` expands to the home folder.

Environment overrides: only paths and ports can be overridden, with ``QSMNODE_<SECTION>_<KEY>``
in upper case; a nested table adds its name (``QSMNODE_LISTENER_TLS_CERT_FILE``). The rule is
taken from the schema: a field typed ``Path``, or an ``int`` field marked ``port`` in its
metadata, outside arrays of tables. :data:`ENV_OVERRIDES` lists them. Relative paths given in the
environment are relative to the current directory. Other ``QSMNODE_*`` variables are ignored.

Validation is generic: :func:`load_settings` walks the dataclass fields and their type hints
(``str``, ``int``, ``float``, ``bool``, ``Path``, ``X | None``, ``tuple[X, ...]``, nested
dataclasses, and tuples of dataclasses for TOML arrays of tables) and applies the constraints in
each field's metadata (see :func:`_rule`). A dataclass may add cross-field checks in a
``_cross_check(at)`` method. Every problem raises :class:`ConfigError`, whose message names the
file (or environment variable), the dotted key (``listener.port``, ``destinations[1].ae_title``;
indices count from 0) and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, get_args, get_origin, get_type_hints

from qsmnode.node.tomlfile import TomlFileError, read_toml

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "qsmnode.toml"
"""The documented default configuration file shipped with the repository."""

CONFIG_ENV = "QSMNODE_CONFIG"
"""Environment variable naming the configuration file when no path is given."""

ENV_PREFIX = "QSMNODE_"


class ConfigError(Exception):
    """A configuration problem. The message names the file or variable, the key and the fix."""


def _rule(
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


_INTERNAL: dict[str, Any] = {"internal": True}  # metadata of fields that are not TOML keys

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


def _valid_pdu(size: int) -> bool:
    return size == 0 or 4096 <= size <= 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class PathsConfig:
    """``[paths]``: where the node keeps its state."""

    state_dir: Path = field(
        default=Path("/var/lib/qsmnode"), metadata=_rule(expect="a directory path")
    )


def _tls_files(
    tls: ServerTLSConfig | ClientTLSConfig, at: str, required: dict[str, str]
) -> Iterator[tuple[str, str]]:
    """Problems with the files of an enabled TLS table: missing keys, then missing files."""
    for name, why in required.items():
        if getattr(tls, name) is None:
            yield f"{at}{name}", f"missing: a file path is required when {why}"
    for name in ("cert_file", "key_file", "ca_file"):
        path = getattr(tls, name)
        if path is not None and not path.is_file():
            yield f"{at}{name}", f"file not found: {path}"


@dataclass(frozen=True)
class ServerTLSConfig:
    """``[listener.tls]``: DICOM TLS on the listener (off by default)."""

    enabled: bool = False
    cert_file: Path | None = field(default=None, metadata=_rule(expect="a PEM file path"))
    key_file: Path | None = field(default=None, metadata=_rule(expect="a PEM file path"))
    ca_file: Path | None = field(default=None, metadata=_rule(expect="a PEM file path"))
    require_client_cert: bool = True

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if not self.enabled:
            return
        required = {
            "cert_file": f"{at}enabled is true",
            "key_file": f"{at}enabled is true",
        }
        if self.require_client_cert:
            required["ca_file"] = f"{at}enabled and {at}require_client_cert are true"
        yield from _tls_files(self, at, required)


@dataclass(frozen=True)
class ClientTLSConfig:
    """``[destinations.tls]``: DICOM TLS towards one destination (off by default).

    Without ``ca_file`` the system's trusted CAs verify the server; ``cert_file`` and
    ``key_file`` (both or neither) give the node a client certificate.
    """

    enabled: bool = False
    ca_file: Path | None = field(default=None, metadata=_rule(expect="a PEM file path"))
    cert_file: Path | None = field(default=None, metadata=_rule(expect="a PEM file path"))
    key_file: Path | None = field(default=None, metadata=_rule(expect="a PEM file path"))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if not self.enabled:
            return
        required: dict[str, str] = {}
        if self.cert_file is not None:
            required["key_file"] = f"{at}cert_file is set"
        if self.key_file is not None:
            required["cert_file"] = f"{at}key_file is set"
        yield from _tls_files(self, at, required)


@dataclass(frozen=True)
class AllowedSenderConfig:
    """``[[listener.allowed_senders]]``: one calling AE title the listener accepts."""

    ae_title: str = field(metadata=_rule(expect=AE_TITLE_EXPECT, check=is_ae_title))
    hosts: tuple[str, ...] = field(
        default=(), metadata=_rule(expect=HOST_EXPECT, check=is_host)
    )


@dataclass(frozen=True)
class ListenerConfig:
    """``[listener]``: the C-STORE SCP that receives images from the scanner."""

    ae_title: str = field(
        default="QSMNODE", metadata=_rule(expect=AE_TITLE_EXPECT, check=is_ae_title)
    )
    host: str = field(default="0.0.0.0", metadata=_rule(expect=HOST_EXPECT, check=is_host))
    port: int = field(default=11112, metadata=_rule(ge=1, le=65535, port=True))
    max_associations: int = field(default=8, metadata=_rule(ge=1))
    max_pdu_bytes: int = field(
        default=262144,
        metadata=_rule(expect="0 (no limit) or an integer 4096-4294967295", check=_valid_pdu),
    )
    acse_timeout_s: float = field(default=30.0, metadata=_rule(unit="seconds", gt=0))
    dimse_timeout_s: float = field(default=60.0, metadata=_rule(unit="seconds", gt=0))
    network_timeout_s: float = field(default=60.0, metadata=_rule(unit="seconds", gt=0))
    min_free_disk_mb: int = field(default=1024, metadata=_rule(unit="MiB", ge=0))
    store_other_sop_classes: bool = False
    tls: ServerTLSConfig = field(default_factory=ServerTLSConfig)
    allowed_senders: tuple[AllowedSenderConfig, ...] = (AllowedSenderConfig("SCANNER7T"),)

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        seen: dict[str, int] = {}
        for index, sender in enumerate(self.allowed_senders):
            if sender.ae_title in seen:
                first = f"{at}allowed_senders[{seen[sender.ae_title]}]"
                yield (
                    f"{at}allowed_senders[{index}].ae_title",
                    f"duplicate AE title {json.dumps(sender.ae_title)} (also in {first}); "
                    "list all its hosts in one entry",
                )
            seen.setdefault(sender.ae_title, index)


@dataclass(frozen=True)
class TrackerConfig:
    """``[tracker]``: when a received series counts as complete."""

    quiet_period_s: float = field(default=10.0, metadata=_rule(unit="seconds", gt=0))
    max_wait_s: float = field(default=600.0, metadata=_rule(unit="seconds", gt=0))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.max_wait_s < self.quiet_period_s:
            yield (
                f"{at}max_wait_s",
                f"expected a number (seconds) >= {at}quiet_period_s "
                f"({_number(self.quiet_period_s)}), got {_number(self.max_wait_s)}",
            )


@dataclass(frozen=True)
class RulesConfig:
    """``[rules]``: which acquisitions are processed."""

    min_echoes: int = field(default=2, metadata=_rule(ge=1))
    require_phase: bool = True
    field_strengths_t: tuple[float, ...] = field(
        default=(), metadata=_rule(unit="tesla", gt=0, le=20)
    )
    pass_over: bool = True
    """Series that are plainly not QSM candidates are passed over (named in the status with
    the reason), not problems (:mod:`qsmnode.dicom.grouping`, rule 7)."""
    qsm_series: tuple[str, ...] = field(
        default=(), metadata=_rule(expect="a shell pattern (e.g. \"*qsm*\")")
    )
    """Series descriptions of the site's QSM protocol (shell patterns, case-insensitive): such
    a series is never passed over; whatever keeps it from processing is a problem."""


M1_ATLASES: tuple[str, ...] = ("hcpex", "juelich-ba4", "harvard-oxford-precentral")
"""The M1 atlases qsmnode knows (qsmnode.dicom.reference_data.ATLASES; a test keeps them equal)."""


@dataclass(frozen=True)
class PipelineConfig:
    """``[pipeline]``: what each job computes.

    ``m1_normative_table``: a TOML file of normative values for the M1 measurements' z-scores
    (None: no z-scores). It is read and checked with the configuration
    (:func:`qsmnode.node.normative.read_normative_table`), so a bad table stops the node at
    start with the file, the key and the problem named.

    ``z_flag``: a deep-layer χ z-score at or beyond it (either sign) is flagged on the key
    images and is the finding of the Key Object Selection (the ORU has its own ``[hl7]
    z_high``).
    """

    qsm: bool = True
    m1: bool = True
    atlas: str = field(default="hcpex", metadata=_rule(choices=M1_ATLASES))
    m1_normative_table: Path | None = field(default=None,
                                            metadata=_rule(expect="a TOML file path"))
    z_flag: float = field(default=2.0, metadata=_rule(gt=0))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.m1_normative_table is None:
            return
        from qsmnode.node.normative import NormativeTableError, read_normative_table

        try:
            read_normative_table(self.m1_normative_table)
        except NormativeTableError as exc:
            yield f"{at}m1_normative_table", str(exc)


@dataclass(frozen=True)
class WorkersConfig:
    """``[workers]``: the process pool that runs QSM jobs."""

    processes: int = field(default=1, metadata=_rule(ge=1))
    memory_budget_mb: int = field(default=8192, metadata=_rule(unit="MiB", ge=256))
    backend: str = field(default="local", metadata=_rule(choices=("local", "dask")))
    """Where job attempts run: "local" child processes, or tasks on a Dask cluster
    (:mod:`qsmnode.node.dask_backend`; ``processes`` then bounds the attempts at once)."""
    scheduler: str | None = field(default=None, metadata=_rule(
        expect="a Dask scheduler address tcp://HOST:PORT",
        check=lambda text: bool(re.fullmatch(r"(tcp|tls)://[^\s:/]+:\d{1,5}", text))))
    job_attempts: int = field(default=3, metadata=_rule(ge=1))
    lease_s: float = field(default=3600.0, metadata=_rule(unit="seconds", gt=0))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.backend == "dask" and self.scheduler is None:
            yield (f"{at}scheduler", 'expected a Dask scheduler address tcp://HOST:PORT with '
                   'backend = "dask", got none')


@dataclass(frozen=True)
class DestinationConfig:
    """``[[destinations]]``: one C-STORE SCP (PACS) that receives the derived objects."""

    name: str = field(
        metadata=_rule(
            expect="a name of 1-64 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit",
            check=lambda text: bool(_NAME.fullmatch(text)),
        )
    )
    ae_title: str = field(metadata=_rule(expect=AE_TITLE_EXPECT, check=is_ae_title))
    host: str = field(metadata=_rule(expect=HOST_EXPECT, check=is_host))
    port: int = field(metadata=_rule(ge=1, le=65535))
    calling_ae_title: str = field(
        default="QSMNODE", metadata=_rule(expect=AE_TITLE_EXPECT, check=is_ae_title)
    )
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    stow_url: str | None = field(default=None, metadata=_rule(
        expect="an http:// or https:// DICOMweb base URL (e.g. http://pacs:8042/dicom-web)",
        check=lambda text: bool(re.fullmatch(r"https?://[^\s]+", text))))
    """When set, the objects go to this DICOMweb service by STOW-RS instead of C-STORE (the
    AE title, host and port then only name the PACS in logs)."""


@dataclass(frozen=True)
class SenderConfig:
    """``[sender]``: retries of C-STORE to the destinations."""

    retry_initial_s: float = field(default=10.0, metadata=_rule(unit="seconds", gt=0))
    retry_max_s: float = field(default=3600.0, metadata=_rule(unit="seconds", gt=0))
    max_attempts: int = field(default=0, metadata=_rule(expect="an integer >= 0 (0 = forever)",
                                                        ge=0))
    timeout_s: float = field(default=60.0, metadata=_rule(unit="seconds", gt=0))
    """How long to wait for a destination: to connect, to negotiate, and for each C-STORE
    response (a large Parametric Map on a busy archive takes a while)."""

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.retry_max_s < self.retry_initial_s:
            yield (
                f"{at}retry_max_s",
                f"expected a number (seconds) >= {at}retry_initial_s "
                f"({_number(self.retry_initial_s)}), got {_number(self.retry_max_s)}",
            )


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

    name: str = field(
        metadata=_rule(
            expect="a name of 1-64 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit",
            check=lambda text: bool(_NAME.fullmatch(text)),
        )
    )
    host: str = field(metadata=_rule(expect=HOST_EXPECT, check=is_host))
    port: int = field(metadata=_rule(ge=1, le=65535))
    receiving_application: str = field(metadata=_rule(expect=HL7_NAME_EXPECT,
                                                      check=is_hl7_name))
    receiving_facility: str = field(metadata=_rule(expect=HL7_NAME_EXPECT, check=is_hl7_name))
    sending_application: str = field(
        default="QSMNODE", metadata=_rule(expect=HL7_NAME_EXPECT, check=is_hl7_name))
    sending_facility: str = field(
        default="QSMNODE", metadata=_rule(expect=HL7_NAME_EXPECT, check=is_hl7_name))
    timeout_s: float = field(default=30.0, metadata=_rule(unit="seconds", gt=0))
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

    z_high: float = field(default=2.0, metadata=_rule(gt=0))
    z_critical: float = field(default=3.0, metadata=_rule(gt=0))
    viewer_url: str | None = field(default=None, metadata=_rule(
        expect="an http:// or https:// URL template"))
    destinations: tuple[HL7DestinationConfig, ...] = ()

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.z_critical < self.z_high:
            yield (f"{at}z_critical",
                   f"expected a number >= {at}z_high ({_number(self.z_high)}), got "
                   f"{_number(self.z_critical)}")
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

    pacs: str | None = field(default=None, metadata=_rule(expect="a destination name"))
    retrieve: str = field(default="get", metadata=_rule(choices=("get", "move")))
    move_ae_title: str = field(default="QSMNODE_FU",
                               metadata=_rule(expect=AE_TITLE_EXPECT, check=is_ae_title))
    move_port: int = field(default=0, metadata=_rule(
        expect="a port 1-65535 (0: none; needed for retrieve = \"move\")", ge=0, le=65535))
    timeout_s: float = field(default=30.0, metadata=_rule(unit="seconds", gt=0))
    max_studies: int = field(default=10, metadata=_rule(ge=1))
    chi_limit_ppm: float = field(default=0.010, metadata=_rule(unit="ppm", gt=0))
    thickness_limit_mm: float = field(default=0.25, metadata=_rule(unit="mm", gt=0))
    t2star_ratio_limit: float = field(default=0.05, metadata=_rule(gt=0))

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        if self.pacs is not None and self.retrieve == "move" and self.move_port == 0:
            yield (f"{at}move_port", 'expected a port 1-65535 with retrieve = "move", got 0')


@dataclass(frozen=True)
class HTTPConfig:
    """``[http]``: the status and health endpoint."""

    host: str = field(default="127.0.0.1", metadata=_rule(expect=HOST_EXPECT, check=is_host))
    port: int = field(
        default=8080,
        metadata=_rule(expect="an integer 0-65535 (0 = disabled)", ge=0, le=65535, port=True),
    )


@dataclass(frozen=True)
class RetentionConfig:
    """``[retention]``: removal of the files of finished, delivered studies.

    By age (``enabled``): a study's received images after ``spool_days`` and its derived
    objects after ``outbox_days``, counted from its last event. In an emergency
    (``emergency_margin_mb`` > 0): when free disk falls below ``listener.min_free_disk_mb``
    plus this margin (so always before reception is refused), finished and delivered studies
    go, oldest first, whatever their age, until it is back above. Never anything undelivered or
    not yet processed (:mod:`qsmnode.node.retention`).
    """

    enabled: bool = True
    spool_days: float = field(default=30.0, metadata=_rule(unit="days", ge=0))
    outbox_days: float = field(default=30.0, metadata=_rule(unit="days", ge=0))
    check_interval_s: float = field(default=3600.0, metadata=_rule(unit="seconds", gt=0))
    emergency_margin_mb: int = field(
        default=1024, metadata=_rule(expect="an integer >= 0 (MiB; 0 = no emergency clean)",
                                     ge=0))


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the audit log (:mod:`qsmnode.node.audit`)."""

    enabled: bool = True
    log_file: Path | None = field(default=None, metadata=_rule(expect="a file path"))

    def path(self, state_dir: Path) -> Path | None:
        """The audit log's file (None when disabled): ``log_file``, else in ``state_dir``."""
        if not self.enabled:
            return None
        from qsmnode.node.audit import AUDIT_FILENAME

        return self.log_file if self.log_file is not None else Path(state_dir) / AUDIT_FILENAME


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``."""

    level: str = field(default="INFO", metadata=_rule(choices=("DEBUG", "INFO", "WARNING",
                                                               "ERROR")))


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


@dataclass(frozen=True)
class Settings:
    """The whole configuration. ``source`` is the file read; ``env_overrides`` names the
    environment variables that replaced values from it."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    sender: SenderConfig = field(default_factory=SenderConfig)
    hl7: HL7Config = field(default_factory=HL7Config)
    follow_up: FollowUpConfig = field(default_factory=FollowUpConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: Path = field(default=DEFAULT_CONFIG, metadata=_INTERNAL)
    env_overrides: tuple[str, ...] = field(default=(), metadata=_INTERNAL)

    def _cross_check(self, at: str) -> Iterator[tuple[str, str]]:
        seen: dict[str, int] = {}
        for index, destination in enumerate(self.destinations):
            if destination.name in seen:
                yield (
                    f"{at}destinations[{index}].name",
                    f"duplicate name {json.dumps(destination.name)} "
                    f"(also {at}destinations[{seen[destination.name]}].name)",
                )
            seen.setdefault(destination.name, index)
        follow = self.follow_up.pacs
        if follow is not None:
            known = {d.name: d for d in self.destinations}
            if follow not in known:
                yield (f"{at}follow_up.pacs", f"expected the name of one of {at}destinations "
                       f"({', '.join(known) or 'none configured'}), got {json.dumps(follow)}")
            elif known[follow].stow_url:
                yield (f"{at}follow_up.pacs", f"destination {json.dumps(follow)} is reached "
                       "by DICOMweb STOW-RS; the follow-up queries by C-FIND and needs a DICOM "
                       "(DIMSE) destination")
        listener, http = self.listener, self.http
        if http.port == listener.port and (
            http.host == listener.host or {http.host, listener.host} & _WILDCARD_HOSTS
        ):
            yield (
                f"{at}http.port",
                f"expected a port other than {at}listener.port ({listener.port}) "
                "on the same address, got the same",
            )


# --------------------------------------------------------------------------------------------
# Generic validation


def _toml_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _without_none(hint: Any) -> Any:
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


def _number(value: float) -> str:
    """``30`` for 30.0, ``0.5`` for 0.5: numbers in messages without a needless ``.0``."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def _expect(typ: type, meta: Mapping[str, Any]) -> str:
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
        return f"{words} {_number(ge)}-{_number(le)}"
    conditions = []
    if gt is not None:
        conditions.append(f"> {_number(gt)}")
    if ge is not None:
        conditions.append(f">= {_number(ge)}")
    if le is not None:
        conditions.append(f"<= {_number(le)}")
    return " ".join([words, " and ".join(conditions)]) if conditions else words


def _describe(value: Any) -> str:
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


class _Reader:
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
        known = _toml_fields(cls)
        if not isinstance(raw, dict):
            self.fail(at.rstrip("."), f"expected a table, got {_describe(raw)}")
        for key in raw:
            if key not in known:
                self._unknown(key, at, list(known))
        hints = _hints(cls)
        values: dict[str, Any] = {}
        for name, spec in known.items():
            key = at + name
            if name in raw:
                values[name] = self.value(raw[name], hints[name], key, spec.metadata)
            elif spec.default is MISSING and spec.default_factory is MISSING:
                typ = _without_none(hints[name])
                expect = _expect(typ, spec.metadata) if typ in _TYPE_WORDS else "a value"
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
        hint = _without_none(hint)  # TOML has no null: an optional key is simply left out
        if dataclasses.is_dataclass(hint):
            return self.table(hint, raw, key + ".")
        if get_origin(hint) is tuple:
            item = get_args(hint)[0]
            if not isinstance(raw, list):
                if dataclasses.is_dataclass(item):
                    expect = f"an array of tables ([[{key}]])"
                else:
                    expect = f"an array (each item {_expect(item, meta)})"
                self.fail(key, f"expected {expect}, got {_describe(raw)}")
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
            self.fail(key, f"expected {_expect(typ, meta)}, got {_describe(raw)}")
        if typ is Path:
            path = Path(value).expanduser()
            base = Path.cwd() if key in self.origins else self.base_dir
            return path if path.is_absolute() else base / path
        return value


def _overridable(
    cls: type | None = None, parts: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], type, Mapping[str, Any]]]:
    """The keys the environment may override: Path fields and int fields marked ``port``."""
    cls = Settings if cls is None else cls
    hints = _hints(cls)
    for name, spec in _toml_fields(cls).items():
        typ = _without_none(hints[name])
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
                    f"expected {_expect(int, meta)}, got {_describe(text)}"
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
    reader = _Reader(f"{path}{label_suffix}", source.parent, origins)
    settings = reader.table(Settings, raw, "")
    return dataclasses.replace(
        settings, source=source, env_overrides=tuple(sorted(set(origins.values())))
    )
