"""Test certificates made with the openssl command: a CA, a server and a client certificate it
signs, and a self-signed rogue client (the TLS tests of the receiver, the sender and HL7)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require_tool


def _openssl(*args: str | Path) -> None:
    subprocess.run([require_tool("openssl", "openssl"), *map(str, args)], check=True,
                   capture_output=True, timeout=60)


def certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server and a client certificate it signs, and a self-signed rogue client."""
    folder.mkdir()
    opts = ["-newkey", "rsa:2048", "-nodes"]
    _openssl("req", "-x509", *opts, "-keyout", folder / "ca.key", "-out", folder / "ca.crt",
             "-days", "2", "-subj", "/CN=qsmnode test CA")
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                        ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", *opts, "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.csr",
                 "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(extra + "\n")
        _openssl("x509", "-req", "-in", folder / f"{name}.csr", "-CA", folder / "ca.crt",
                 "-CAkey", folder / "ca.key", "-CAcreateserial", "-days", "2",
                 "-out", folder / f"{name}.crt", "-extfile", folder / f"{name}.ext")
    _openssl("req", "-x509", *opts, "-keyout", folder / "rogue.key", "-out",
             folder / "rogue.crt", "-days", "2", "-subj", "/CN=rogue")
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()}
