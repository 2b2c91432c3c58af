"""The node's log lines: one record, one line, whatever text a peer put in it.

Peer-supplied text (a series description, an AE title, an exception that quotes either) can
hold a newline or a terminal escape. :class:`EscapingFormatter` shows control characters as
``\\x..`` escapes in the message, and indents every line of a traceback, so no record can
forge a line of its own (or act on a terminal); a record from pynetdicom never carries a
traceback: the exception is named on the same line, with the peer it concerns when known.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import IO

from qsmnode import compat
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


class _RedactingFilter(logging.Filter):
    """Makes each record's message one escaped line without the values ``redactor`` knows
    (each becomes ``<Keyword>``): for the handlers of an in-process run."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = printable(self.redactor(record.getMessage()))
        record.args = None
        return True


def _warning_to_log(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, file: object = None, line: str | None = None) -> None:
    """``warnings.showwarning`` that logs a warning as one record of ``py.warnings`` (its
    category and message; no source line, which can be the library's code quoting values)."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


@contextlib.contextmanager
def redacted_library_output(redactor: Redactor) -> Iterator[None]:
    """Library output of an in-process run (``qsmnode process``) as a worker child's is: within
    the block, pydicom reads values without its validation warnings, which quote the value
    (``Invalid value for VR IS: '…'`` for a PatientID a scanner declared IS; the node and its
    workers read so too, and the header check names such attributes); any warning still
    raised (pydicom, highdicom, ours) is routed to the log; and every record the root
    logger's handlers (or Python's last-resort handler) print is one escaped line with the
    values ``redactor`` knows shown as ``<Keyword>``. Everything is restored on exit."""
    import pydicom.config

    settings = pydicom.config.settings
    mode = settings.reading_validation_mode
    record_filter = _RedactingFilter(redactor)
    handlers = [*logging.getLogger().handlers, logging.lastResort]
    settings.reading_validation_mode = pydicom.config.IGNORE
    for handler in handlers:
        if handler is not None:
            handler.addFilter(record_filter)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_to_log
            yield
    finally:
        settings.reading_validation_mode = mode
        for handler in handlers:
            if handler is not None:
                handler.removeFilter(record_filter)
