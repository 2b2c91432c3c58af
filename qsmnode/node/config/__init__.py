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
each field's metadata (see :func:`~qsmnode.node.config.fields.rule`). A dataclass may add
cross-field checks in a ``_cross_check(at)`` method. Every problem raises :class:`ConfigError`,
whose message names the file (or environment variable), the dotted key (``listener.port``,
``destinations[1].ae_title``; indices count from 0) and what was expected.

The modules, by concern:

- :mod:`~qsmnode.node.config.fields`: :class:`ConfigError`, field metadata, value checks;
- :mod:`~qsmnode.node.config.network`: ``[listener]`` (its TLS and allowed senders), ``[http]``,
  and the client TLS of destinations;
- :mod:`~qsmnode.node.config.pipeline`: ``[tracker]``, ``[rules]``, ``[pipeline]`` (QSM, M1);
- :mod:`~qsmnode.node.config.delivery`: ``[[destinations]]``, ``[sender]``, ``[follow_up]``;
- :mod:`~qsmnode.node.config.hl7`: ``[hl7]`` and ``[[hl7.destinations]]``;
- :mod:`~qsmnode.node.config.runtime`: ``[paths]``, ``[workers]``, ``[retention]``,
  ``[audit]``, ``[logging]``;
- :mod:`~qsmnode.node.config.settings`: :class:`Settings`, the whole file;
- :mod:`~qsmnode.node.config.reader`: the generic validation;
- :mod:`~qsmnode.node.config.loading`: the file chosen, environment overrides,
  :func:`load_settings`.

Importers use this package: every public name is re-exported here.
"""

from qsmnode.node.config.delivery import DestinationConfig, FollowUpConfig, SenderConfig
from qsmnode.node.config.fields import (
    AE_TITLE_EXPECT,
    HOST_EXPECT,
    ConfigError,
    is_ae_title,
    is_host,
)
from qsmnode.node.config.hl7 import (
    HL7_NAME_EXPECT,
    VIEWER_URL_FIELDS,
    HL7Config,
    HL7DestinationConfig,
    is_hl7_name,
    viewer_url_problem,
)
from qsmnode.node.config.loading import CONFIG_ENV, ENV_OVERRIDES, ENV_PREFIX, load_settings
from qsmnode.node.config.network import (
    AllowedSenderConfig,
    ClientTLSConfig,
    HTTPConfig,
    ListenerConfig,
    ServerTLSConfig,
)
from qsmnode.node.config.pipeline import (
    M1_ATLASES,
    PipelineConfig,
    RulesConfig,
    TrackerConfig,
)
from qsmnode.node.config.runtime import (
    AuditConfig,
    LoggingConfig,
    PathsConfig,
    RetentionConfig,
    WorkersConfig,
)
from qsmnode.node.config.settings import DEFAULT_CONFIG, Settings

__all__ = [
    "AE_TITLE_EXPECT",
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "ENV_OVERRIDES",
    "ENV_PREFIX",
    "HL7_NAME_EXPECT",
    "HOST_EXPECT",
    "M1_ATLASES",
    "VIEWER_URL_FIELDS",
    "AllowedSenderConfig",
    "AuditConfig",
    "ClientTLSConfig",
    "ConfigError",
    "DestinationConfig",
    "FollowUpConfig",
    "HL7Config",
    "HL7DestinationConfig",
    "HTTPConfig",
    "ListenerConfig",
    "LoggingConfig",
    "PathsConfig",
    "PipelineConfig",
    "RetentionConfig",
    "RulesConfig",
    "SenderConfig",
    "ServerTLSConfig",
    "Settings",
    "TrackerConfig",
    "WorkersConfig",
    "is_ae_title",
    "is_hl7_name",
    "is_host",
    "load_settings",
    "viewer_url_problem",
]
