"""How ``hl7bridge serve`` writes its log: a line per entry, to standard error, in batches.

The line per message of ``hl7bridge.messages`` is the busiest thing hl7bridge logs,
and at tens of thousands of messages a second what it costs counts. Python's
``StreamHandler`` flushes after every record and ``sys.stderr`` writes each line
through, so each line would be a ``write(2)`` of its own; and building and
formatting a ``LogRecord`` costs more than the rest of an ACK-only message's path.

So ``hl7bridge serve`` writes its log through a buffer of its own: warnings and
errors are flushed at once, the rest by :func:`flush` every :data:`FLUSH_INTERVAL`
seconds (serve runs it on its loop) and by :func:`logging.shutdown` at exit, so a
line is late by a fraction of a second at most and none is lost when the process
ends. And it writes the line per message itself (:class:`MessageLines`), formatted
as its handler would format the record, without building the record.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol, TextIO

from hl7bridge.session import message_fields, message_log, message_text
from hl7bridge.tap import JSONFormatter

#: Seconds a line may wait in the buffer before it is written.
FLUSH_INTERVAL = 0.25


class BatchingStreamHandler(logging.StreamHandler):
    """A ``StreamHandler`` that flushes its stream for warnings and errors only; :meth:`flush` does the rest."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class LineFormatter(Protocol):
    shows_fields: bool

    def line(self, when: float, level: str, logger: str, text: str, fields: dict[str, Any], error: str | None) -> str:
        """One entry as a line, from its parts."""


class TextFormatter(logging.Formatter):
    """``2024-05-02 10:15:01,234 INFO logger: message``, the format of :func:`logging.basicConfig` with the time.

    The date and time to the second are formatted once a second, not for each entry.
    """

    shows_fields = False

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def line(self, when: float, level: str, logger: str, text: str, fields: dict[str, Any], error: str | None) -> str:
        """One entry as a line (and the traceback of ``error`` under it); the text format shows no fields."""
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(self.default_time_format, self.converter(second))
        head = f"{self._stamp},{int((when - second) * 1000):03d} {level} {logger}: {text}"
        return f"{head}\n{error}" if error else head

    def format(self, record: logging.LogRecord) -> str:
        error = self.formatException(record.exc_info) if record.exc_info else None
        if record.stack_info:
            error = "\n".join(filter(None, (error, self.formatStack(record.stack_info))))
        return self.line(record.created, record.levelname, record.name, record.getMessage(), {}, error)


class MessageLines:
    """Each message's line written to ``handler``'s stream as ``handler`` would write the record of
    :func:`hl7bridge.session.log_message`, without the record: :meth:`write` is ``hl7bridge serve``'s
    :attr:`Engine.log_message <hl7bridge.session.Engine>`."""

    def __init__(self, handler: BatchingStreamHandler, formatter: LineFormatter) -> None:
        assert handler.lock is not None  # a Handler creates its lock when it is made
        self.lock = handler.lock
        self.stream = handler.stream
        self.terminator = handler.terminator
        self.line = formatter.line
        self.shows_fields = formatter.shows_fields

    def write(self, peer: str, message_type: str, control_id: str, ack_code: str, seconds: float, sent: bool) -> None:
        text = message_text(peer, message_type, control_id, ack_code, seconds, sent)
        fields = message_fields(peer, message_type, control_id, ack_code, seconds, sent) if self.shows_fields else {}
        line = self.line(time.time(), "INFO", message_log.name, text, fields, None) + self.terminator
        with self.lock:  # records of other threads go to the same stream
            self.stream.write(line)


def buffered_stderr() -> TextIO:
    """Standard error with a buffer of its own; ``sys.stderr`` itself, which writes each line through, where
    it has no file descriptor (under test runners that capture it)."""
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return sys.stderr
    return open(descriptor, "w", encoding=sys.stderr.encoding, errors="backslashreplace", closefd=False)


def configure(level: str, json_format: bool = False) -> MessageLines:
    """Log entries of ``level`` and above to standard error, as text or JSON lines, in batches.

    Returns:
        what writes the line per message of a listener to the same stream.
    """
    handler = BatchingStreamHandler(buffered_stderr())
    formatter = JSONFormatter() if json_format else TextFormatter()
    handler.setFormatter(formatter)
    # The logging HOWTO's "Optimization": leave out of each record what no line shows
    # (the calling function, thread, process).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(level=level, handlers=[handler])
    return MessageLines(handler, formatter)


def flush() -> None:
    """Write out what the handlers of the root logger hold."""
    for handler in logging.getLogger().handlers:
        handler.flush()
