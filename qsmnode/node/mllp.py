"""MLLP (HL7 Minimal Lower Layer Protocol) client: one connection, one message at a time.

A message goes out framed as ``<VT> message <FS><CR>`` (0x0B ... 0x1C 0x0D); the answer is read
up to its own ``<FS><CR>``, within the timeout. A connection that closes before the whole
answer came, an answer without the start byte, one larger than :data:`MAX_ANSWER_BYTES`, or
silence past the timeout is an :class:`MLLPError`: the connection is closed then (its stream
state is unknown) and the caller tries again later. Optionally over TLS (the server is verified
as for DICOM destinations: :func:`qsmnode.node.association.client_ssl_context`).
"""

from __future__ import annotations

import socket
import ssl
import time

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ANSWER_BYTES = 1024 * 1024
"""An acknowledgement is small: more than this is not one."""


class MLLPError(OSError):
    """The exchange failed at the transport: no connection, closed, timed out, not MLLP."""


class MLLPConnection:
    """A client connection to ``host:port`` (TLS with ``context``); ``timeout_s`` bounds the
    connect and each answer."""

    def __init__(self, host: str, port: int, timeout_s: float,
                 context: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        try:
            raw = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            raise MLLPError(f"cannot connect to {host}:{port}: {_reason(exc)}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock: socket.socket = (raw if context is None
                                         else context.wrap_socket(raw, server_hostname=host))
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise MLLPError(f"TLS with {host}:{port} failed: {_reason(exc)}") from None
        self._buffer = b""

    def exchange(self, message: str) -> str:
        """Send one message and return the answer (decoded as UTF-8, undecodable bytes
        replaced).

        Raises:
            MLLPError: see the module docstring (the connection is closed).
        """
        try:
            self._sock.sendall(START_BLOCK + message.encode("utf-8") + END_BLOCK)
            return self._read().decode("utf-8", errors="replace")
        except MLLPError:
            self.close()
            raise
        except (OSError, ssl.SSLError) as exc:
            self.close()
            if isinstance(exc, TimeoutError | socket.timeout):
                raise MLLPError(f"no answer from {self.host}:{self.port} within "
                                f"{self.timeout_s:g} s") from None
            raise MLLPError(f"connection to {self.host}:{self.port} failed: "
                            f"{_reason(exc)}") from None

    def _read(self) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        while END_BLOCK not in self._buffer:
            if len(self._buffer) > MAX_ANSWER_BYTES:
                raise MLLPError(f"{self.host}:{self.port} answered more than "
                                f"{MAX_ANSWER_BYTES} bytes without an end block")
            left = deadline - time.monotonic()
            if left <= 0:
                raise MLLPError(f"no complete answer from {self.host}:{self.port} within "
                                f"{self.timeout_s:g} s")
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                what = "before answering" if not self._buffer else "in the middle of its answer"
                raise MLLPError(f"{self.host}:{self.port} closed the connection {what}")
            self._buffer += chunk
        block, _, self._buffer = self._buffer.partition(END_BLOCK)
        start = block.find(START_BLOCK)
        if start < 0:
            raise MLLPError(f"{self.host}:{self.port} answered without the MLLP start byte "
                            "(not MLLP)")
        return block[start + 1:]

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> MLLPConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)
