"""Deterministic UIDs for the derived objects (DESIGN.md: "UIDs are deterministic").

Every UID a derived object carries (series, instance, dimension organisation, tracking) is a
``2.25.`` UID made from a UUID version 5 (SHA-1 name-based) over:

- the source: the Study Instance UID, the source Series Instance UIDs and every source SOP
  Instance UID (magnitude and phase, all echoes), so that a different set of source images gives
  different UIDs;
- the algorithm name and version, so that a new version never collides with an old result;
- the role of the object (``"qsm-pm/series"``, ``"qsm-mr/instance"``, ...) and an index.

Processing the same input twice with the same version therefore yields byte-identical UIDs, and
a PACS receiving the result twice stores it once.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from qsmnode.dicom.load import LoadedAcquisition

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://qsmnode/dicom/derived")


def uid_from_name(name: str) -> str:
    """The ``2.25.`` UID of the UUID version 5 of ``name`` in the qsmnode namespace."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def source_fingerprint(study_uid: str, series_uids: Iterable[str], sop_uids: Iterable[str]) -> str:
    """A SHA-256 hex digest identifying a set of source images (order does not matter)."""
    h = hashlib.sha256()
    h.update(study_uid.encode())
    for part in (sorted(set(series_uids)), sorted(set(sop_uids))):
        h.update(b"\x00")
        for uid in part:
            h.update(uid.encode())
            h.update(b"\x01")
    return h.hexdigest()


@dataclass(frozen=True)
class DerivedUids:
    """Makes the UIDs of one processing run: the source fingerprint, algorithm and version.

    ``uid(role, index)`` is a pure function of these and its arguments.
    """

    fingerprint: str
    algorithm_name: str
    algorithm_version: str

    @classmethod
    def for_acquisition(
        cls, loaded: LoadedAcquisition, algorithm_name: str, algorithm_version: str
    ) -> DerivedUids:
        sops = [ref.sop_instance_uid for row in loaded.magnitude_sources for ref in row]
        if loaded.phase_sources is not None:
            sops += [ref.sop_instance_uid for row in loaded.phase_sources for ref in row]
        fingerprint = source_fingerprint(loaded.study_uid, loaded.series_uids, sops)
        return cls(fingerprint, algorithm_name, str(algorithm_version))

    def uid(self, role: str, index: int = 0) -> str:
        """The UID of ``role`` (e.g. ``"qsm-mr/instance"``) number ``index``."""
        return uid_from_name(
            f"{self.fingerprint}/{self.algorithm_name}/{self.algorithm_version}/{role}/{index}"
        )
