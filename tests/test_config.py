"""Configuration: the shipped file, every kind of bad file, environment overrides, the CLI."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from qsmnode.node.config import (
    DEFAULT_CONFIG,
    ENV_OVERRIDES,
    ConfigError,
    Settings,
    load_settings,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={} if env is None else env)
    return str(caught.value)


def schema_keys(cls: type = Settings, at: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """Every TOML key of the schema as (dotted key, type hint, field); arrays as ``name[]``."""
    keys = []
    hints = get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.metadata.get("internal"):
            continue
        hint = hints[spec.name]
        item = get_args(hint)[0] if get_origin(hint) is tuple else None
        if dataclasses.is_dataclass(hint):
            keys += schema_keys(hint, f"{at}{spec.name}.")
        elif item is not None and dataclasses.is_dataclass(item):
            keys += schema_keys(item, f"{at}{spec.name}[].")
        else:
            keys.append((at + spec.name, hint, spec))
    return keys


# ---------------------------------------------------------------------------------------------
# The shipped file


def test_shipped_file_equals_the_defaults() -> None:
    settings = load_settings(DEFAULT_CONFIG, env={})
    assert settings == Settings()
    assert settings.source == DEFAULT_CONFIG
    assert settings.listener.allowed_senders[0].ae_title == "SCANNER7T"
    assert settings.destinations == ()
    assert isinstance(settings.tracker.quiet_period_s, float)  # TOML 10 becomes 10.0


def test_default_file_is_used_without_path_or_env() -> None:
    assert load_settings(env={}).source == DEFAULT_CONFIG


def test_qsmnode_config_env_picks_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[listener]\nport = 4242\n")
    settings = load_settings(env={"QSMNODE_CONFIG": str(path)})
    assert settings.source == path
    assert settings.listener.port == 4242


def test_shipped_file_documents_every_key() -> None:
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    shipped = tomllib.loads(text)
    for key, hint, _ in schema_keys():
        leaf = key.rsplit(".", 1)[-1]
        # present, possibly commented out (optional paths, the [[destinations]] example)
        assert re.search(rf"^[#\s]*{leaf} = ", text, re.MULTILINE), f"{key} not in the file"
        optional = isinstance(hint, type(Path | None)) or "[]" in key
        if not optional:  # a key with a value must be set, so the file shows every default
            table: Any = shipped
            for part in key.split("."):
                assert part in table, f"{key} is not set in {DEFAULT_CONFIG}"
                table = table[part]


def test_every_key_line_of_the_shipped_file_has_a_comment() -> None:
    lines = DEFAULT_CONFIG.read_text(encoding="utf-8").splitlines()
    assignment = re.compile(r"^\w+ = ([\"\[\d+-]|true$|false$)")  # key = TOML value
    for number, line in enumerate(lines[1:], start=2):
        if assignment.match(line.lstrip("# ")):
            above = lines[number - 2]
            assert above.startswith("#"), f"line {number} ({line!r}) has no comment above"
            assert not assignment.match(above.lstrip("# ")), f"line {number}: comment above"


def test_shipped_file_lists_every_environment_override() -> None:
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    assert ENV_OVERRIDES == {
        "QSMNODE_PATHS_STATE_DIR": "paths.state_dir",
        "QSMNODE_LISTENER_PORT": "listener.port",
        "QSMNODE_LISTENER_TLS_CERT_FILE": "listener.tls.cert_file",
        "QSMNODE_LISTENER_TLS_KEY_FILE": "listener.tls.key_file",
        "QSMNODE_LISTENER_TLS_CA_FILE": "listener.tls.ca_file",
        "QSMNODE_PIPELINE_M1_NORMATIVE_TABLE": "pipeline.m1_normative_table",
        "QSMNODE_HTTP_PORT": "http.port",
        "QSMNODE_AUDIT_LOG_FILE": "audit.log_file",
    }
    for variable, key in ENV_OVERRIDES.items():
        assert re.search(rf"^#\s+{variable}\s+{re.escape(key)}$", text, re.MULTILINE), variable


# ---------------------------------------------------------------------------------------------
# Good files


def test_keys_left_out_take_the_defaults_and_ints_become_floats(tmp_path: Path) -> None:
    path = write(tmp_path, "[tracker]\nquiet_period_s = 5\n")
    settings = load_settings(path, env={})
    assert settings.tracker.quiet_period_s == 5.0
    assert isinstance(settings.tracker.quiet_period_s, float)
    assert settings.tracker.max_wait_s == Settings().tracker.max_wait_s
    assert settings.listener == Settings().listener


def test_destinations_and_senders_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, """
[listener]
allowed_senders = []

