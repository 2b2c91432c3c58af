"""The whole configuration, :class:`Settings`: one field per TOML section, and the checks
across sections (destination names, the follow-up PACS, the ports of the listener and HTTP)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qsmnode.node.config.delivery import DestinationConfig, FollowUpConfig, SenderConfig
from qsmnode.node.config.fields import INTERNAL
from qsmnode.node.config.hl7 import HL7Config
from qsmnode.node.config.network import HTTPConfig, ListenerConfig
from qsmnode.node.config.pipeline import PipelineConfig, RulesConfig, TrackerConfig
from qsmnode.node.config.runtime import (
    AuditConfig,
    LoggingConfig,
    PathsConfig,
    RetentionConfig,
    WorkersConfig,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "config" / "qsmnode.toml"
"""The documented default configuration file shipped with the repository."""

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
    source: Path = field(default=DEFAULT_CONFIG, metadata=INTERNAL)
    env_overrides: tuple[str, ...] = field(default=(), metadata=INTERNAL)

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
