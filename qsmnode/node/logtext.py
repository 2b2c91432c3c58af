"""The node's log lines: one record, one line, whatever text a peer put in it.

Peer-supplied text (a series description, an AE title, an exception that quotes either) can
hold a newline or a terminal escape. :class:`EscapingFormatter` shows control characters as
``\\x..`` escapes in the message, and indents every line of a traceback, so no record can
forge a line of its own (or act on a terminal); a record from pynetdicom never carries a
traceback: the exception is named on the same line, with the peer it concerns when known.
"""

from __future__ import annotations

import logging
from typing import IO

from qsmnode.node import pynetdicom_compat as compat
from qsmnode.node.redact import NO_REDACTION, Redactor

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_redactor: Redactor = NO_REDACTION


def set_redactor(redactor: Redactor) -> None:
    """Redact the values ``redactor`` knows from every line logged from now on (a worker
    child: the patient and study values of its acquisition, see :mod:`qsmnode.node.redact`)."""
    global _redactor
    _redactor = redactor


def printable(text: str) -> str:
    """``text`` with control characters (newlines too) shown as ``\\x..`` escapes."""
    return compat.printable(text)


class EscapingFormatter(logging.Formatter):
    """A formatter whose every record is one line, plus an indented traceback for the node's
    own errors (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.name.split(".")[0] == "pynetdicom":
            exc = record.exc_info[1]
            message = record.getMessage()
            if exc is not None and str(exc) != message:
                message = f"{message} ({type(exc).__name__}: {exc})"
            elif exc is not None:
                message = f"{type(exc).__name__}: {exc}"
            peer = compat.peer_of_current_thread()
            record = logging.makeLogRecord({**record.__dict__, "msg": message, "args": None,
                                            "exc_info": None, "exc_text": None})
            if peer:
                record.msg = f"{record.msg} [peer {peer}]"
        return _redactor(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join("    " + printable(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + printable(line) for line in stack_info.splitlines())


def configure(stream: IO[str], level: int | str, fmt: str = FORMAT) -> None:
    """``logging.basicConfig`` to ``stream`` with an :class:`EscapingFormatter`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)  # library warnings too: one line, escaped, redacted
