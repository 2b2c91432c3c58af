"""Follow-up (issue 17): the comparison with earlier results (qsmnode.m1.followup), the SR's
protocol and change groups, reading an earlier SR back (qsmnode.dicom.prior_report), and the
node's lookup of a patient's earlier reports in a real PACS (Orthanc). The whole flow, two
visits through scanner, node and PACS (``qsmnode demo --follow-up``), is run by
tests/test_fresh_clone.py, whose demo is the follow-up one (one slow run for both)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from qsmnode.demo.pacs import Orthanc
from qsmnode.dicom.derived import build_derived_objects, source_reader
from qsmnode.dicom.load import LoadedAcquisition, load_folder
from qsmnode.dicom.prior_report import PriorReportError, read_prior_report
from qsmnode.m1.followup import (
    PriorResult,
    Protocol,
    RetestLimits,
    compare,
    current_values,
    why_not_comparable,
)
from qsmnode.m1.result import M1Result, Measurement
from qsmnode.node.association import Peer
from qsmnode.node.followup import FollowUpSource, find_priors
from qsmnode.sim.scanner import Simulation, preset, simulate
from qsmnode.sim.vendor_dicom import SimStudyInfo, write_dicom
from tests.conftest import require_tool
from tests.derivedutil import dciodvfy_errors, m1_from_truth

VERSION = "1.2.3/0.1"
PROTOCOL = Protocol(7.0, (0.5, 0.5, 0.5), (0.005, 0.010, 0.015))
NAN = float("nan")


def _m(area: str, layer: str, chi: float, thickness: float = 2.5, ratio: float = 0.9,
       covered: bool = True) -> Measurement:
    return Measurement(area, layer, 100, covered, chi, 0.01, chi, ratio, 40.0, thickness)


def _result(*measurements: Measurement) -> M1Result:
    import numpy as np

    empty = np.zeros((2, 2, 2), np.uint8)
    return M1Result(empty, empty.astype(np.float32), empty.astype(np.float32),
                    tuple(measurements), ())


def _prior(date: dt.date, values: dict, version: str = VERSION,
           protocol: Protocol | None = PROTOCOL, study: str | None = None) -> PriorResult:
    return PriorResult(study or f"1.2.{date.toordinal()}", date, f"9.9.{date.toordinal()}",
                       "9.8", "1.2.840.10008.5.1.4.1.1.88.34", version, protocol, values)


TODAY = dt.date(2026, 6, 1)


def test_change_per_year_and_the_retest_limit() -> None:
    current = _result(_m("left_hand", "deep", 0.050, thickness=2.2),
                      _m("right_hand", "deep", 0.021))
    prior = _prior(dt.date(2025, 6, 1), {("left_hand", "deep", "chi_mean_ppm"): 0.030,
                                         ("left_hand", "deep", "thickness_mean_mm"): 2.6,
                                         ("right_hand", "deep", "chi_mean_ppm"): 0.020})
    follow = compare(current, TODAY, PROTOCOL, VERSION, [prior])
    assert follow.prior is prior
    assert follow.years == pytest.approx(365 / 365.25)
    chi = follow.change("left_hand", "deep", "chi_mean_ppm")
    assert chi is not None and chi.change == pytest.approx(0.020)
    assert chi.per_year == pytest.approx(0.020 * 365.25 / 365)
    assert chi.exceeds  # 0.020 > 0.010 ppm
    thick = follow.change("left_hand", "deep", "thickness_mean_mm")
    assert thick is not None and thick.change == pytest.approx(-0.4) and thick.exceeds
    right = follow.change("right_hand", "deep", "chi_mean_ppm")
    assert right is not None and not right.exceeds  # 0.001 ppm is test–retest noise
    # a measure the prior did not have is not compared
    assert follow.change("right_hand", "deep", "thickness_mean_mm") is None
    assert {c.measure for c in follow.exceeding()} == {"chi_mean_ppm", "thickness_mean_mm"}
    assert "2 of 3 changes beyond" in follow.note
    # a site's own limit decides
    wide = compare(current, TODAY, PROTOCOL, VERSION, [prior],
                   RetestLimits(chi_mean_ppm=0.05, thickness_mean_mm=1.0))
    assert wide.exceeding() == []


def test_uncovered_areas_are_not_compared() -> None:
    current = _result(_m("left_foot", "deep", NAN, covered=False))
    prior = _prior(dt.date(2025, 1, 1), {("left_foot", "deep", "chi_mean_ppm"): 0.03})
    assert compare(current, TODAY, PROTOCOL, VERSION, [prior]).changes == ()
    assert current_values(current) == {}


@pytest.mark.parametrize(("prior_protocol", "version", "why"), [
    (PROTOCOL, "0.9/0.1", "algorithm version 0.9/0.1"),
    (None, VERSION, "does not record the acquisition protocol"),
    (replace(PROTOCOL, field_strength_t=3.0), VERSION, "3 T, not 7 T"),
    (replace(PROTOCOL, voxel_size_mm=(0.5, 0.5, 1.0)), VERSION, "voxels of"),
    (replace(PROTOCOL, echo_times_s=(0.005, 0.010)), VERSION, "echo times"),
    (replace(PROTOCOL, echo_times_s=(0.005, 0.012, 0.020)), VERSION, "echo times"),
])
def test_a_prior_of_another_version_or_protocol_is_not_comparable(prior_protocol, version,
                                                                  why) -> None:
    prior = _prior(dt.date(2025, 6, 1), {("left_hand", "deep", "chi_mean_ppm"): 0.03},
                   version=version, protocol=prior_protocol)
    assert why in why_not_comparable(PROTOCOL, VERSION, prior)
    follow = compare(_result(_m("left_hand", "deep", 0.05)), TODAY, PROTOCOL, VERSION, [prior])
    assert follow.prior is None and follow.changes == ()
    assert follow.history == (prior,)
    assert follow.not_comparable[0][0] is prior and why in follow.note


def test_within_tolerance_is_comparable() -> None:
    close = replace(PROTOCOL, voxel_size_mm=(0.52, 0.5, 0.5),
                    echo_times_s=(0.0051, 0.0102, 0.0148), field_strength_t=6.98)
    assert why_not_comparable(PROTOCOL, VERSION, _prior(TODAY, {}, protocol=close)) == ""


def test_the_newest_comparable_earlier_study_is_compared_and_all_are_history() -> None:
    key = ("left_hand", "deep", "chi_mean_ppm")
    oldest = _prior(dt.date(2024, 6, 1), {key: 0.020})
    older = _prior(dt.date(2025, 6, 1), {key: 0.030})
    other_version = _prior(dt.date(2025, 12, 1), {key: 0.1}, version="0.9/0.1")
    later = _prior(dt.date(2026, 7, 1), {key: 0.2})  # after this study: not a prior
    same_day = _prior(TODAY, {key: 0.2})
    follow = compare(_result(_m("left_hand", "deep", 0.045)), TODAY, PROTOCOL, VERSION,
                     [later, older, other_version, oldest, same_day])
    assert follow.prior is older
    assert follow.history == (oldest, older, other_version)
    change = follow.change(*key)
    assert change is not None and change.change == pytest.approx(0.015)


def test_no_prior() -> None:
    follow = compare(_result(_m("left_hand", "deep", 0.045)), TODAY, PROTOCOL, VERSION, [])
    assert follow.prior is None and follow.history == ()
    assert "no earlier result" in follow.note


# --- two visits of a 2-D protocol (slice gaps, no QSM): T2* signal ratio and thickness -------

PROTOCOL_2D = Protocol(7.0, (0.3, 0.3, 2.4), (0.005, 0.010, 0.015), slice_thickness_mm=2.0)
"""The seed study's targeted M1 protocol in 2-D: 2 mm slices 2.4 mm apart."""
LEFT_DEEP = ("left_hand", "deep")


