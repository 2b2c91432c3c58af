"""The public step: :func:`group_acquisitions` runs the rules in order (series records, echo
trains, T1w references, magnitude/phase pairing, evaluation and triage) and returns the results
by study and series number."""

from __future__ import annotations

from functools import partial

from qsmnode.dicom.grouping.echo_train import assemble_candidates
from qsmnode.dicom.grouping.keys import PositionKeys
from qsmnode.dicom.grouping.pairing import Judge, magnitude_with_phase
from qsmnode.dicom.grouping.records import sort_key
from qsmnode.dicom.grouping.results import AcquisitionPlan, Problem
from qsmnode.dicom.grouping.series import collect_units
from qsmnode.dicom.grouping.t1w import T1wFound, t1w_references, unused_t1w, with_t1w
from qsmnode.dicom.grouping.triage import judge_candidate, without_geometry
from qsmnode.dicom.headers import InstanceInfo


def _in_order(
    results: list[tuple[tuple, AcquisitionPlan | Problem]], t1w: T1wFound
) -> list[AcquisitionPlan | Problem]:
    """The results by study and first series number, each plan with its T1w reference, and
    the T1-weighted series no acquisition uses, passed over."""
    results.sort(key=lambda item: item[0])
    out = [
        with_t1w(r, t1w.references, t1w.unusable) if isinstance(r, AcquisitionPlan) else r
        for _, r in results
    ]
    used = {p.t1w.series_uid for p in out if isinstance(p, AcquisitionPlan) and p.t1w}
    for cand, evaluated in t1w.candidates:
        why = unused_t1w(cand, evaluated, used)
        if why is not None:
            out.append(cand.passed_over(why))
    order = {id(r): key for key, r in results}
    out.sort(key=lambda r: order.get(id(r)) or (r.study_uid, r.series_numbers[0] is None,
                                                  r.series_numbers[0] or 0))
    return out


def group_acquisitions(
    infos: list[InstanceInfo],
    min_echoes: int = 2,
    require_phase: bool = True,
    pass_over: bool = True,
    qsm_series: tuple[str, ...] = (),
) -> list[AcquisitionPlan | Problem]:
    """Group instance summaries into acquisitions (the rules: :mod:`qsmnode.dicom.grouping`).

    Args:
        infos: summaries of any instances, in any order; duplicates are ignored.
        min_echoes: fewest echoes an acquisition must have.
        require_phase: report magnitude-only acquisitions as problems (else plan them with
            ``phase=None``).
        pass_over: series that are plainly not QSM candidates come back as
            :class:`PassedOver` (rule 7); False: every series that makes no acquisition is a
            problem.
        qsm_series: series descriptions (shell patterns, case-insensitive) of the site's QSM
            protocol: a series matching one is never passed over.

    Returns:
        Plans, problems and passed-over series, ordered by study and first series number.
    """
    pos_key = PositionKeys()
    clusters, units, no_geometry = collect_units(infos, pos_key)
    candidates = assemble_candidates(units.values())
    t1w = t1w_references(candidates, pos_key)
    judge: Judge = partial(judge_candidate, min_echoes=min_echoes, require_phase=require_phase,
                           pos_key=pos_key, pass_over=pass_over, qsm_series=qsm_series)
    paired = set(t1w.indices)
    results = magnitude_with_phase(candidates, paired, clusters, judge)
    results += [(sort_key(cand), judge(cand))
                for i, cand in enumerate(candidates) if i not in paired]
    results += [without_geometry(series_uid, bad, pass_over, qsm_series)
                for series_uid, bad in no_geometry.items()]
    return _in_order(results, t1w)
