"""Sections of the node's network services: the DICOM listener, who may send to it, TLS (as
server and as client) and the HTTP status endpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qsmnode.node.config.fields import AE_TITLE_EXPECT, HOST_EXPECT, is_ae_title, is_host, rule


def _valid_pdu(size: int) -> bool:
    return size == 0 or 4096 <= size <= 0xFFFFFFFF


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
    cert_file: Path | None = field(default=None, metadata=rule(expect="a PEM file path"))
    key_file: Path | None = field(default=None, metadata=rule(expect="a PEM file path"))
    ca_file: Path | None = field(default=None, metadata=rule(expect="a PEM file path"))
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
    ca_file: Path | None = field(default=None, metadata=rule(expect="a PEM file path"))
    cert_file: Path | None = field(default=None, metadata=rule(expect="a PEM file path"))
    key_file: Path | None = field(default=None, metadata=rule(expect="a PEM file path"))

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

    ae_title: str = field(metadata=rule(expect=AE_TITLE_EXPECT, check=is_ae_title))
    hosts: tuple[str, ...] = field(
        default=(), metadata=rule(expect=HOST_EXPECT, check=is_host)
    )


@dataclass(frozen=True)
class ListenerConfig:
    """``[listener]``: the C-STORE SCP that receives images from the scanner."""

    ae_title: str = field(
        default="QSMNODE", metadata=rule(expect=AE_TITLE_EXPECT, check=is_ae_title)
    )
    host: str = field(default="0.0.0.0", metadata=rule(expect=HOST_EXPECT, check=is_host))
    port: int = field(default=11112, metadata=rule(ge=1, le=65535, port=True))
    max_associations: int = field(default=8, metadata=rule(ge=1))
    max_pdu_bytes: int = field(
        default=262144,
        metadata=rule(expect="0 (no limit) or an integer 4096-4294967295", check=_valid_pdu),
    )
    acse_timeout_s: float = field(default=30.0, metadata=rule(unit="seconds", gt=0))
    dimse_timeout_s: float = field(default=60.0, metadata=rule(unit="seconds", gt=0))
    network_timeout_s: float = field(default=60.0, metadata=rule(unit="seconds", gt=0))
    min_free_disk_mb: int = field(default=1024, metadata=rule(unit="MiB", ge=0))
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
class HTTPConfig:
    """``[http]``: the status and health endpoint."""

    host: str = field(default="127.0.0.1", metadata=rule(expect=HOST_EXPECT, check=is_host))
    port: int = field(
        default=8080,
        metadata=rule(expect="an integer 0-65535 (0 = disabled)", ge=0, le=65535, port=True),
    )