def test_two_2d_visits_compare_the_t2star_ratio_and_thickness_only() -> None:
    """Neither 2-D result has χ (QSM is not computed with slice gaps): the ratio and thickness
    are compared, nothing is "not comparable", and the note says why χ was not."""
    current = _result(_m("left_hand", "deep", NAN, thickness=2.2, ratio=0.80),
                      _m("right_hand", "deep", NAN, ratio=0.90))
    prior = _prior(dt.date(2025, 6, 1), {
        (*LEFT_DEEP, "thickness_mean_mm"): 2.3, (*LEFT_DEEP, "t2star_signal_ratio"): 0.90,
        ("right_hand", "deep", "t2star_signal_ratio"): 0.91}, protocol=PROTOCOL_2D)
    follow = compare(current, TODAY, PROTOCOL_2D, VERSION, [prior])
    assert follow.prior is prior and follow.not_comparable == ()
    assert sorted((c.area, c.measure) for c in follow.changes) == [
        ("left_hand", "t2star_signal_ratio"), ("left_hand", "thickness_mean_mm"),
        ("right_hand", "t2star_signal_ratio")]
    assert [(c.area, c.layer, c.measure) for c in follow.exceeding()] == [
        (*LEFT_DEEP, "t2star_signal_ratio")]  # −0.10 beyond 0.05; thickness −0.1 mm within
    assert follow.note == ("compared with the result of 2025-06-01 (1.00 years earlier): 1 of 3 "
                           "changes beyond the test–retest limit; χ not compared: either "
                           "result has none (QSM was not computed)")
    # a 3-D visit with χ after a 2-D one on the same grid: the slice thickness tells them apart
    three_d = replace(PROTOCOL_2D, slice_thickness_mm=2.4)
    assert why_not_comparable(three_d, VERSION, prior) == "slices 2 mm thick, not 2.4 mm"
    # a report made before the slice thickness was recorded: not compared on it
    old = replace(prior, protocol=replace(PROTOCOL_2D, slice_thickness_mm=None))
    assert why_not_comparable(PROTOCOL_2D, VERSION, old) == ""
    with_chi = _result(_m("left_hand", "deep", 0.05, thickness=2.2, ratio=0.80))
    follow = compare(with_chi, TODAY, PROTOCOL_2D, VERSION, [old])
    assert {c.measure for c in follow.changes} == {"thickness_mean_mm", "t2star_signal_ratio"}
    assert follow.note.endswith("; χ not compared: the earlier result has none (QSM was not "
                                "computed)")


