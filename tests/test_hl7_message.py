"""The ORU^R01 of a result (hl7apy builds it; python-hl7 reads it back, independently), its
observations and abnormal flags, the RIS's acknowledgements, and the ``[hl7]`` configuration
with its error messages."""

from __future__ import annotations

from pathlib import Path

import hl7
import pytest

from qsmnode.node.config import ConfigError, load_settings
from qsmnode.node.hl7_message import (
    HL7MessageError,
    Parties,
    Patient,
    ResultFacts,
    build_oru,
    control_id,
    parse_ack,
)
from qsmnode.node.hl7_observations import Thresholds, abnormal_flag, finding, observations
from tests.hl7util import m1_record_from_truth, obx_rows

PARTIES = Parties("QSMNODE", "7T", "RIS", "HOSP")


def facts(**changes: object) -> ResultFacts:
    values: dict[str, object] = {
        "result_key": "1.2.3\\1.2.4|v1", "study_uid": "1.2.840.99.1", "finished_at": 1.7e9,
        "patient": Patient("12|34", "HOSP", "1.2.3.4", "ISO", "O^Brien&Co^Ann~Marie^Dr^Jr",
                           "19700101", "F"),
        "accession_number": "A\\1", "sr_uid": "1.2.840.99.2", "seg_uid": "1.2.840.99.3",
        "observations": tuple(observations(m1_record_from_truth(), Thresholds())),
    }
    values.update(changes)
    return ResultFacts(**values)  # type: ignore[arg-type]


def test_values_with_hl7_delimiters_are_escaped_and_read_back() -> None:
    message = hl7.parse(build_oru(facts(), PARTIES))
    pid = message.segment("PID")
    assert message.unescape(str(pid(3)(1)(1))) == "12|34"
    assert str(pid(3)(1)(4)) == "HOSP&1.2.3.4&ISO"
    # DICOM PN family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    assert message.unescape(str(pid(5)(1)(1))) == "O"
    assert message.unescape(str(pid(5)(1)(2))) == "Brien&Co"
    assert message.unescape(str(pid(5)(1)(3))) == "Ann~Marie"
    assert str(pid(5)(1)(4)) == "Jr" and str(pid(5)(1)(5)) == "Dr"
    assert message.unescape(str(message.segment("OBR")(18))) == "A\\1"
    assert len(message.segments("PID")) == 1 and len(message.segments("OBR")) == 1


def test_the_same_result_gives_the_same_message() -> None:
    first, again = build_oru(facts(), PARTIES), build_oru(facts(), PARTIES)
    assert first == again
    other = build_oru(facts(result_key="another"), PARTIES)
    assert str(hl7.parse(other).segment("MSH")(10)) != str(hl7.parse(first).segment("MSH")(10))
    assert control_id("x") == control_id("x") and len(control_id("x")) == 20


def test_references_point_to_the_dicom_results() -> None:
    rows = obx_rows(hl7.parse(build_oru(facts(viewer_url="https://v/x?s=1.2&a=b"), PARTIES)))
    by_code = {r["code"]: r for r in rows}
    assert by_code["STUDY-UID"]["value"] == "1.2.840.99.1"
    assert by_code["SR-UID"]["value"] == "1.2.840.99.2"
    assert by_code["SEG-UID"]["value"] == "1.2.840.99.3"
    assert by_code["VIEWER"]["type"] == "RP"
    assert by_code["VIEWER"]["value"] == "https://v/x?s=1.2&a=b"


@pytest.mark.parametrize(("z", "flag"), [(None, ""), (0.0, "N"), (1.99, "N"), (2.0, "H"),
                                         (2.99, "H"), (3.0, "HH"), (-2.0, "L"), (-3.5, "LL")])
def test_abnormal_flags_follow_the_thresholds(z: float | None, flag: str) -> None:
    assert abnormal_flag(z, Thresholds(2.0, 3.0)) == flag


def test_the_finding_names_the_area_and_its_worst_flag() -> None:
    m1 = m1_record_from_truth(z_left_hand_deep=2.5)
    found = finding(m1, Thresholds(2.0, 3.0))
    assert found.assessable and found.flag == "H"
    assert "left hand area raised (z 2.5, H)" in found.text
    calm = finding(m1_record_from_truth(z_left_hand_deep=0.1), Thresholds(2.0, 3.0))
    assert calm.flag == "N" and calm.text.startswith("deep-layer susceptibility within")


