"""A receiving PACS on loopback for the demo (and the tests): Debian's Orthanc when it is
installed, otherwise a small built-in storage receiver.

Both answer C-ECHO and C-STORE for every storage class qsmnode sends (Parametric Map,
Segmentation, Comprehensive 3D SR, Secondary Capture, MR) and say what they hold.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

log = logging.getLogger(__name__)

ORTHANC_PROGRAMS = ("Orthanc", "/usr/sbin/Orthanc")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_program() -> str | None:
    """The Orthanc executable, or None when it is not installed."""
    for name in ORTHANC_PROGRAMS:
        found = shutil.which(name)
        if found:
            return found
    return None


class Pacs(Protocol):
    """What the demo needs of a receiving PACS."""

    ae_title: str
    dicom_port: int

    def start(self, timeout_s: float = 60.0) -> Pacs: ...
    def stop(self) -> None: ...
    def series_counts(self) -> dict[int, int]: ...
    def where(self) -> str: ...
    def kept(self) -> str: ...


class Orthanc:
    """One Orthanc server with its own storage folder, DICOM port and HTTP port, on loopback.

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
            "Name": "qsmnode-pacs",
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
        program = orthanc_program()
        if program is None:
            raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [program, "--verbose", str(self.config_path)], stdout=log_file, stderr=log_file
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

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def instances(self) -> list[str]:
        return self.get("/instances")  # type: ignore[no-any-return]

    def series(self) -> list[dict[str, Any]]:
        return self.get("/series?expand")  # type: ignore[no-any-return]

    def studies(self) -> list[dict[str, Any]]:
        return self.get("/studies?expand")  # type: ignore[no-any-return]

    def series_counts(self) -> dict[int, int]:
        """Series number → instance count, as Orthanc holds them."""
        return {int(s["MainDicomTags"].get("SeriesNumber", 0)): len(s["Instances"])
                for s in self.series()}

    def where(self) -> str:
        return (f"Orthanc {self.ae_title}@127.0.0.1:{self.dicom_port}; browse "
                f"{self.url}/app/explorer.html")

    def kept(self) -> str:
        return (f"Orthanc's storage {self.folder / 'storage'} (to browse it again: "
                f"Orthanc {self.config_path}, then {self.url}/app/explorer.html)")


class BuiltinPacs:
    """A minimal Storage SCP: every instance it accepts is written to ``folder`` as it came
    (``<SOP Instance UID>.dcm``), for machines without Orthanc."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self._counts: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._server: Any = None
        folder.mkdir(parents=True, exist_ok=True)

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        target = self.folder / f"{ds.SOPInstanceUID}.dcm"
        temp = target.with_suffix(".tmp")
        with temp.open("wb") as f:
            f.write(event.encoded_dataset())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
        with self._lock:
            self._counts[int(getattr(ds, "SeriesNumber", 0) or 0)] += 1
        return 0x0000

    def start(self, timeout_s: float = 60.0) -> BuiltinPacs:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.dicom_port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def series_counts(self) -> dict[int, int]:
        with self._lock:
            return dict(self._counts)

    def where(self) -> str:
        return (f"built-in receiver {self.ae_title}@127.0.0.1:{self.dicom_port}; files in "
                f"{self.folder}")

    def kept(self) -> str:
        return f"the built-in receiver's folder {self.folder}"


def start_pacs(kind: str, folder: Path,
               known_modalities: dict[str, tuple[str, int]] | None = None) -> Pacs:
    """Start the receiving PACS: ``orthanc``, ``builtin``, or ``auto`` (Orthanc when it is
    installed and starts, else the built-in receiver). ``known_modalities`` (Orthanc only):
    AE titles allowed to query and retrieve."""
    if kind not in ("auto", "orthanc", "builtin"):
        raise ValueError(f"unknown PACS {kind!r}: expected auto, orthanc or builtin")
    if kind != "builtin" and orthanc_program() is not None:
        try:
            return Orthanc(folder / "orthanc", known_modalities=known_modalities).start()
        except RuntimeError as exc:
            if kind == "orthanc":
                raise
            log.warning("Orthanc did not start (%s); using the built-in receiver", exc)
    elif kind == "orthanc":
        raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
    return BuiltinPacs(folder / "received").start()