[rules]
field_strengths_t = [7, 6.98]

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.5"
port = 104

[[destinations]]
name = "research"
ae_title = "ORTHANC"
host = "orthanc.example.org"
port = 4242
calling_ae_title = "QSM7T"
""")
    settings = load_settings(path, env={})
    assert settings.listener.allowed_senders == ()
    assert settings.rules.field_strengths_t == (7.0, 6.98)
    first, second = settings.destinations
    assert (first.name, first.ae_title, first.host, first.port) == ("pacs", "PACS", "10.0.0.5", 104)
    assert first.calling_ae_title == "QSMNODE" and not first.tls.enabled
    assert second.calling_ae_title == "QSM7T"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "tls").mkdir()
    for name in ("node.crt", "node.key", "ca.crt"):
        (folder / "tls" / name).write_text("PEM")
    write(folder, """
[paths]
state_dir = "state"

[listener.tls]
enabled = true
cert_file = "tls/node.crt"
key_file = "tls/node.key"
ca_file = "tls/ca.crt"
""")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    settings = load_settings(Path("etc/node.toml"), env={})
    assert settings.paths.state_dir == folder / "state"
    assert settings.listener.tls.cert_file == folder / "tls" / "node.crt"
    assert settings.source == folder / "node.toml"


# ---------------------------------------------------------------------------------------------
# Bad files: each gives its own message, naming the file, the key and what is expected

_PACS = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "pacs"\nport = 104\n'

BAD = {
    "unknown key": (
        "[listener]\nprot = 11112\n",
        'listener.prot: unknown key (did you mean "port"? known keys: ae_title, host, port,',
    ),
    "unknown section": (
        "[listner]\nport = 11112\n",
        'listner: unknown section (did you mean "listener"? known sections: paths, listener,',
    ),
    "unknown nested key": (
        "[listener.tls]\nenable = true\n",
        'listener.tls.enable: unknown key (did you mean "enabled"?',
    ),
    "wrong type": (
        '[tracker]\nquiet_period_s = "ten"\n',
        'tracker.quiet_period_s: expected a number (seconds) > 0, got string "ten"',
    ),
    "bool for int": (
        "[listener]\nport = true\n",
        "listener.port: expected an integer 1-65535, got boolean true",
    ),
    "bool for float": (
        "[workers]\nlease_s = false\n",
        "workers.lease_s: expected a number (seconds) > 0, got boolean false",
    ),
    "float for int": (
        "[workers]\nprocesses = 2.5\n",
        "workers.processes: expected an integer >= 1, got 2.5",
    ),
    "non-finite float": (
        "[tracker]\nmax_wait_s = inf\n",
        "tracker.max_wait_s: expected a number (seconds) > 0, got inf",
    ),
    "port out of range": (
        "[listener]\nport = 70000\n",
        "listener.port: expected an integer 1-65535, got 70000",
    ),
    "zero timeout": (
        "[listener]\nacse_timeout_s = 0\n",
        "listener.acse_timeout_s: expected a number (seconds) > 0, got 0",
    ),
    "small PDU": (
        "[listener]\nmax_pdu_bytes = 1024\n",
        "listener.max_pdu_bytes: expected 0 (no limit) or an integer 4096-4294967295, got 1024",
    ),
    "AE title too long": (
        '[listener]\nae_title = "QSMNODE_TOO_LONG_X"\n',
        'listener.ae_title: expected an AE title: 1-16 printable ASCII characters, no backslash, '
        'no leading or trailing spaces, got string "QSMNODE_TOO_LONG_X"',
    ),
    "AE title with backslash": (
        '[listener]\nae_title = "QSM\\\\NODE"\n',
        'listener.ae_title: expected an AE title',
    ),
    "AE title of spaces": (
        '[[listener.allowed_senders]]\nae_title = "   "\n',
        'listener.allowed_senders[0].ae_title: expected an AE title: 1-16 printable ASCII',
    ),
    "bad host": (
        '[[listener.allowed_senders]]\nae_title = "MR"\nhosts = ["10.0.0.1", "bad host"]\n',
        'listener.allowed_senders[0].hosts[1]: expected a hostname or IP address, '
        'got string "bad host"',
    ),
    "hosts not an array": (
        '[[listener.allowed_senders]]\nae_title = "MR"\nhosts = "10.0.0.1"\n',
        'listener.allowed_senders[0].hosts: expected an array (each item a hostname or IP '
        'address), got string "10.0.0.1"',
    ),
    "duplicate allowed sender": (
        '[[listener.allowed_senders]]\nae_title = "MR"\n[[listener.allowed_senders]]\n'
        'ae_title = "MR"\n',
        'listener.allowed_senders[1].ae_title: duplicate AE title "MR" '
        '(also in listener.allowed_senders[0])',
    ),
    "max_wait below quiet period": (
        "[tracker]\nquiet_period_s = 30\nmax_wait_s = 20\n",
        "tracker.max_wait_s: expected a number (seconds) >= tracker.quiet_period_s (30), got 20",
    ),
    "retry_max below retry_initial": (
        "[sender]\nretry_initial_s = 60\nretry_max_s = 30.5\n",
        "sender.retry_max_s: expected a number (seconds) >= sender.retry_initial_s (60), "
        "got 30.5",
    ),
    "duplicate destination names": (
        '[[destinations]]\nname = "pacs"\nae_title = "A"\nhost = "a"\nport = 104\n'
        '[[destinations]]\nname = "pacs"\nae_title = "B"\nhost = "b"\nport = 104\n',
        'destinations[1].name: duplicate name "pacs" (also destinations[0].name)',
    ),
    "destination missing a key": (
        '[[destinations]]\nname = "pacs"\nae_title = "A"\nport = 104\n',
        "destinations[0].host: missing required key (expected a hostname or IP address)",
    ),
    "destinations as a table": (
        '[destinations]\nname = "pacs"\n',
        "destinations: expected an array of tables ([[destinations]]), got a table",
    ),
    "section as a value": (
        "tracker = 5\n",
        "tracker: expected a table, got 5",
    ),
    "logging level": (
        '[logging]\nlevel = "info"\n',
        'logging.level: expected one of DEBUG, INFO, WARNING, ERROR, got string "info"',
    ),
    "empty path": (
        '[paths]\nstate_dir = ""\n',
        'paths.state_dir: expected a directory path, got string ""',
    ),
    "http port equal to listener port": (
        "[http]\nhost = \"0.0.0.0\"\nport = 11112\n",
        "http.port: expected a port other than listener.port (11112) on the same address",
    ),
    "field strength out of range": (
        "[rules]\nfield_strengths_t = [7, 7000]\n",
        "rules.field_strengths_t[1]: expected a number (tesla) > 0 and <= 20, got 7000",
    ),
    "negative retention age": (
        "[retention]\nspool_days = -1\n",
        "retention.spool_days: expected a number (days) >= 0, got -1",
    ),
    "retention check interval zero": (
        "[retention]\ncheck_interval_s = 0\n",
        "retention.check_interval_s: expected a number (seconds) > 0, got 0",
    ),
    "emergency margin not an integer": (
        "[retention]\nemergency_margin_mb = 1.5\n",
        "retention.emergency_margin_mb: expected an integer >= 0 (MiB; 0 = no emergency "
        "clean), got 1.5",
    ),
    "audit enabled not a boolean": (
        '[audit]\nenabled = "yes"\n',
        'audit.enabled: expected true or false, got string "yes"',
    ),
    "missing normative table": (
        '[pipeline]\nm1_normative_table = "no-such-table.toml"\n',
        "pipeline.m1_normative_table: ",
    ),
    "z flag zero": (
        "[pipeline]\nz_flag = 0\n",
        "pipeline.z_flag: expected a number > 0, got 0",
    ),
    "z flag negative": (
        "[pipeline]\nz_flag = -2.5\n",
        "pipeline.z_flag: expected a number > 0, got -2.5",
    ),
    "z flag a string": (
        '[pipeline]\nz_flag = "3"\n',
        'pipeline.z_flag: expected a number > 0, got string "3"',
    ),
    "follow-up pacs unknown": (
        _PACS + '[follow_up]\npacs = "archive"\n',
        'follow_up.pacs: expected the name of one of destinations (pacs), got "archive"',
    ),
    "follow-up pacs by STOW": (
        _PACS + 'stow_url = "http://pacs:8042/dicom-web"\n[follow_up]\npacs = "pacs"\n',
        'follow_up.pacs: destination "pacs" is reached by DICOMweb STOW-RS',
    ),
    "follow-up move without a port": (
        _PACS + '[follow_up]\npacs = "pacs"\nretrieve = "move"\n',
        'follow_up.move_port: expected a port 1-65535 with retrieve = "move", got 0',
    ),
    "qsm method unknown": (
        '[pipeline]\nqsm_method = "morphology"\n',
        'pipeline.qsm_method: expected one of tfi, single-step-tv, pdf-tv-admm, got string '
        '"morphology"',
    ),
    "follow-up retrieve unknown": (
        '[follow_up]\nretrieve = "fetch"\n', "follow_up.retrieve: expected one of",
    ),
    "follow-up limit zero": (
        "[follow_up]\nchi_limit_ppm = 0\n", "follow_up.chi_limit_ppm: expected a number",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_file_gives_its_specific_message(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_pipeline_z_flag_is_read_and_defaults_to_the_builders_threshold(tmp_path: Path) -> None:
    from qsmnode.dicom.derived.key_images import Z_FLAG
    from qsmnode.dicom.derived.kos import Z_HIGH

    assert Settings().pipeline.z_flag == Z_FLAG == Z_HIGH == 2.0
    settings = load_settings(write(tmp_path, "[pipeline]\nz_flag = 3\n"), env={})
    assert settings.pipeline.z_flag == 3.0 and isinstance(settings.pipeline.z_flag, float)
    settings = load_settings(write(tmp_path, "[pipeline]\nz_flag = 1.5\n"), env={})
    assert settings.pipeline.z_flag == 1.5


def test_follow_up_is_off_by_default_and_read(tmp_path: Path) -> None:
    assert Settings().follow_up.pacs is None
    settings = load_settings(write(tmp_path, _PACS + '[follow_up]\npacs = "pacs"\n'
                                   'retrieve = "move"\nmove_port = 11113\n'
                                   'chi_limit_ppm = 0.02\n'), env={})
    follow = settings.follow_up
    assert (follow.pacs, follow.retrieve, follow.move_port, follow.chi_limit_ppm) == (
        "pacs", "move", 11113, 0.02)


def test_retention_and_audit_keys_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, """
[paths]
state_dir = "state"

