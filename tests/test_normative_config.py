"""The M1 normative table at the edge: ``[pipeline] m1_normative_table`` is read and checked with
the configuration, carried by the job spec, and given to the pipeline. That the report then
carries z-scores is checked on the anatomy phantom, where the M1 areas are found
(``test_t1w_edge.test_process_acquisition_registers_through_the_t1w``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from qsmnode.node.config import ConfigError, PathsConfig, PipelineConfig, Settings, load_settings
from qsmnode.node.jobs import JobError, JobSpec, process_acquisition
from qsmnode.node.normative import NormativeTableError, read_normative_table

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "m1_normative.example.toml"


def config_with(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[pipeline]\nm1_normative_table = "{table}"\n')
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    return str(caught.value)


def test_the_example_table_is_read_with_the_configuration(tmp_path: Path) -> None:
    settings = load_settings(config_with(tmp_path, str(EXAMPLE)), env={})
    assert settings.pipeline.m1_normative_table == EXAMPLE
    table = read_normative_table(EXAMPLE)
    assert table.placeholder and table.depth_method == "equivolume"
    assert table.get("left_hand", "deep") is not None
    assert table.get("right_hand", "all").t2star_signal_ratio_mean is None  # type: ignore[union-attr]
    assert load_settings(env={}).pipeline.m1_normative_table is None  # the default: none


def test_a_relative_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "norm.toml").write_bytes(EXAMPLE.read_bytes())
    settings = load_settings(config_with(tmp_path, "norm.toml"), env={})
    assert settings.pipeline.m1_normative_table == tmp_path / "norm.toml"


def test_environment_overrides_the_table(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("")
    settings = load_settings(config, env={"QSMNODE_PIPELINE_M1_NORMATIVE_TABLE": str(EXAMPLE)})
    assert settings.pipeline.m1_normative_table == EXAMPLE


BAD_TABLES = {
    "missing file": (None, "file not found"),
    "not TOML": ("schema = 1\n[areas\n", "TOML syntax error"),
    "wrong schema": ("schema = 2\n", "not a valid normative table: schema must be 1, got 2"),
    "negative SD": (
        "schema = 1\n[areas.left_hand.deep]\nchi_mean_ppm = 0.01\nchi_sd_ppm = -1\n",
        "not a valid normative table: areas.left_hand.deep.chi_sd_ppm must be positive",
    ),
    "unknown area": (
        "schema = 1\n[areas.left_knee.deep]\nchi_mean_ppm = 0.0\nchi_sd_ppm = 1.0\n",
        "not a valid normative table: unknown area 'left_knee'",
    ),
    "a directory": ("", "is a directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_a_bad_table_names_the_file_the_key_and_the_problem(tmp_path: Path, case: str) -> None:
    text, expected = BAD_TABLES[case]
    table = tmp_path / "norm.toml"
    if case == "a directory":
        table.mkdir()
    elif text is not None:
        table.write_text(text)
    config = config_with(tmp_path, str(table))
    message = error_of(config)
    assert message.startswith(f"{config}: pipeline.m1_normative_table: {table}: "), message
    assert expected in message
    assert "Traceback" not in message


def test_the_command_line_reports_a_bad_table_in_one_sentence(tmp_path: Path,
                                                              capsys: Any) -> None:
    from qsmnode.cli import main

    config = config_with(tmp_path, str(tmp_path / "absent.toml"))
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {config}: pipeline.m1_normative_table: "
                           f"{tmp_path / 'absent.toml'}: file not found")


def test_job_spec_carries_the_table(tmp_path: Path) -> None:
    from qsmnode.node.jobs import job_spec
    from qsmnode.node.store import InstanceRecord, NewAcquisition, Store

    state = tmp_path / "state"
    settings = dataclasses.replace(
        Settings(), paths=PathsConfig(state_dir=state),
        pipeline=PipelineConfig(m1_normative_table=EXAMPLE))
    with Store.in_state_dir(state) as store:
        path = state / "spool" / "1.2" / "1.2.1" / "1.2.1.1.dcm"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        store.add_instance(InstanceRecord("1.2.1.1", "1.2.840.10008.5.1.4.1.1.4", "1.2",
                                          "1.2.1", "1.2.840.10008.1.2.1",
                                          "spool/1.2/1.2.1/1.2.1.1.dcm", 1, "S", "h", 1.0))
        store.complete_series("1.2.1", 1, "quiet", None, 1.0)
        store.record_grouping("1.2", 1, [NewAcquisition("1.2", ("1.2.1",), {})], [], 1.0)
        job = store.claim_job("o", 10, 1.0)
        assert job is not None
        spec = job_spec(store, job, settings)
    assert spec.m1_normative_table == str(EXAMPLE)
    assert JobSpec.from_json(spec.to_json()) == spec
    data = spec.to_json().replace(', "m1_normative_table": "' + str(EXAMPLE) + '"', "")
    assert JobSpec.from_json(data).m1_normative_table is None  # a spec of an older node


def test_process_acquisition_gives_the_table_to_the_pipeline(monkeypatch: Any) -> None:
    import qsmnode.pipeline
    from qsmnode.m1.measure import NormativeTable

    seen: list[Any] = []

    class Result:
        datasets: tuple[Any, ...] = ()

        def to_json(self) -> dict[str, Any]:
            return {}

    def fake_run(loaded: Any, params: Any, progress: Any = None) -> Result:
        seen.append(params)
        return Result()

    monkeypatch.setattr(qsmnode.pipeline, "run_pipeline", fake_run)
    monkeypatch.setattr("qsmnode.node.jobs._m1_atlas", lambda name: f"atlas {name}")
    process_acquisition(object(), [], True, True, "hcpex", None, str(EXAMPLE))
    process_acquisition(object(), [], True, True, "hcpex")
    process_acquisition(object(), [], True, False, "hcpex", None, str(EXAMPLE))
    with_table, without, no_m1 = seen
    assert isinstance(with_table.normative, NormativeTable) and with_table.normative.placeholder
    assert without.normative is None and no_m1.normative is None and no_m1.m1_atlas is None
    with pytest.raises(JobError, match=r"pipeline.m1_normative_table: .*absent.toml: file not "):
        process_acquisition(object(), [], True, True, "hcpex", None, "/nowhere/absent.toml")
    with pytest.raises(NormativeTableError):
        read_normative_table("/nowhere/absent.toml")
