"""``stow_url`` of a ``[[destinations]]`` entry: read, and refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsmnode.node.association import Peer
from qsmnode.node.config import ConfigError, load_settings

TABLE = """
[[destinations]]
name = "web"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
stow_url = "{url}"
"""


def test_stow_url_is_read_and_names_the_peer(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(TABLE.format(url="http://127.0.0.1:8042/dicom-web"))
    [destination] = load_settings(path, env={}).destinations
    peer = Peer.from_config(destination)
    assert peer.stow_url == "http://127.0.0.1:8042/dicom-web"
    assert str(peer) == "web (STOW-RS http://127.0.0.1:8042/dicom-web)"


@pytest.mark.parametrize("url", ["ftp://pacs/dicom-web", "pacs:8042/dicom-web"])
def test_a_bad_stow_url_is_named(tmp_path: Path, url: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(TABLE.format(url=url))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert str(caught.value) == (
        f'{path}: destinations[0].stow_url: expected an http:// or https:// DICOMweb base URL '
        f'(e.g. http://pacs:8042/dicom-web), got string "{url}"')
