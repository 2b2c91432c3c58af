"""Debian's Orthanc as a test PACS on loopback: start, stop, restart, and query its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import free_port


class Orthanc:
    """One Orthanc server with its own storage folder, DICOM port and HTTP port.

    ``known_modalities`` maps AE titles to (host, port); with ``accept_unknown=False`` Orthanc
    refuses associations from any other AE title.
    """

    def __init__(
        self,
        folder: Path,
        ae_title: str = "ORTHANC",
        known_modalities: dict[str, tuple[str, int]] | None = None,
        accept_unknown: bool = True,
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "qsmnode-test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": accept_unknown,
            "DicomAlwaysAllowEcho": accept_unknown,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {
                name.lower(): [name, host, port]
                for name, (host, port) in (known_modalities or {}).items()
            },
            "StableAge": 1,
        }
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60.0) -> Orthanc:
        program = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [program, "--verbose", str(self.config_path)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start in {timeout_s} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def instances(self) -> list[str]:
        return self.get("/instances")

    def series(self) -> list[dict[str, Any]]:
        return self.get("/series?expand")

    def studies(self) -> list[dict[str, Any]]:
        return self.get("/studies?expand")
