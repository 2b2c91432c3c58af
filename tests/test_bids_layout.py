"""The BIDS layout reader (qsmnode.bids.layout): which files make which acquisition."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsmnode.bids.layout import (
    LayoutError,
    find_acquisitions,
    normalise_labels,
    parse_entities,
)


def touch(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def megre(root: Path, folder: str, prefix: str, echoes: int = 3,
          parts: tuple[str, ...] = ("mag", "phase"), ext: str = ".nii.gz") -> None:
    for e in range(1, echoes + 1):
        for part in parts:
            touch(root, f"{folder}/{prefix}_echo-{e}_part-{part}_MEGRE{ext}")
            touch(root, f"{folder}/{prefix}_echo-{e}_part-{part}_MEGRE.json")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """sub-01 with two sessions; sub-02 with two runs of acq-fast; sub-03 with a T1w only."""
    megre(tmp_path, "sub-01/ses-1/anat", "sub-01_ses-1")
    megre(tmp_path, "sub-01/ses-2/anat", "sub-01_ses-2", ext=".nii")
    megre(tmp_path, "sub-02/anat", "sub-02_acq-fast_run-1", echoes=4)
    megre(tmp_path, "sub-02/anat", "sub-02_acq-fast_run-2", echoes=4)
    touch(tmp_path, "sub-03/anat/sub-03_T1w.nii.gz")
    touch(tmp_path, "dataset_description.json")
    return tmp_path


def test_every_acquisition_is_found_with_its_entities(dataset: Path) -> None:
    layout = find_acquisitions(dataset)
    names = [a.name for a in layout.acquisitions]
    assert names == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_acq-fast_run-1",
                     "sub-02_acq-fast_run-2"]
    first, _, run1, run2 = layout.acquisitions
    assert first.session == "1" and first.entities == ()
    assert run1.session is None and run1.entity("acq") == "fast" and run1.entity("run") == "1"
    assert run2.entity("run") == "2"
    assert run1.relative_folder == Path("sub-02/anat")
    assert first.relative_folder == Path("sub-01/ses-1/anat")
    files = run1.file_map()
    assert sorted(files) == [(e, p) for e in range(1, 5) for p in ("mag", "phase")]
    assert files[(2, "phase")].name == "sub-02_acq-fast_run-1_echo-2_part-phase_MEGRE.nii.gz"
    assert not layout.passed_over


def test_participant_and_session_labels_select(dataset: Path) -> None:
    only = find_acquisitions(dataset, ["02"])
    assert [a.subject for a in only.acquisitions] == ["02", "02"]
    prefixed = find_acquisitions(dataset, ["sub-01"], ["ses-2"])
    assert [a.name for a in prefixed.acquisitions] == ["sub-01_ses-2"]


@pytest.mark.parametrize(("participants", "sessions", "message"), [
    (["01_x"], None, "participant label '01_x' is not a BIDS label"),
    (["sub-"], None, "participant label 'sub-' is not a BIDS label"),
    (["07"], None, "no participant sub-07 (present: sub-01, sub-02, sub-03)"),
    (None, ["a b"], "session label 'a b' is not a BIDS label"),
    (["02"], ["1"], "no session ses-1 in the participants selected"),
    (["03"], None, "no anat/*_echo-<n>_part-<mag|phase>_MEGRE.nii[.gz] files in the "
                   "participants and sessions selected"),
])
def test_a_bad_selection_is_named(dataset: Path, participants: list[str] | None,
                                  sessions: list[str] | None, message: str) -> None:
    with pytest.raises(LayoutError) as caught:
        find_acquisitions(dataset, participants, sessions)
    assert message in str(caught.value)


def test_a_dataset_without_megre_or_subjects_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no sub-<label> folders"):
        find_acquisitions(tmp_path)
    touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz")
    touch(tmp_path, "sub-02/anat/sub-02_T2w.nii.gz")
    with pytest.raises(LayoutError, match=r"MEGRE.nii\[.gz\] files in any of 2 subjects"):
        find_acquisitions(tmp_path)
    with pytest.raises(LayoutError, match="not a folder"):
        find_acquisitions(tmp_path / "absent")


def test_files_that_do_not_parse_are_passed_over_with_why(tmp_path: Path) -> None:
    megre(tmp_path, "sub-01/anat", "sub-01")
    touch(tmp_path, "sub-01/anat/sub-02_echo-1_part-mag_MEGRE.nii")
    touch(tmp_path, "sub-01/anat/sub-01_echo-1_part-real_MEGRE.nii")
    touch(tmp_path, "sub-01/anat/sub-01_echo_part-mag_MEGRE.nii")
    touch(tmp_path, "sub-01/anat/sub-01_ses-1_echo-1_part-mag_MEGRE.nii")
    touch(tmp_path, "sub-01/anat/sub-01_part-mag_MEGRE.nii")
    touch(tmp_path, "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii")  # beside the .nii.gz
    layout = find_acquisitions(tmp_path)
    assert [a.name for a in layout.acquisitions] == ["sub-01"]
    notes = "\n".join(layout.passed_over)
    assert "its sub- entity does not match its folder sub-01" in notes
    assert "part-real is not mag or phase" in notes
    assert "'echo' is not a key-value entity" in notes
    assert "its ses- entity does not match its no session folder" in notes
    assert "no numeric echo- entity" in notes
    assert "a second file for echo 1 part-mag" in notes
    assert len(layout.passed_over) == 6


def test_an_acquisition_missing_a_part_is_still_listed(tmp_path: Path) -> None:
    """So that processing reports it by name instead of passing it over."""
    megre(tmp_path, "sub-01/anat", "sub-01", parts=("mag",))
    (acquisition,) = find_acquisitions(tmp_path).acquisitions
    assert {part for _, part in acquisition.file_map()} == {"mag"}


def test_entities_and_labels() -> None:
    assert parse_entities("sub-01_ses-pre_acq-x1_run-2") == [
        ("sub", "01"), ("ses", "pre"), ("acq", "x1"), ("run", "2")]
    with pytest.raises(ValueError, match="appears twice"):
        parse_entities("sub-01_run-1_run-2")
    assert normalise_labels(["sub-01", "02"], "sub") == ["01", "02"]
    assert normalise_labels(None, "ses") is None


# --- metadata by the BIDS inheritance principle ----------------------------------------------


def _inheriting_dataset(root: Path) -> tuple[Path, dict[tuple[int, str], Path]]:
    """A tiny simulated acquisition in sub-01/anat whose per-echo sidecars hold only EchoTime;
    the field strength comes from the dataset root (7 T) and sub-01 (overriding: 6.98 T)."""
    import json

    from qsmnode.dicom.nifti import write_megre
    from qsmnode.sim.scanner import preset, simulate

    gre = simulate(preset("tiny", seed=2)).gre
    folder = root / "sub-01" / "anat"
    write_megre(gre, folder, prefix="sub-01_acq-slow")
    files = {}
    for path in sorted(folder.glob("*.nii*")):
        echo = int(path.name.split("echo-")[1].split("_")[0])
        part = "mag" if "part-mag" in path.name else "phase"
        files[(echo, part)] = path
        side = path.with_name(path.name.split(".nii")[0] + ".json")
        meta = json.loads(side.read_text())
        side.write_text(json.dumps({"EchoTime": meta["EchoTime"]}))
    (root / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 7}))
    (root / "sub-01" / "sub-01_MEGRE.json").write_text(json.dumps(
        {"MagneticFieldStrength": 6.98}))
    # other entities: must not apply
    (root / "acq-fast_MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 3}))
    (root / "sub-01" / "sub-01_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 1.5}))
    return folder, files


def test_sidecar_metadata_is_inherited_from_the_dataset_and_subject_levels(tmp_path: Path
                                                                           ) -> None:
    import json

    from qsmnode.dicom.nifti import BidsError, read_megre_files

    _, files = _inheriting_dataset(tmp_path)
    gre = read_megre_files(files, "sub-01_acq-slow", tmp_path)
    assert gre.field_strength_t == pytest.approx(6.98)  # sub-01 overrides the root
    (tmp_path / "sub-01" / "sub-01_MEGRE.json").unlink()
    assert read_megre_files(files, "sub-01_acq-slow", tmp_path).field_strength_t == 7.0
    # the files' own sidecars win over every inherited one
    owns = [path.with_name(path.name.split(".nii")[0] + ".json")
            for (_, part), path in files.items() if part == "mag"]
    times = {own: json.loads(own.read_text())["EchoTime"] for own in owns}
    for own in owns:
        own.write_text(json.dumps({"EchoTime": times[own], "MagneticFieldStrength": 7.05}))
    assert read_megre_files(files, "sub-01_acq-slow", tmp_path).field_strength_t == 7.05
    # without the dataset root (the single-folder form), only the files' own sidecars count
    for own in owns:
        own.write_text(json.dumps({"EchoTime": times[own]}))
    with pytest.raises(BidsError, match="no MagneticFieldStrength"):
        read_megre_files(files, "sub-01_acq-slow")
    # a magnitude without a sidecar of its own nor an applicable inherited one: named
    (tmp_path / "MEGRE.json").unlink()
    owns[0].unlink()
    with pytest.raises(BidsError, match=r"_echo-1_part-mag_MEGRE.json: missing JSON sidecar"):
        read_megre_files(files, "sub-01_acq-slow", tmp_path)
