"""Who may associate: the access policy on AE titles and peer addresses.

The policy at work against real peers (refused associations, TLS) is in ``test_receiver.py``.
"""

from __future__ import annotations

from qsmnode.node.access import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    AccessPolicy,
)


def test_access_policy() -> None:
    policy = AccessPolicy("QSMNODE", {"SCANNER7T": (), "SCANNER3T": ("localhost", "192.0.2.7")})
    assert policy.check("SCANNER7T", "QSMNODE", "203.0.113.5") is None
    assert policy.check("SCANNER3T", "QSMNODE", "127.0.0.1") is None  # localhost, resolved
    assert policy.check("SCANNER3T", "QSMNODE", "::ffff:192.0.2.7") is None  # IPv4-mapped
    refusal = policy.check("SCANNER3T", "QSMNODE", "192.0.2.8")
    assert refusal is not None and refusal.diagnostic == CALLING_AE_NOT_RECOGNISED
    assert "not allowed from 192.0.2.8" in refusal.reason
    refusal = policy.check("INTRUDER", "QSMNODE", "127.0.0.1")
    assert refusal is not None and refusal.diagnostic == CALLING_AE_NOT_RECOGNISED
    refusal = policy.check("SCANNER7T", "PACS", "127.0.0.1")
    assert refusal is not None and refusal.diagnostic == CALLED_AE_NOT_RECOGNISED
    assert AccessPolicy("QSMNODE").check("ANYONE", "QSMNODE", "127.0.0.1") is None
