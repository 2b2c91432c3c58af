"""Rule 7, session triage: series that are plainly not QSM candidates (localiser, BOLD, ASL,
diffusion, derived images, field maps, one echo of magnitude only, no image plane) are passed
over with a one-line reason instead of becoming problems, unless the site's QSM protocol names
match them."""

from __future__ import annotations

import fnmatch
import re

from qsmnode.dicom.grouping.evaluation import evaluate
from qsmnode.dicom.grouping.keys import PositionKeys, plural, te_key
from qsmnode.dicom.grouping.records import Candidate
from qsmnode.dicom.grouping.results import AcquisitionPlan, FrameRef, PassedOver, Problem
from qsmnode.dicom.headers import InstanceInfo, Part, Vendor

_WORD = re.compile(r"[a-z0-9]+")
_KINDS: tuple[tuple[str, frozenset[str], frozenset[str]], ...] = (
    # (what it is, ImageType/FrameType tokens, words of the series description)
    ("a localiser", frozenset({"LOCALIZER", "LOCALISER", "SCOUT"}),
     frozenset({"localizer", "localiser", "scout", "survey", "aascout", "aahead", "3plane"})),
    ("BOLD / fMRI", frozenset({"FMRI", "BOLD"}),
     frozenset({"bold", "fmri", "func", "rsfmri", "resting"})),
    ("arterial spin labelling / perfusion", frozenset({"ASL", "PERFUSION", "CBF", "RCBF"}),
     frozenset({"asl", "pcasl", "pasl", "casl", "perfusion", "cbf", "rcbf", "relcbf", "pwi"})),
    ("diffusion-weighted", frozenset({"DIFFUSION", "ADC", "TRACEW", "TENSOR", "TENSOR_B0"}),
     frozenset({"dwi", "dti", "diffusion", "adc", "tracew", "dki", "hardi"})),
)


def _not_a_gre(cand: Candidate) -> str | None:
    """Why the candidate is plainly not a gradient-echo acquisition for QSM (a localiser, BOLD,
    ASL or diffusion series, or derived images), from ImageType and the series description;
    None when nothing says so."""
    refs = cand.refs
    first = refs[0].instance
    tokens = {t for r in refs for t in r.instance.image_type}
    words = set(_WORD.findall(first.series_description.lower()))
    image_type = f"ImageType {chr(92).join(first.image_type)}"
    derived = all(r.instance.derived for r in refs)
    why = ""
    for what, kind_tokens, kind_words in _KINDS:
        if tokens & kind_tokens:
            why = f"{what}{', derived' if derived else ''} ({image_type})"
            break
        if words & kind_words:
            why = f"{what} (series description '{first.series_description}')"
            why += f", derived ({image_type})" if derived else ""
            break
    else:
        if derived:
            why = f"derived images ({image_type})"
    return f"{why}: not a multi-echo gradient echo for QSM" if why else None


def _plainly_not_candidate(cand: Candidate, require_phase: bool) -> str | None:
    """Why a candidate that makes no acquisition is plainly not a QSM candidate: a
    phase-difference field map, or one echo of magnitude only (None: it looked like a QSM
    candidate, so what is wrong with it is a problem)."""
    refs = cand.refs
    fieldmap = [r for r in refs if r.frame.part is Part.PHASE and r.instance.phase_difference]
    mag_tes = sorted({k for r in refs if r.frame.part is Part.MAGNITUDE
                      for k in [te_key(r.frame)] if k is not None})
    pha_tes = sorted({k for r in refs if r.frame.part is Part.PHASE
                      for k in [te_key(r.frame)] if k is not None})
    siemens_pattern = (refs[0].instance.vendor is Vendor.SIEMENS and len(mag_tes) == 2
                       and pha_tes == [mag_tes[1]])
    b0_map = [r for r in refs if r.frame.part is Part.FIELD_MAP]
    if b0_map and not (set(pha_tes) >= set(mag_tes) and pha_tes):
        return (f"a B0 field map ({plural(len(b0_map), 'field-map image')} "
                f"{_field_map_evidence(b0_map)}), not the phase of every echo: not a QSM "
                "acquisition")
    if fieldmap or siemens_pattern:
        names = sorted({r.instance.sequence_name for r in refs if r.instance.sequence_name})
        how = f", sequence {', '.join(names)}" if names else ""
        return (f"a phase-difference field map (B0 mapping{how}), not the phase of every echo: "
                "not a QSM acquisition")
    parts = {r.frame.part for r in refs}
    if Part.PHASE not in parts and len(mag_tes) <= 1 and require_phase:
        echo = "one echo" if mag_tes else "no echo time"
        return f"{echo}, magnitude only: not a multi-echo gradient echo with phase"
    return None


def _field_map_evidence(refs: list[FrameRef]) -> str:
    """What marks the frames as a B0 field map: their ImageType/FrameType, else their unit."""
    first = refs[0]
    marks = ("FIELD_MAP", "FIELDMAP", "B0MAP", "B0_MAP", "B0 MAP", "B0")
    tokens = [t for t in first.instance.image_type[2:4] if t in marks]
    if tokens:
        return f"marked {tokens[0]}"
    unit = first.frame.units or first.frame.rescale_type
    return f"in {unit}" if unit else "marked as a field map in their frame type"


def _matches_protocol(series_description: str, qsm_series: tuple[str, ...]) -> bool:
    """Whether a series description matches one of the site's QSM protocol names."""
    return any(
        fnmatch.fnmatchcase(series_description.casefold(), p.casefold()) for p in qsm_series
    )


def _asked_for(cand: Candidate, qsm_series: tuple[str, ...]) -> bool:
    """Whether a series of the candidate matches the site's QSM protocol names."""
    return any(_matches_protocol(u.refs[0].instance.series_description, qsm_series)
               for u in cand.units)


def judge_candidate(
    cand: Candidate,
    min_echoes: int,
    require_phase: bool,
    pos_key: PositionKeys,
    pass_over: bool,
    qsm_series: tuple[str, ...],
) -> AcquisitionPlan | Problem:
    """The candidate as a plan, a problem, or passed over (rule 7)."""
    triage = pass_over and not _asked_for(cand, qsm_series)
    if triage:
        why = _not_a_gre(cand)
        if why is not None:
            return cand.passed_over(why)
    result = evaluate(cand, min_echoes, require_phase, pos_key)
    if triage and not isinstance(result, AcquisitionPlan):
        why = _plainly_not_candidate(cand, require_phase)
        if why is not None:
            return cand.passed_over(why)
    return result


def without_geometry(
    series_uid: str, bad: list[InstanceInfo], pass_over: bool, qsm_series: tuple[str, ...]
) -> tuple[tuple, Problem]:
    """A series with instances without image plane geometry: passed over (rule 7), or a
    problem when triage is off or the series is one of the site's QSM protocol."""
    first = bad[0]
    label = (
        f"series {first.series_number} '{first.series_description}' "
        f"(series UID {series_uid})"
    )
    why = (
        f"{plural(len(bad), 'instance')} without image plane geometry (position, "
        "orientation, pixel spacing or matrix missing or invalid); not an image series "
        "that can be processed"
    )
    kind = PassedOver if pass_over and not _matches_protocol(
        first.series_description, qsm_series
    ) else Problem
    item = Problem(
        reason=f"{label}: {why}",
        study_uid=first.study_uid,
        series_uids=(series_uid,),
        series_numbers=(first.series_number,),
    )
    if kind is PassedOver:
        item = PassedOver(**{**vars(item), "reason": f"{label}: passed over: {why}"}, why=why)
    return (first.study_uid, first.series_number is None, first.series_number or 0), item
