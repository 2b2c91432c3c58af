"""qsmnode.compat: the installed versions of the libraries whose internals are used are checked
against the tested ranges, which pyproject.toml pins too; the start-up installs the tweaks."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest

from qsmnode import compat
from tests.conftest import REPO


def fake_versions(monkeypatch: pytest.MonkeyPatch, **versions: str | None) -> None:
    """``importlib.metadata.version`` as compat calls it, with ``versions`` installed instead
    (None: not installed); other distributions as they are."""
    real = metadata.version

    def version(name: str) -> str:
        key = name.replace("-", "_")
        if key not in versions:
            return real(name)
        if versions[key] is None:
            raise metadata.PackageNotFoundError(name)
        return str(versions[key])

    monkeypatch.setattr(compat.metadata, "version", version)


def test_the_installed_libraries_are_in_the_tested_ranges() -> None:
    compat.check_versions()
    for name in compat.TESTED:
        compat.check_versions(name)


@pytest.mark.parametrize("installed", ["0.29.0", "0.30.1", "1.0", "0.22.9", "0.29.0rc1"])
def test_a_highdicom_outside_the_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                        installed: str) -> None:
    fake_versions(monkeypatch, highdicom=installed)
    with pytest.raises(compat.IncompatibleLibrary) as caught:
        compat.check_versions()
    message = str(caught.value)
    assert f"highdicom {installed} is installed" in message
    assert ">= 0.23, < 0.29" in message and "highdicom>=0.23,<0.29" in message
    assert "pynetdicom" not in message  # only the library outside its range is named


def test_a_pynetdicom_outside_the_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    fake_versions(monkeypatch, pynetdicom="3.1.0")
    with pytest.raises(compat.IncompatibleLibrary, match=r"pynetdicom 3\.1\.0 is installed, "
                       r"but qsmnode uses internals of pynetdicom tested only with versions "
                       r">= 3\.0, < 3\.1"):
        compat.check_versions()
    compat.check_versions("highdicom")  # the check of one library leaves the others alone
    with pytest.raises(compat.IncompatibleLibrary):
        compat.check_versions("pynetdicom")  # the receiver's own check


def test_versions_inside_the_range_pass_and_a_missing_library_is_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_versions(monkeypatch, highdicom="0.23.0", pynetdicom="3.0.99")
    compat.check_versions()
    fake_versions(monkeypatch, highdicom="0.28.2.post1", pynetdicom="3.0")
    compat.check_versions()
    fake_versions(monkeypatch, highdicom=None, pynetdicom="2.1.1")
    with pytest.raises(compat.IncompatibleLibrary) as caught:
        compat.check_versions()
    message = str(caught.value)
    assert "highdicom is not installed" in message and "pynetdicom 2.1.1 is installed" in message


def test_the_pins_of_pyproject_are_the_tested_ranges() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {dep.split(">")[0].split("<")[0].split("=")[0].strip(): dep.replace(" ", "")
            for dep in project["dependencies"]}
    for name in compat.TESTED:
        assert pins[name] == compat.requirement(name)
    assert compat.requirement("highdicom") == "highdicom>=0.23,<0.29"


def test_compat_imports_nothing_of_qsmnode_nor_the_libraries_on_import() -> None:
    """Both the DICOM code and the node import it: it must not depend on either, and
    importing it changes nothing (the start-up calls install)."""
    tree = ast.parse((REPO / "qsmnode" / "compat.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("qsmnode"), node.module
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("qsmnode") for alias in node.names)
    code = ("import sys, qsmnode.compat; "
            "print(sorted(m for m in ('highdicom', 'pynetdicom', 'pydicom') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def test_the_command_refuses_to_start_with_an_unsupported_library(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from qsmnode.__main__ import main

    fake_versions(monkeypatch, pynetdicom="3.2.0")
    assert main(["--help"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: pynetdicom 3.2.0 is installed") and err.count("\n") == 1