[retention]
enabled = false
spool_days = 0.5
outbox_days = 0
check_interval_s = 60
emergency_margin_mb = 0

[audit]
log_file = "logs/audit.log"
""")
    settings = load_settings(path, env={})
    retention = settings.retention
    assert (retention.enabled, retention.spool_days, retention.outbox_days) == (False, 0.5, 0.0)
    assert (retention.check_interval_s, retention.emergency_margin_mb) == (60.0, 0)
    assert settings.audit.path(settings.paths.state_dir) == tmp_path / "logs" / "audit.log"
    default = load_settings(write(tmp_path, "[paths]\nstate_dir = \"s\"\n", "b.toml"), env={})
    assert default.audit.path(default.paths.state_dir) == tmp_path / "s" / "audit.log"
    off = load_settings(write(tmp_path, "[audit]\nenabled = false\n", "c.toml"), env={})
    assert off.audit.path(off.paths.state_dir) is None


def test_missing_tls_certificate_names_the_key_and_path(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_text("PEM")
    (tmp_path / "ca.crt").write_text("PEM")
    path = write(tmp_path, """
[listener.tls]
enabled = true
cert_file = "missing.crt"
key_file = "node.key"
ca_file = "ca.crt"
""")
    assert error_of(path) == (
        f"{path}: listener.tls.cert_file: file not found: {tmp_path / 'missing.crt'}"
    )


def test_tls_enabled_without_ca_file_when_client_certs_are_required(tmp_path: Path) -> None:
    (tmp_path / "node.crt").write_text("PEM")
    (tmp_path / "node.key").write_text("PEM")
    text = '[listener.tls]\nenabled = true\ncert_file = "node.crt"\nkey_file = "node.key"\n'
    message = error_of(write(tmp_path, text))
    assert message == (
        f"{tmp_path / 'node.toml'}: listener.tls.ca_file: missing: a file path is required when "
        "listener.tls.enabled and listener.tls.require_client_cert are true"
    )
    relaxed = write(tmp_path, text + "require_client_cert = false\n", name="relaxed.toml")
    assert load_settings(relaxed, env={}).listener.tls.ca_file is None


def test_disabled_tls_does_not_check_files(tmp_path: Path) -> None:
    path = write(tmp_path, '[listener.tls]\ncert_file = "nowhere.crt"\n')
    assert load_settings(path, env={}).listener.tls.cert_file == tmp_path / "nowhere.crt"


def test_destination_tls_needs_cert_and_key_together(tmp_path: Path) -> None:
    (tmp_path / "node.crt").write_text("PEM")
    path = write(tmp_path, """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs"
