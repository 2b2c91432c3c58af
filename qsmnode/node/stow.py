"""DICOMweb STOW-RS delivery (dicomweb-client): the alternative to C-STORE for a destination
with ``stow_url`` (:class:`qsmnode.node.config.DestinationConfig`).

:func:`stow_files` has the contract of :func:`qsmnode.node.association.send_over_association`, so
the sender's outbox, retries, holds and exactly-once bookkeeping are the same for both: the files go
in POSTs of :data:`STOW_CHUNK` instances, and each instance's outcome comes from the STOW-RS
response (PS3.18 Store Instances Response): listed in the Referenced SOP Sequence, stored (a Warning
Reason is still stored); in the Failed SOP Sequence, failed with its Failure Reason (0x0111, already
stored, counts as delivered as for C-STORE); not listed, not confirmed (tried again). A server that
cannot be reached, times out on the first POST, or answers 5xx, 401, 403 or 404 to it is
:class:`~qsmnode.node.association.AssociationFailed`: the whole batch stays queued and the
destination waits for its retry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from qsmnode.node.association import (
    AssociationFailed,
    FileOutcome,
    OutgoingFile,
    Peer,
    describe_status,
    is_success,
)

STOW_CHUNK = 20
"""Instances per STOW-RS request."""
_REFUSALS = frozenset({401, 403, 404})


def _session(peer: Peer, timeout_s: float) -> Any:
    """A requests session that verifies the server as ``[destinations.tls]`` says and never
    waits longer than ``timeout_s`` for a connection or an answer."""
    import requests
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            kwargs["timeout"] = kwargs.get("timeout") or timeout_s
            return super().send(request, **kwargs)

    session = requests.Session()
    session.mount("http://", TimeoutAdapter())
    session.mount("https://", TimeoutAdapter())
    tls = peer.tls
    if tls.enabled and tls.ca_file is not None:
        session.verify = str(tls.ca_file)
    if tls.enabled and tls.cert_file is not None and tls.key_file is not None:
        session.cert = (str(tls.cert_file), str(tls.key_file))
    return session


def _uid(item: Any) -> str:
    return str(item.get("ReferencedSOPInstanceUID", "")).strip()


def _reason(item: Any, keyword: str) -> int | None:
    value = item.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def response_outcomes(response: Any) -> dict[str, FileOutcome]:
    """SOP Instance UID -> outcome, from a Store Instances Response dataset."""
    outcomes: dict[str, FileOutcome] = {}
    for item in response.get("ReferencedSOPSequence") or []:
        warning = _reason(item, "WarningReason")
        outcomes[_uid(item)] = FileOutcome(status=0 if warning is None else warning)
    for item in response.get("FailedSOPSequence") or []:
        code = _reason(item, "FailureReason")
        if code is not None and is_success(code):
            outcomes[_uid(item)] = FileOutcome(status=code)
        else:
            outcomes[_uid(item)] = FileOutcome(
                status=code, error="STOW-RS failure " + (describe_status(code) if code
                                                         is not None else "(no reason)"))
    return outcomes


def stow_files(peer: Peer, files: Sequence[OutgoingFile], timeout_s: float = 30.0,
               stop: threading.Event | None = None,
               on_sent: Callable[[int, int], None] | None = None,
               on_outcome: Callable[[Any, FileOutcome], None] | None = None,
               ) -> dict[Any, FileOutcome]:
    """POST the files to ``peer.stow_url`` (see the module docstring).

    Raises:
        AssociationFailed: the server cannot be reached or refuses the first request.
    """
    import pydicom
    import requests
    from dicomweb_client import DICOMwebClient

    url = str(peer.stow_url)
    client = DICOMwebClient(url=url, session=_session(peer, timeout_s))
    client.set_http_retry_params(retry=False)  # the sender's backoff retries, not the client
    outcomes: dict[Any, FileOutcome] = {}

    def done(key: Any, outcome: FileOutcome) -> None:
        outcomes[key] = outcome
        if on_outcome is not None:
            on_outcome(key, outcome)

    for start in range(0, len(files), STOW_CHUNK):
        if stop is not None and stop.is_set():
            break
        chunk, datasets = [], []
        for item in files[start:start + STOW_CHUNK]:
            if not item.path.is_file():
                done(item.key, FileOutcome(error=f"outbox file missing: {item.path}",
                                           lost=True))
                continue
            try:
                datasets.append(pydicom.dcmread(item.path))
            except Exception as exc:  # an unreadable file fails alone
                done(item.key, FileOutcome(
                    error=f"cannot send {item.path}: {type(exc).__name__}: {exc}"))
                continue
            chunk.append(item)
        if not chunk:
            continue
        first = not outcomes
        try:
            response = client.store_instances(datasets)
        except (requests.ConnectionError, requests.Timeout) as exc:
            why = f"STOW-RS to {url}: {type(exc).__name__}: no answer or no connection"
            if first:
                raise AssociationFailed(f"cannot reach {why}") from None
            for item in chunk:
                done(item.key, FileOutcome(error=why, suspect=True))
            return outcomes
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            why = f"STOW-RS to {url} answered HTTP {code}"
            if first and (code >= 500 or code in _REFUSALS):
                raise AssociationFailed(why) from None
            for item in chunk:
                done(item.key, FileOutcome(error=why))
            continue
        answered = response_outcomes(response)
        for item in chunk:
            done(item.key, answered.get(item.sop_instance_uid, FileOutcome(
                error="not confirmed in the STOW-RS response")))
        if on_sent is not None:
            on_sent(len(outcomes), len(files))
    return outcomes
