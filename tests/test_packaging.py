"""The Dockerfile and the systemd unit agree with the package (Docker cannot build here)."""

from __future__ import annotations

import configparser
import json
import shlex
import tomllib

from qsmnode.cli import build_parser
from qsmnode.node.config import ENV_OVERRIDES, load_settings
from tests.conftest import REPO


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def test_dockerfile_copies_what_exists_and_runs_as_non_root() -> None:
    rows = dockerfile_instructions()
    for keyword, rest in rows:
        if keyword == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    users = [rest for keyword, rest in rows if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the container must not run as root"
    volumes = " ".join(rest for keyword, rest in rows if keyword == "VOLUME")
    assert "/etc/qsmnode" in volumes and "/var/lib/qsmnode" in volumes
    env = " ".join(rest for keyword, rest in rows if keyword == "ENV")
    assert "QSMNODE_PATHS_STATE_DIR=/var/lib/qsmnode" in env
    assert "QSMNODE_PATHS_STATE_DIR" in ENV_OVERRIDES
    # The package the image installs is the one pyproject declares, with its console script.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    entry = [rest for keyword, rest in rows if keyword == "ENTRYPOINT"][-1]
    assert project["scripts"]["qsmnode"] == "qsmnode.__main__:main" and "qsmnode" in entry
    command = [rest for keyword, rest in rows if keyword == "CMD"][-1]
    build_parser().parse_args(json.loads(command))  # a real subcommand


def test_systemd_unit_is_hardened_and_runs_real_commands() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keep the case of systemd keys
    unit.read(REPO / "systemd" / "qsmnode.service")
    service = unit["Service"]
    assert service["User"] == "qsmnode" and service["Restart"] == "on-failure"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert "/var/lib/qsmnode" in service["ReadWritePaths"]
    state_env = service["Environment"].partition("=")[2]
    assert state_env in service["ReadWritePaths"]
    parser = build_parser()
    for key in ("ExecStart", "ExecStartPre"):
        program, *args = shlex.split(service[key])
        assert program.endswith("/qsmnode")
        parser.parse_args(args)


def test_shipped_config_state_dir_is_the_service_state_dir() -> None:
    settings = load_settings(REPO / "config" / "qsmnode.toml", env={})
    assert str(settings.paths.state_dir) == "/var/lib/qsmnode"