port = 2762
[destinations.tls]
enabled = true
cert_file = "node.crt"
""")
    assert error_of(path) == (
        f"{path}: destinations[0].tls.key_file: missing: a file path is required when "
        "destinations[0].tls.cert_file is set"
    )


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[listener]\nport = 11112\nae_title = QSMNODE\n")
    message = error_of(path)
    assert message.startswith(f"{path}: TOML syntax error: ")
    assert "line 3" in message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert error_of(path) == f"{path}: file not found"


def test_missing_file_from_qsmnode_config_says_so(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml \(from QSMNODE_CONFIG\): file not"):
        load_settings(env={"QSMNODE_CONFIG": str(path)})


def test_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[listener]\nae_title = "M\xc9"\n')
    assert error_of(path).startswith(f"{path}: not UTF-8 text")


# ---------------------------------------------------------------------------------------------
# Environment overrides


def test_env_overrides_a_path_and_ports(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, "[listener]\nport = 104\n")
    monkeypatch.chdir(tmp_path)
    env = {
        "QSMNODE_PATHS_STATE_DIR": "run/state",  # relative to the working directory
        "QSMNODE_LISTENER_PORT": "11113",
        "QSMNODE_HTTP_PORT": "0",
    }
    settings = load_settings(path, env=env)
    assert settings.paths.state_dir == tmp_path / "run" / "state"
    assert settings.listener.port == 11113
    assert settings.http.port == 0
    assert settings.env_overrides == tuple(sorted(env))


def test_env_cannot_override_other_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    env = {
        "QSMNODE_LISTENER_AE_TITLE": "HACKED",
        "QSMNODE_LOGGING_LEVEL": "nonsense",
        "QSMNODE_WORKERS_PROCESSES": "64",
    }
    settings = load_settings(path, env=env)
    assert settings == dataclasses.replace(Settings(), source=path)
    assert set(ENV_OVERRIDES).isdisjoint(env)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", 'expected an integer 1-65535, got string "abc"'),
        ("70000", "expected an integer 1-65535, got 70000"),
        ("", 'expected an integer 1-65535, got string ""'),
    ],
)
def test_invalid_env_value_names_the_variable(tmp_path: Path, value: str, expected: str) -> None:
    path = write(tmp_path, "")
    message = error_of(path, env={"QSMNODE_LISTENER_PORT": value})
    assert message == f"QSMNODE_LISTENER_PORT (environment, overrides listener.port): {expected}"


def test_env_path_used_by_tls_check_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, '[listener.tls]\nenabled = true\nrequire_client_cert = false\n'
                           'key_file = "k"\n')
    (tmp_path / "k").write_text("PEM")
    missing = tmp_path / "missing.crt"
    message = error_of(path, env={"QSMNODE_LISTENER_TLS_CERT_FILE": str(missing)})
    assert message == (
        "QSMNODE_LISTENER_TLS_CERT_FILE (environment, overrides listener.tls.cert_file): "
        f"file not found: {missing}"
    )


def test_empty_qsmnode_config_is_an_error() -> None:
    with pytest.raises(ConfigError, match="QSMNODE_CONFIG: expected the path"):
        load_settings(env={"QSMNODE_CONFIG": " "})


# ---------------------------------------------------------------------------------------------
# The command line


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSMNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "qsmnode", "config", "check", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False,
    )


def test_cli_config_check_good_file() -> None:
    done = run_check(str(DEFAULT_CONFIG))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{DEFAULT_CONFIG}: OK"
    assert done.stderr == ""


def test_cli_config_check_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[listener]\nport = 70000\n")
    done = run_check(str(path))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {path}: listener.port: expected an integer 1-65535, got 70000"
    )
    assert "Traceback" not in done.stderr


def test_config_knows_every_m1_atlas() -> None:
    from qsmnode.dicom.reference_data import ATLASES
    from qsmnode.node.config import M1_ATLASES

    assert set(M1_ATLASES) == set(ATLASES)


def test_config_knows_every_qsm_method() -> None:
    """``[pipeline] qsm_method`` takes exactly the engine's named pipelines; another name is
    refused with the choices named."""
    from qsmnode.qsm import DEFAULT_METHOD, METHOD_NAMES
    from qsmnode.qsm.engine import METHODS

    assert METHOD_NAMES == tuple(METHODS) and DEFAULT_METHOD in METHOD_NAMES
