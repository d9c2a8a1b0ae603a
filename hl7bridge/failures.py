"""What a log may say about an exception: where it was raised, never its text.

HL7 messages carry patient data, and so do exceptions raised while handling
them (``KeyError('DOE^JANE')``, ``ValueError(f"cannot admit {name}")``) and the
source lines a traceback quotes. So hl7bridge logs an exception's type and,
frame by frame, the file, line and function it passed through, and nothing
else; the full text goes to the ``hl7bridge.content`` logger only when the
``log_content`` setting asks for message content in the logs.

No I/O here.
"""

from __future__ import annotations

from twisted.python.failure import Failure


def type_name(failure: Failure) -> str:
    """The exception's class, qualified unless it is a builtin: ``RuntimeError``, ``myapp.BedNotFound``."""
    kind = failure.type
    module = getattr(kind, "__module__", "builtins")
    name = getattr(kind, "__qualname__", str(kind))
    return name if module == "builtins" else f"{module}.{name}"


def _frames(failure: Failure) -> list[tuple[str, str, int]]:
    """(function, file, line) of each frame, outermost first."""
    return [(frame[0], frame[1], frame[2]) for frame in failure.frames]


def where(failure: Failure) -> str:
    """The innermost frame as ``function (file:line)``, or "" if the failure has none."""
    frames = _frames(failure)
    if not frames:
        return ""
    function, filename, line = frames[-1]
    return f"{function} ({filename}:{line})"


def summary(failure: Failure) -> str:
    """One line: the exception's type and where it was raised."""
    place = where(failure)
    return f"{type_name(failure)} in {place}" if place else type_name(failure)


def traceback_text(failure: Failure) -> str:
    """A traceback without the exception's text and without source lines."""
    lines = ["Traceback (most recent call last):"]
    lines += [f'  File "{filename}", line {line}, in {function}' for function, filename, line in _frames(failure)]
    lines.append(f"{type_name(failure)} (its text is withheld: it may quote the message)")
    return "\n".join(lines)
