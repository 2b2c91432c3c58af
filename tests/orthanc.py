"""Debian's Orthanc as a test PACS on loopback: the demo's :class:`qsmnode.demo.pacs.Orthanc`
(start, stop, restart, and queries of its REST API), and :class:`DicomWebOrthanc`, the same
with Debian's DICOMweb plugin (package orthanc-dicomweb) for a web viewer."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from qsmnode.demo.pacs import Orthanc

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
"""Where Debian's orthanc-dicomweb installs the plugin."""


class DicomWebOrthanc(Orthanc):
    """An :class:`Orthanc` that also answers DICOMweb (QIDO-RS, WADO-RS) under
    ``/dicom-web/`` with full study and series metadata, as OHIF reads it."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC",
                 known_modalities: dict[str, tuple[str, int]] | None = None) -> None:
        if not DICOMWEB_PLUGIN.exists():
            raise RuntimeError(
                f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN}): install the Debian "
                "package orthanc-dicomweb (scripts/setup.sh does)"
            )
        super().__init__(folder, ae_title, known_modalities)
        config = json.loads(self.config_path.read_text())
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def dicomweb_root(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, paths: list[Path]) -> list[str]:
        """Store files through the REST API (POST /instances); their Orthanc IDs."""
        ids = []
        for path in paths:
            request = urllib.request.Request(
                f"{self.url}/instances", data=path.read_bytes(), method="POST",
                headers={"Content-Type": "application/dicom"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc refused {path.name}: {answer}")
            ids.append(str(answer["ID"]))
        return ids


__all__ = ["DICOMWEB_PLUGIN", "DicomWebOrthanc", "Orthanc"]