# --- the SR: protocol and change groups written, and read back --------------------------------


@pytest.fixture(scope="module")
def sim() -> Simulation:
    scan = preset("tiny", shape=(42, 50, 24), voxel_size_mm=(4.0, 4.0, 6.0),
                  echo_times_s=(0.005, 0.0105, 0.016))
    return simulate(scan)


def _visit(sim: Simulation, root: Path, date: str, study_seed: int) -> tuple[LoadedAcquisition,
                                                                            list[Path]]:
    info = SimStudyInfo(seed=study_seed, study_date=date)
    sources = write_dicom(sim.gre, root / "source", "siemens", info)
    (loaded,) = load_folder(root / "source")
    assert isinstance(loaded, LoadedAcquisition)
    return loaded, sources


def _walk(item: Dataset):
    for child in item.get("ContentSequence") or []:
        yield child
        yield from _walk(child)


def _code(item: Dataset, attr: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(attr)
    return str(seq[0].CodeValue) if seq else ""


def test_a_report_reads_back_as_a_prior_and_a_follow_up_report_holds_the_changes(
        sim: Simulation, tmp_path: Path) -> None:
    require_tool("dciodvfy", "dicom3tools")
    first = m1_from_truth(sim)
    loaded1, sources1 = _visit(sim, tmp_path / "v1", "20250601", 11)
    objects1 = build_derived_objects(loaded1, sim.truth.chi_ppm, sim.truth.r2star_per_s,
                                     first, source_reader(sources1), VERSION)
    path1 = tmp_path / "sr1.dcm"
    objects1.report.save_as(path1, enforce_file_format=True)

    prior = read_prior_report(pydicom.dcmread(path1))
    assert prior.study_uid == loaded1.study_uid
    assert prior.study_date == dt.date(2025, 6, 1)
    assert prior.report_uid == objects1.report.SOPInstanceUID
    assert prior.algorithm_version == VERSION
    gre = loaded1.gre
    assert prior.protocol is not None
    assert prior.protocol.field_strength_t == pytest.approx(gre.field_strength_t)
    assert prior.protocol.voxel_size_mm == pytest.approx(gre.voxel_size_mm)
    assert prior.protocol.echo_times_s == pytest.approx(gre.echo_times_s)
    assert prior.values == pytest.approx(current_values(first))
    assert len(prior.values) > 20

    # a year later, deep left hand χ up by 0.04 ppm
    second = replace(first, measurements=tuple(
        replace(m, chi_mean_ppm=m.chi_mean_ppm + 0.04)
        if (m.area, m.layer) == ("left_hand", "deep") else m for m in first.measurements))
    loaded2, sources2 = _visit(sim, tmp_path / "v2", "20260601", 12)
    protocol = Protocol(gre.field_strength_t, tuple(gre.voxel_size_mm), tuple(gre.echo_times_s))
    follow = compare(second, dt.date(2026, 6, 1), protocol, VERSION, [prior])
    assert [(c.area, c.layer, c.measure) for c in follow.exceeding()] == [
        ("left_hand", "deep", "chi_mean_ppm")]
    objects2 = build_derived_objects(loaded2, sim.truth.chi_ppm, sim.truth.r2star_per_s,
                                     second, source_reader(sources2), VERSION, follow_up=follow)
    path2 = tmp_path / "sr2.dcm"
    objects2.report.save_as(path2, enforce_file_format=True)
    assert dciodvfy_errors(path2) == []
    sr2 = pydicom.dcmread(path2)
    # the prior report is other evidence and each change group references it
    other = sr2.PertinentOtherEvidenceSequence[0]
    assert other.StudyInstanceUID == loaded1.study_uid
    assert (other.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == prior.report_uid)
    groups = [g for g in _walk(sr2) if g.get("ValueType") == "CONTAINER"
              and any(_code(c, "ConceptCodeSequence") == "CHANGE"
                      for c in g.get("ContentSequence") or [])]
    assert len(groups) == len({(c.area, c.layer) for c in follow.changes})
    by_tracking = {}
    for g in groups:
        items = list(g.ContentSequence)
        tracking = next(str(c.TextValue) for c in items if _code(c) == "112039")
        nums = {_code(c): float(c.MeasuredValueSequence[0].NumericValue)
                for c in items if c.ValueType == "NUM"}
        beyond = {_code(c): _code(c, "ConceptCodeSequence") for c in items
                  if c.ValueType == "CODE" and _code(c).endswith("-BEYOND")}
        refs = [c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in items
                if c.ValueType == "COMPOSITE"]
        assert refs == [prior.report_uid]
        by_tracking[tracking] = (nums, beyond)
    nums, beyond = by_tracking["M1 left hand deep"]
    assert nums["CHI-CHANGE"] == pytest.approx(0.04, abs=1e-6)
    assert nums["CHI-PRIOR"] == pytest.approx(prior.values[("left_hand", "deep", "chi_mean_ppm")])
    assert nums["CHI-PER-YEAR"] == pytest.approx(0.04 * 365.25 / 365, abs=1e-6)
    assert nums["INTERVAL"] == pytest.approx(365 / 365.25)
    assert beyond["CHI-BEYOND"] == "373066001"  # SCT Yes
    assert by_tracking["M1 right hand deep"][1]["CHI-BEYOND"] == "373067005"  # SCT No
    # the finding in words, the same as the KOS's reason, names the change
    from qsmnode.dicom.derived.kos import kos_reason

    [evaluations] = [c for c in sr2.ContentSequence if _code(c) == "C0034375"]
    [text] = evaluations.ContentSequence
    assert _code(text) == "121071" and text.TextValue == kos_reason(second, follow_up=follow)
    assert "changed beyond test-retest since 2025-06-01: left hand area deep chi +0.0400 ppm" \
        in text.TextValue
    # the follow-up report reads back as this visit's values, not the prior's
    again = read_prior_report(sr2)
    assert again.values[("left_hand", "deep", "chi_mean_ppm")] == pytest.approx(
        prior.values[("left_hand", "deep", "chi_mean_ppm")] + 0.04)


QSM_NOTE = ("QSM was not computed: the slices have gaps (6 mm apart but 4 mm thick, a gap of "
            "2 mm, as in a 2-D protocol with a slice gap) and QSM needs contiguous slices")


def _without_chi(m1: M1Result, ratio_change: float = 0.0) -> M1Result:
    """``m1`` as the analysis of a 2-D protocol gives it: χ NaN; the left hand deep T2* signal
    ratio changed by ``ratio_change``."""
    return replace(m1, measurements=tuple(
        replace(m, chi_mean_ppm=NAN, chi_sd_ppm=NAN, chi_median_ppm=NAN,
                t2star_signal_ratio=m.t2star_signal_ratio
                + (ratio_change if (m.area, m.layer) == LEFT_DEEP else 0.0))
        for m in m1.measurements))


def _visit_2d(sim: Simulation, root: Path, date: str, seed: int) -> tuple[LoadedAcquisition,
                                                                         list[Path]]:
    info = SimStudyInfo(seed=seed, study_date=date, slice_thickness_mm=4.0,
                        acquisition_type="2D")
    sources = write_dicom(sim.gre, root / "source", "siemens", info)
    (loaded,) = load_folder(root / "source")
    assert isinstance(loaded, LoadedAcquisition)
    return loaded, sources


def test_a_2d_visit_is_followed_up_by_ratio_and_thickness_in_every_object(
        sim: Simulation, tmp_path: Path) -> None:
    """Two visits of a 2-D protocol with slice gaps (4 mm slices 6 mm apart), a year apart,
    the left hand deep T2* signal ratio down by 0.10: the first visit's SR (R2*, no χ) reads
    back with its slice thickness and without χ; the second is compared with it on the ratio
    and thickness only, with no "not comparable"; its SR change groups, KOS reason, key image
    trend (the ratio, not χ) and HL7 rows carry that and no χ; dciodvfy is clean."""
    import numpy as np

    from qsmnode.dicom.derived.key_images import OK, WARN, follow_up_lines, render_summary
    from qsmnode.dicom.derived.kos import kos_reason
    from qsmnode.node.hl7_observations import follow_up_rows
    from qsmnode.pipeline import acquisition_protocol, follow_up_record

    require_tool("dciodvfy", "dicom3tools")
    r2star = sim.truth.r2star_per_s
    first = _without_chi(m1_from_truth(sim))
    loaded1, sources1 = _visit_2d(sim, tmp_path / "v1", "20250601", 21)
    objects1 = build_derived_objects(loaded1, sim.truth.chi_ppm, r2star, first,
                                     source_reader(sources1), VERSION, qsm_note=QSM_NOTE)
    assert objects1.qsm_map is None and objects1.report is not None
    prior = read_prior_report(objects1.report)
    assert prior.protocol == acquisition_protocol(loaded1)
    assert prior.protocol.slice_thickness_mm == pytest.approx(4.0)
    assert prior.protocol.voxel_size_mm[2] == pytest.approx(6.0)
    assert prior.values and {key[2] for key in prior.values} == {"thickness_mean_mm",
                                                                  "t2star_signal_ratio"}

    second = _without_chi(m1_from_truth(sim), ratio_change=-0.10)
    loaded2, sources2 = _visit_2d(sim, tmp_path / "v2", "20260601", 22)
    follow = compare(second, dt.date(2026, 6, 1), acquisition_protocol(loaded2), VERSION,
                     [prior])
    assert follow.prior is not None and follow.not_comparable == ()
    assert {c.measure for c in follow.changes} == {"thickness_mean_mm", "t2star_signal_ratio"}
    assert [(c.area, c.layer, c.measure) for c in follow.exceeding()] == [
        (*LEFT_DEEP, "t2star_signal_ratio")]
    assert "χ not compared: either result has none (QSM was not computed)" in follow.note
    objects2 = build_derived_objects(loaded2, sim.truth.chi_ppm, r2star, second,
                                     source_reader(sources2), VERSION, follow_up=follow,
                                     qsm_note=QSM_NOTE)
    path = tmp_path / "sr2.dcm"
    assert objects2.report is not None
    objects2.report.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    changed = {_code(c) for g in _walk(objects2.report) if g.get("ValueType") == "CONTAINER"
               and any(_code(x, "ConceptCodeSequence") == "CHANGE"
                       for x in g.get("ContentSequence") or [])
               for c in g.ContentSequence if c.ValueType in ("NUM", "CODE")}
    assert {"T2S-CHANGE", "THK-CHANGE", "T2S-BEYOND", "THK-BEYOND"} <= changed
    assert not {code for code in changed if code.startswith("CHI")}
    reason = kos_reason(second, follow_up=follow, qsm_note=QSM_NOTE)
    assert reason.startswith(QSM_NOTE) and reason.endswith(
        "changed beyond test-retest since 2025-06-01: left hand area deep T2* ratio -0.100")
    rows = follow_up_rows(follow_up_record(follow))
    assert {r.code for r in rows} >= {"FOLLOWUP", "T2S-RATIO-CHG", "THICK-CHG"}
    assert not [r for r in rows if r.code.startswith("CHI")]

    # the key image's trend panel plots the ratio: without χ the χ trend would be empty
    k = int(np.argmax((second.labels > 0).sum(axis=(0, 1))))
    args = (r2star[:, :, k].T, second.labels[:, :, k].T, (4.0, 4.0), ("L", "P"), "t", "s",
            second)
    trend = render_summary(*args, follow_up=follow, qsm_note=QSM_NOTE)
    plain = render_summary(*args, follow_up=replace(follow, history=()), qsm_note=QSM_NOTE)

    def count(image: np.ndarray, colour: tuple[int, int, int]) -> int:
        return int(np.all(image[:, :24 + 400] == np.array(colour, np.uint8), axis=-1).sum())

    # this visit's point per area: green (within the limit), the left hand's in the warning
    # colour (its ratio fell beyond it); with χ plotted there would be none (NaN)
    assert count(trend, OK) >= 3 * 30 and count(plain, OK) == 0
    assert count(trend, WARN) >= count(plain, WARN) + 30
    assert any(line.startswith("CHANGED  left hand deep: T2* ratio")
               for line in follow_up_lines(follow))


def test_a_report_that_is_not_qsmnode_tid1500_is_refused() -> None:
    ds = Dataset()
    with pytest.raises(PriorReportError, match="not a TID 1500"):
        read_prior_report(ds)


def test_the_key_image_lists_the_changes_and_plots_the_trend(sim: Simulation,
                                                             tmp_path: Path) -> None:
    import numpy as np

    from qsmnode.dicom.derived.key_images import WARN, follow_up_lines, render_summary

    first = m1_from_truth(sim)
    key = ("left_hand", "deep", "chi_mean_ppm")
    values = current_values(first)
    old = _prior(dt.date(2024, 6, 1), {**values, key: values[key] - 0.01})
    prior = _prior(dt.date(2025, 6, 1), {**values, key: values[key] - 0.03})
    other = _prior(dt.date(2025, 9, 1), values, version="0.9/0.1")
    follow = compare(first, TODAY, PROTOCOL, VERSION, [old, prior, other])
    lines = follow_up_lines(follow)
    assert lines[0].startswith("follow-up: compared with the result of 2025-06-01")
    assert [x for x in lines if x.startswith("CHANGED")] == [
        f"CHANGED  left hand deep: chi ppm {values[key] - 0.03:.4g} -> {values[key]:.4g} "
        f"(+0.03; limit 0.01)".replace("(+0.03;", f"(+0.03, {0.03 * 365.25 / 365:+.4g}/year;")]
    k = int(np.argmax((first.labels > 0).sum(axis=(0, 1))))
    args = (sim.truth.chi_ppm[:, :, k].T, first.labels[:, :, k].T, (4.0, 4.0), ("L", "P"),
            "t", "s", first)
    plain = render_summary(*args)
    with_trend = render_summary(*args, follow_up=follow)
    assert with_trend.shape[0] >= plain.shape[0]
    warn = np.all(with_trend == np.array(WARN, np.uint8), axis=-1).sum()
    assert warn > np.all(plain == np.array(WARN, np.uint8), axis=-1).sum() + 50
    # the trend panel under the image: the left strip (image side) differs only there
    padded = np.zeros_like(with_trend)
    padded[:] = with_trend[-1, -1]
    padded[: plain.shape[0]] = plain
    left = 24 + 400  # the image panel's side, left of the table
    differs = np.any(with_trend[:, :left] != padded[:, :left], axis=-1)
    rows = np.flatnonzero(differs.any(axis=1))
    assert differs.sum() > 500 and rows.min() > 24 + 70 + 300, rows.min()


# --- against a real PACS: the node's prior lookup, and the demo's two visits ------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Orthanc:
    """Debian's Orthanc that lets the node's AE title query and retrieve."""
    require_tool("Orthanc", "orthanc")
    server = Orthanc(tmp_path_factory.mktemp("pacs"),
                     known_modalities={"QSMNODE": ("127.0.0.1", 104)}).start()
    yield server
    server.kill()


def _source(server: Orthanc, **changes) -> FollowUpSource:
    peer = Peer("pacs", server.ae_title, "127.0.0.1", server.dicom_port, "QSMNODE")
    return replace(FollowUpSource(peer=peer, timeout_s=10.0), **changes)


def _archive(server: Orthanc, sim: Simulation, root: Path, info: SimStudyInfo, m1: M1Result,
             version: str, qsm_note: str | None = None) -> Dataset:
    """A visit processed with ``m1`` (the truth's numbers) by ``version`` (``qsm_note``: as a
    2-D protocol without QSM), its report stored in the PACS by C-STORE; the report."""
    from qsmnode.node.association import OutgoingFile, send_over_association

    sources = write_dicom(sim.gre, root / "source", "siemens", info)
    (loaded,) = load_folder(root / "source")
    objects = build_derived_objects(loaded, sim.truth.chi_ppm, sim.truth.r2star_per_s, m1,
                                    source_reader(sources), version, qsm_note=qsm_note)
    path = root / "sr.dcm"
    objects.report.save_as(path, enforce_file_format=True)
    sr = objects.report
    outcome = send_over_association(_source(server).peer, [OutgoingFile(
        path, path, str(sr.SOPClassUID), str(sr.file_meta.TransferSyntaxUID),
        str(sr.SOPInstanceUID))])
    assert all(o.ok for o in outcome.values()), outcome
    return sr


def _current(sim: Simulation, root: Path, info: SimStudyInfo) -> LoadedAcquisition:
    write_dicom(sim.gre, root / "source", "siemens", info)
    (loaded,) = load_folder(root / "source")
    return loaded


def _protocol(loaded: LoadedAcquisition) -> Protocol:
    gre = loaded.gre
    return Protocol(gre.field_strength_t, tuple(gre.voxel_size_mm), tuple(gre.echo_times_s))


def test_the_node_finds_the_patients_earlier_report_in_pacs_and_only_that(
        pacs: Orthanc, sim: Simulation, tmp_path: Path) -> None:
    """Orthanc holds: this patient's report of a year ago (smaller ALS change), one of an
    older algorithm version (earlier still), and another patient's; the lookup before the
    current visit finds this patient's two, compares with the comparable one, and names why
    the other one is not compared."""
    from qsmnode.pipeline import algorithm_version

    version = algorithm_version()
    truth = m1_from_truth(sim)
    key = ("left_hand", "deep", "chi_mean_ppm")

    def shifted(delta: float) -> M1Result:
        return replace(truth, measurements=tuple(
            replace(m, chi_mean_ppm=m.chi_mean_ppm + delta)
            if (m.area, m.layer) == key[:2] else m for m in truth.measurements))

    patient = {"patient_id": "FOLLOWUP-0417", "patient_name": "Followup^Ann"}
    year_ago = _archive(pacs, sim, tmp_path / "v1", SimStudyInfo(
        seed="fu-1", study_date="20250601", **patient), shifted(0.01), version)
    _archive(pacs, sim, tmp_path / "v0", SimStudyInfo(
        seed="fu-0", study_date="20240601", **patient), truth, "0.0.1/0.1")
    _archive(pacs, sim, tmp_path / "other", SimStudyInfo(
        seed="fu-x", study_date="20250901", patient_id="FOLLOWUP-9999",
        patient_name="Other^Bea"), shifted(-0.05), version)
    current = _current(sim, tmp_path / "v2", SimStudyInfo(
        seed="fu-2", study_date="20260601", **patient))

    priors, note = find_priors(_source(pacs), current)
    assert note == "" and priors is not None
    assert sorted(p.study_date.isoformat() for p in priors) == ["2024-06-01", "2025-06-01"]
    follow = compare(shifted(0.03), dt.date(2026, 6, 1), _protocol(current), version, priors)
    assert follow.prior is not None and follow.prior.report_uid == year_ago.SOPInstanceUID
    change = follow.change(*key)
    assert change is not None and change.change == pytest.approx(0.02, abs=1e-6)
    assert change.exceeds
    assert [(c.area, c.layer, c.measure) for c in follow.exceeding()] == [key]
    [(old, why)] = follow.not_comparable
    assert old.study_date == dt.date(2024, 6, 1) and "algorithm version 0.0.1/0.1" in why
    assert [p.study_date for p in follow.history] == [dt.date(2024, 6, 1), dt.date(2025, 6, 1)]

    # another patient of the PACS has no earlier result
    stranger = _current(sim, tmp_path / "s", SimStudyInfo(
        seed="fu-s", study_date="20260601", patient_id="FOLLOWUP-NEW", patient_name="New^Cy"))
    priors, note = find_priors(_source(pacs), stranger)
    assert priors == () and note == ""
    assert "no earlier result" in compare(truth, dt.date(2026, 6, 1), _protocol(stranger),
                                          version, priors).note


def test_the_node_follows_up_a_2d_visit_with_the_patients_2d_report_in_pacs(
        pacs: Orthanc, sim: Simulation, tmp_path: Path) -> None:
    """The service glue with 2-D reports (issue 13): Orthanc holds this patient's 2-D report
    of a year ago (no χ) and a 3-D report (with χ) on the same grid before it. Before the
    current 2-D visit the node finds both; the 2-D one is compared on the T2* signal ratio and
    thickness, the 3-D one is not comparable because of its slice thickness."""
    from qsmnode.pipeline import acquisition_protocol, algorithm_version

    version = algorithm_version()
    patient = {"patient_id": "FOLLOWUP-2D-0815", "patient_name": "Twod^Eva"}
    two_d = {"slice_thickness_mm": 4.0, "acquisition_type": "2D"}
    year_ago = _archive(pacs, sim, tmp_path / "v1", SimStudyInfo(
        seed="fu2d-1", study_date="20250601", **patient, **two_d),
        _without_chi(m1_from_truth(sim)), version, qsm_note=QSM_NOTE)
    _archive(pacs, sim, tmp_path / "v0", SimStudyInfo(
        seed="fu2d-0", study_date="20240601", **patient),
        m1_from_truth(sim), version)
    current = _current(sim, tmp_path / "v2", SimStudyInfo(
        seed="fu2d-2", study_date="20260601", **patient, **two_d))

    priors, note = find_priors(_source(pacs), current)
    assert note == "" and priors is not None and len(priors) == 2
    follow = compare(_without_chi(m1_from_truth(sim), ratio_change=-0.10), dt.date(2026, 6, 1),
                     acquisition_protocol(current), version, priors)
    assert follow.prior is not None and follow.prior.report_uid == year_ago.SOPInstanceUID
    assert {c.measure for c in follow.changes} == {"thickness_mean_mm", "t2star_signal_ratio"}
    assert [(c.area, c.layer, c.measure) for c in follow.exceeding()] == [
        (*LEFT_DEEP, "t2star_signal_ratio")]
    [(old, why)] = follow.not_comparable
    assert old.study_date == dt.date(2024, 6, 1) and why == "slices 6 mm thick, not 4 mm"


def test_a_pacs_that_is_down_gives_no_comparison_and_says_why(sim: Simulation,
                                                             tmp_path: Path) -> None:
    from qsmnode.demo.pacs import free_port

    current = _current(sim, tmp_path / "v", SimStudyInfo(seed="fu-d", study_date="20260601"))
    peer = Peer("pacs", "ORTHANC", "127.0.0.1", free_port(), "QSMNODE")
    priors, note = find_priors(FollowUpSource(peer=peer, timeout_s=3.0), current)
    assert priors is None
    assert note.startswith("prior query to pacs (ORTHANC@127.0.0.1:") and "QSMNODE" not in note
    # and a study without a Patient ID is not looked up
    current.header.PatientID = ""
    priors, note = find_priors(FollowUpSource(peer=peer, timeout_s=3.0), current)
    assert priors is None and "no Patient ID" in note


def test_the_follow_up_source_travels_in_the_job_spec(tmp_path: Path) -> None:
    from qsmnode.node.config import ClientTLSConfig

    tls = ClientTLSConfig(enabled=True, ca_file=tmp_path / "ca.pem")
    source = FollowUpSource(Peer("pacs", "PACS", "pacs.example", 11112, "QSMNODE", tls),
                            retrieve="move", move_port=11113, timeout_s=5.0,
                            limits=RetestLimits(0.02, 0.3, 0.1))
    import json

    assert FollowUpSource.from_json(json.loads(json.dumps(source.to_json()))) == source