def test_without_z_scores_nothing_is_graded() -> None:
    m1 = m1_record_from_truth()
    for m in m1["measurements"]:
        m["chi_z"] = None
    found = finding(m1, Thresholds())
    assert found.flag == "" and "no normative table" in found.text
    assert not [r for r in observations(m1, Thresholds()) if r.code == "CHI-Z"]


def test_without_qsm_the_finding_says_why_and_grades_nothing() -> None:
    """A 2-D protocol with slice gaps (issue 13 item 4): the failed ``qsm_computed`` flag's
    reason is the finding; no χ is graded (and no "no normative table" claim is made)."""
    m1 = m1_record_from_truth()
    why = "QSM was not computed: the slices have gaps (2.4 mm apart but 2 mm thick)"
    for m in m1["measurements"]:
        m["chi_z"] = None
        m["chi_mean_ppm"] = m["chi_sd_ppm"] = m["chi_median_ppm"] = float("nan")
    m1["flags"].append({"name": "qsm_computed", "passed": False, "value": None, "text": why})
    found = finding(m1, Thresholds())
    assert found.assessable and found.flag == ""
    assert found.text == (f"{why}; deep-layer susceptibility not graded; R2*, T2* signal ratio "
                          "and thickness reported")
    rows = observations(m1, Thresholds())
    assert not [r for r in rows if r.code in ("CHI", "CHI-Z")]
    assert not [r for r in rows if "nan" in str(r.value).lower()]
    assert any(r.code == "QC" and r.value == f"FAILED: {why}" for r in rows)


def test_unreliable_measures_are_not_assessable() -> None:
    m1 = m1_record_from_truth()
    m1["flags"].append({"name": "registration_nmi", "passed": False, "value": 0.1,
                        "text": "NMI 0.1 < 0.3"})
    found = finding(m1, Thresholds())
    assert not found.assessable and found.flag == ""
    assert "not reliable (failed checks: registration_nmi)" in found.text
    qc = [r for r in observations(m1, Thresholds()) if r.code == "QC"]
    assert any(r.value.startswith("FAILED: NMI 0.1") for r in qc)


def test_an_area_out_of_the_slab_is_not_assessable() -> None:
    m1 = m1_record_from_truth()
    for m in m1["measurements"]:
        if m["area"] == "right_foot":
            m.update(covered=False, voxel_count=4)
    rows = [r for r in observations(m1, Thresholds()) if "R-FOOT" in r.sub_id]
    assert [r.code for r in rows] == ["COVERAGE"]
    assert rows[0].status == "X" and "does not cover the right foot area (4 voxels)" in (
        rows[0].value)


def test_acknowledgements_are_read() -> None:
    aa = "MSH|^~\\&|RIS|H|Q|7T|20260101||ACK^R01^ACK|9|P|2.5.1\rMSA|AA|QSMABC\r"
    assert parse_ack(aa).accepted and parse_ack(aa).control_id == "QSMABC"
    ar = ("MSH|^~\\&|RIS|H|Q|7T|20260101||ACK^R01^ACK|9|P|2.5.1\rMSA|AR|QSMABC|unknown "
          "order\rERR||||E|||no such accession \\F\\ here\r")
    ack = parse_ack(ar)
    assert ack.rejected and ack.text == "unknown order; no such accession | here"
    for garbage, why in (("HELLO", "not an HL7 message"),
                         ("MSH|^~\\&|RIS|H|Q|7T|2026||ACK|9|P|2.5.1\r", "no MSA"),
                         ("MSH|^~\\&|RIS|H|Q|7T|2026||ACK|9|P|2.5.1\rMSA|OK|X\r", "not one of")):
        with pytest.raises(HL7MessageError, match=why):
            parse_ack(garbage)


# ---------------------------------------------------------------------------------------------
# [hl7] in the configuration

GOOD = """
[hl7]
z_high = 2.5
viewer_url = "https://pacs/viewer?StudyInstanceUIDs={study_uid}"
[[hl7.destinations]]
name = "ris"
host = "127.0.0.1"
port = 2575
receiving_application = "RIS"
receiving_facility = "HOSP"
"""


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    return str(caught.value)


