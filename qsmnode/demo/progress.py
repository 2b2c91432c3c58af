"""Progress lines for the demo: one line per step, redrawn in place on a terminal.

On a pipe or a log file (not a terminal) a line is printed when its step ends, plus a
heartbeat every ``heartbeat_s`` seconds while a long step runs, so logs stay short.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

BAR_WIDTH = 28


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[██████░░░░]  37/100`` (an empty bar when the total is not known yet)."""
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    count = f"{done}/{total}" if total > 0 else f"{done}"
    return f"[{'█' * filled}{'░' * (width - filled)}] {count}"


def seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 100 else f"{value / 60:.1f} min"


class Line:
    """One step's status line: :meth:`update` while it runs, :meth:`finish` at the end."""

    def __init__(self, label: str, stream: TextIO, heartbeat_s: float) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.heartbeat_s = heartbeat_s
        self.started = time.monotonic()
        self._last_print = self.started
        self._text = ""
        self._lock = threading.Lock()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def _render(self, text: str) -> str:
        return f"  {self.label:<14} {text}"

    def update(self, text: str) -> None:
        with self._lock:
            self._text = text
            now = time.monotonic()
            if self.tty:
                self.stream.write("\r\033[K" + self._render(text))
                self.stream.flush()
            elif now - self._last_print >= self.heartbeat_s:
                self._last_print = now
                print(self._render(f"{text} …"), file=self.stream, flush=True)

    def finish(self, text: str) -> None:
        with self._lock:
            prefix = "\r\033[K" if self.tty else ""
            self.stream.write(prefix + self._render(f"✓ {text}") + "\n")
            self.stream.flush()

    def fail(self, text: str) -> None:
        with self._lock:
            prefix = "\r\033[K" if self.tty else ""
            self.stream.write(prefix + self._render(f"✗ {text}") + "\n")
            self.stream.flush()


class Console:
    """Where the demo reports; ``stream`` defaults to stdout."""

    def __init__(self, stream: TextIO | None = None, heartbeat_s: float = 15.0) -> None:
        self.stream = stream or sys.stdout
        self.heartbeat_s = heartbeat_s

    def say(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def line(self, label: str) -> Line:
        return Line(label, self.stream, self.heartbeat_s)

    @contextmanager
    def working(self, label: str, text: str) -> Iterator[Line]:
        """A line that shows ``text`` and the elapsed time while the block runs (for blocking
        calls that report nothing themselves); the block calls :meth:`Line.finish`."""
        line = self.line(label)
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(0.5):
                line.update(f"{text} {seconds(line.elapsed_s)}")

        thread = threading.Thread(target=tick, name=f"progress-{label}", daemon=True)
        thread.start()
        try:
            yield line
        finally:
            stop.set()
            thread.join()

