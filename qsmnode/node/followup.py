"""The follow-up's service side: where a job looks for the patient's earlier results.

``[follow_up]`` names a PACS (:class:`~qsmnode.node.config.FollowUpConfig`); a job carries it
as a :class:`FollowUpSource` (plain data, in the job spec). Before the pipeline runs, the job
calls :func:`find_priors`: a C-FIND/C-GET (or C-MOVE) of the patient's earlier qsmnode reports
(:func:`qsmnode.node.prior_query.find_prior_reports`), each read back into numbers
(:func:`qsmnode.dicom.prior_report.read_prior_report`). The pipeline then compares.

Failure never blocks the results: a PACS that is down, refuses or times out gives no priors and
a reason, which the report and the record carry ("no comparison: …"); it is not retried (a
new attempt of the job asks again only if the job itself is retried). Nothing here logs a
patient name or ID.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qsmnode.dicom.prior_report import PriorReportError, read_prior_report
from qsmnode.m1.followup import PriorResult, RetestLimits
from qsmnode.node.association import Peer
from qsmnode.node.config import ClientTLSConfig, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FollowUpSource:
    """The PACS to ask and how (from ``[follow_up]`` and its destination)."""

    peer: Peer
    retrieve: str = "get"
    move_ae_title: str = "QSMNODE_FU"
    move_port: int = 0
    timeout_s: float = 30.0
    max_studies: int = 10
    limits: RetestLimits = field(default_factory=RetestLimits)

    @classmethod
    def from_settings(cls, settings: Settings) -> FollowUpSource | None:
        """The configured source; None when ``[follow_up] pacs`` is not set."""
        config = settings.follow_up
        if config.pacs is None:
            return None
        [destination] = [d for d in settings.destinations if d.name == config.pacs]
        return cls(
            peer=Peer.from_config(destination), retrieve=config.retrieve,
            move_ae_title=config.move_ae_title, move_port=config.move_port,
            timeout_s=config.timeout_s, max_studies=config.max_studies,
            limits=RetestLimits(config.chi_limit_ppm, config.thickness_limit_mm,
                                config.t2star_ratio_limit))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["peer"]["tls"] = {key: None if value is None else
                               (value if isinstance(value, bool) else str(value))
                               for key, value in data["peer"]["tls"].items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FollowUpSource:
        peer = dict(data["peer"])
        tls = peer.pop("tls", None) or {}
        peer["tls"] = ClientTLSConfig(
            enabled=bool(tls.get("enabled", False)),
            **{key: None if tls.get(key) is None else Path(tls[key])
               for key in ("ca_file", "cert_file", "key_file")})
        rest = {key: value for key, value in data.items() if key not in ("peer", "limits")}
        return cls(peer=Peer(**peer), limits=RetestLimits(**data.get("limits", {})), **rest)


def _text(header: Any, keyword: str) -> str:
    value = header.get(keyword, "") if header is not None else ""
    return str(value or "").strip()


def find_priors(source: FollowUpSource, loaded: Any,
                ) -> tuple[tuple[PriorResult, ...] | None, str]:
    """The patient's earlier results in the source's PACS, and a note: ``(priors, "")`` when the
    PACS was asked (``priors`` may be empty), ``(None, why)`` when it could not be."""
    from qsmnode.node.prior_query import PriorQuery, PriorQueryError, find_prior_reports

    header = getattr(loaded, "header", None)
    patient_id = _text(header, "PatientID")
    if not patient_id:
        return None, "the study has no Patient ID, so its earlier studies cannot be looked up"
    query = PriorQuery(patient_id=patient_id,
                       issuer_of_patient_id=_text(header, "IssuerOfPatientID"),
                       study_uid=str(loaded.study_uid),
                       study_date=_text(header, "StudyDate"))
    try:
        search = find_prior_reports(source.peer, query, timeout_s=source.timeout_s,
                                    retrieve=source.retrieve,
                                    move_ae_title=source.move_ae_title,
                                    move_port=source.move_port or None,
                                    max_studies=source.max_studies)
    except PriorQueryError as exc:
        log.warning("study %s: no follow-up comparison: %s", loaded.study_uid, exc)
        return None, str(exc)
    except Exception as exc:  # a bug or an odd answer must not cost the results
        log.warning("study %s: no follow-up comparison: the prior query to %s failed (%s)",
                    loaded.study_uid, source.peer, type(exc).__name__)
        return None, (f"the prior query to {source.peer} failed unexpectedly "
                      f"({type(exc).__name__})")
    priors = []
    for ds in search.reports:
        try:
            priors.append(read_prior_report(ds))
        except PriorReportError as exc:
            log.info("study %s: earlier report %s not used: %s", loaded.study_uid,
                     ds.get("SOPInstanceUID", "?"), exc)
    return tuple(priors), ""