def test_hl7_destinations_are_read(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(GOOD)
    settings = load_settings(path, env={})
    [ris] = settings.hl7.destinations
    assert (ris.name, ris.port, ris.sending_application, ris.timeout_s) == (
        "ris", 2575, "QSMNODE", 30.0)
    assert settings.hl7.z_high == 2.5 and settings.hl7.z_critical == 3.0


@pytest.mark.parametrize(("change", "message"), [
    (("port = 2575", "port = 70000"), "hl7.destinations[0].port: expected an integer 1-65535"),
    (('receiving_facility = "HOSP"\n', ""),
     "hl7.destinations[0].receiving_facility: missing required key"),
    (('receiving_application = "RIS"', 'receiving_application = "R|S"'),
     "hl7.destinations[0].receiving_application: expected 1-20 printable ASCII characters "
     "without the HL7 delimiters"),
    (("z_high = 2.5", "z_high = 2.5\nz_critical = 2"),
     "hl7.z_critical: expected a number >= hl7.z_high (2.5), got 2"),
    (("{study_uid}", "{patient_name}"),
     "hl7.viewer_url: unknown placeholder {patient_name}"),
    (("https://pacs", "ftp://pacs"), "hl7.viewer_url: expected an http:// or https:// URL"),
    (("port = 2575", "prot = 2575"), 'hl7.destinations[0].prot: unknown key (did you mean "port"?'),
    ((GOOD.split("[[hl7.destinations]]")[1], GOOD.split("[[hl7.destinations]]")[1]
      + "[[hl7.destinations]]" + GOOD.split("[[hl7.destinations]]")[1]),
     'hl7.destinations[1].name: duplicate name "ris" (also hl7.destinations[0].name)'),
])
def test_bad_hl7_configuration_names_the_key(tmp_path: Path, change: tuple[str, str],
                                             message: str) -> None:
    old, new = change
    assert old in GOOD
    assert message in config_error(tmp_path, GOOD.replace(old, new, 1))


def test_a_follow_up_adds_the_changes_flagged_up_or_down_beyond_the_retest_limit() -> None:
    import datetime as dt

    from qsmnode.m1.followup import Change, FollowUp, PriorResult
    from qsmnode.pipeline import follow_up_record

    prior = PriorResult("1.2.1", dt.date(2025, 6, 1), "1.2.9", "1.2.8",
                        "1.2.840.10008.5.1.4.1.1.88.34", "v1", None, {})
    changes = (Change("left_hand", "deep", "chi_mean_ppm", 0.03, 0.05, 0.02, 0.02, 0.01, True),
               Change("right_hand", "deep", "chi_mean_ppm", 0.03, 0.031, 0.001, 0.001, 0.01,
                      False),
               Change("left_hand", "all", "thickness_mean_mm", 2.6, 2.2, -0.4, -0.4, 0.25, True),
               Change("left_hand", "deep", "thickness_mean_mm", 2.6, 2.2, -0.4, None, 0.25, True))
    follow = FollowUp(prior, changes, (prior,), (), "compared with the result of 2025-06-01",
                      1.0, dt.date(2026, 6, 1))
    m1 = {**m1_record_from_truth(), "follow_up": follow_up_record(follow)}
    rows = observations(m1, Thresholds())
    by = {(r.code, r.sub_id): r for r in rows}
    assert by[("FOLLOWUP", "")].value == "compared with the result of 2025-06-01"
    assert by[("FOLLOWUP", "")].status == "P"
    up = by[("CHI-CHG", "L-HAND.DEEP")]
    assert (up.value, up.flag, up.unit) == ("0.02", "U", ("[ppm]", "parts per million"))
    assert "since 2025-06-01" in up.text
    assert by[("CHI-CHG-YR", "L-HAND.DEEP")].unit == ("[ppm]/a", "parts per million per year")
    assert by[("CHI-CHG", "R-HAND.DEEP")].flag == ""  # within the test–retest limit
    down = by[("THICK-CHG", "L-HAND.ALL")]
    assert (down.value, down.flag) == ("-0.4", "D")
    # thickness is reported per area, as the current value is
    assert ("THICK-CHG", "L-HAND.DEEP") not in by
    # before the quality checks
    codes = [r.code for r in rows]
    assert codes.index("FOLLOWUP") < codes.index("QC")
    # nothing compared: one row that says why, status X
    none = FollowUp(None, (), (), (), "no comparison: the PACS did not answer")
    rows = observations({**m1_record_from_truth(), "follow_up": follow_up_record(none)},
                        Thresholds())
    [row] = [r for r in rows if r.code.startswith(("FOLLOWUP", "CHI-CHG"))]
    assert row.status == "X" and "did not answer" in row.value
