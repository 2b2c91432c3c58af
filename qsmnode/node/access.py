"""Who may associate with the receiver, and over what: the access policy and the TLS context.

:class:`AccessPolicy` decides from an association request's AE titles and the peer's address
whether it is accepted (the node's own called AE title; the allowed calling AE titles, each
optionally tied to hosts, resolved at each request); a refusal carries its A-ASSOCIATE-RJ
diagnostic and the reason to log. :func:`server_ssl_context` builds the listener's TLS context
from ``[listener.tls]``; its server sockets defer the handshake, which the receiver runs in the
connection's own thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass, field

from qsmnode.compat import LazyHandshakeContext
from qsmnode.node.config import Settings

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ diagnostics (source 1 = DICOM UL service-user)
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


# ------------------------------------------------------------------------------------------------
# Who may associate


@dataclass(frozen=True)
class Refusal:
    """Why an association request is refused: the A-ASSOCIATE-RJ diagnostic and the log text."""

    diagnostic: int
    reason: str


def _normal_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _resolve(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    ip = _normal_ip(host)
    if ip is not None:
        return {ip}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("cannot resolve allowed sender host %s: %s", host, exc)
        return set()
    return {ip for info in infos if (ip := _normal_ip(str(info[4][0]))) is not None}


@dataclass(frozen=True)
class AccessPolicy:
    """Which associations are accepted: our called AE title, and the allowed calling AE titles
    (each optionally tied to hosts). An empty ``senders`` mapping accepts any calling AE.

    ``senders`` maps a calling AE title to its hosts (empty: any address). Hostnames are
    resolved at each request, so DNS changes apply without a restart.
    """

    called_ae: str
    senders: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        listener = settings.listener
        return cls(listener.ae_title, {s.ae_title: s.hosts for s in listener.allowed_senders})

    def check(self, calling_ae: str, called_ae: str, address: str) -> Refusal | None:
        """None to accept, else the refusal."""
        calling, called = calling_ae.strip(), called_ae.strip()
        if called != self.called_ae:
            return Refusal(CALLED_AE_NOT_RECOGNISED,
                           f"called AE title {called!r} is not ours ({self.called_ae!r})")
        if not self.senders:
            return None
        if calling not in self.senders:
            return Refusal(CALLING_AE_NOT_RECOGNISED,
                           f"calling AE title {calling!r} is not an allowed sender")
        hosts = self.senders[calling]
        if not hosts:
            return None
        peer = _normal_ip(address)
        if peer is not None and any(peer in _resolve(host) for host in hosts):
            return None
        return Refusal(CALLING_AE_NOT_RECOGNISED,
                       f"calling AE title {calling!r} is not allowed from {address}")


# ------------------------------------------------------------------------------------------------
# TLS


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context from ``[listener.tls]``, or None when TLS is off."""
    tls = settings.listener.tls
    if not tls.enabled:
        return None
    context = LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file is not None and tls.key_file is not None  # checked by the config
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=tls.ca_file)
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
