"""The ``hl7bridge`` command: ``serve`` runs a receiver on Twisted endpoints, ``send`` sends.

``hl7bridge send [-p PORT] HOST [FILE ...]`` sends the messages of the files
(or stdin), prints their ACKs, shows progress and ends with a count per ACK
code, and exits 1 if any was negative, 2 if some got no ACK; it takes
python-hl7's ``mllp_send`` options too.

``hl7bridge serve --endpoint tcp:2575 --receiver package.module.Class`` takes the
options of ``twistd hl7bridge`` (see :mod:`hl7bridge.tap`) plus ``--uvloop``,
``--log-level`` and ``--log-format``, installs Twisted's asyncio reactor, listens, and on SIGINT or
SIGTERM stops listening, answers the messages in flight and exits.

``hl7bridge journal pending URL`` lists the messages of a journal that were
received and never answered, ``hl7bridge journal purge URL`` deletes old ones,
and ``hl7bridge replay --journal URL --receiver package.module.Class`` runs the
answered ones through a receiver again and compares its ACKs with the recorded
ones. None of them prints message content.
"""

from __future__ import annotations

import asyncio
import getopt
import json
import logging
import os
import re
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from twisted.python import usage
from twisted.python.failure import Failure

from hl7bridge import failures, framing, logs, tap
from hl7bridge.errors import LocalError
from hl7bridge.journal import DEFAULT_RETENTION_DAYS, Journal, JournalError, Message, redact
from hl7bridge.migration.shadow import AGREED, DIFFERED, FAILED, ShadowReport, compare_acks, text_table

log = logging.getLogger("hl7bridge.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


LOG_FORMATS = ("text", "json")


class ServeOptions(tap.Options):
    optFlags = [*tap.Options.optFlags, ["uvloop", None, "run on uvloop (needs hl7bridge[uvloop])"]]
    optParameters = [
        *tap.Options.optParameters,
        ["log-level", None, "INFO", f"one of {', '.join(LOG_LEVELS)}"],
        ["log-format", None, "text", "text, or json for one JSON object per line"],
    ]

    def postOptions(self) -> None:  # noqa: N802
        super().postOptions()
        self["log-level"] = self["log-level"].upper()
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")


class SendOptions(usage.Options):
    """Options of ``hl7bridge send``; python-hl7's ``mllp_send`` options work too."""

    synopsis = "[options] HOST [FILE ...]"
    optParameters = [
        ["port", "p", 2575, "port to connect to", tap.number("port", int, "a port number")],
        ["file", "f", None, "read messages from FILE (as mllp_send); more files may follow HOST"],
        ["timeout", "t", 30.0, "seconds to wait for each ACK", tap.number("timeout", float, "a number of seconds")],
        [
            "connect-timeout",
            None,
            10.0,
            "seconds to connect",
            tap.number("connect-timeout", float, "a number of seconds"),
        ],
        [
            "retries",
            None,
            0,
            "reconnect and send again this many times on a failed connection or timeout",
            tap.number("retries", int, "a whole number"),
        ],
        ["encoding", None, "utf-8", "codec of the messages and ACKs"],
        ["cafile", None, None, "CA certificates to verify the listener with (implies --tls)"],
        ["cert", None, None, "client certificate for mutual TLS (implies --tls)"],
        ["key", None, None, "the client certificate's private key"],
    ]
    optFlags = [
        ["tls", None, "connect with TLS, verifying the listener"],
        ["quiet", "q", "do not print the ACKs"],
        ["progress", None, "show progress even when standard error is not a terminal (a line a second)"],
        ["loose", None, "accepted for mllp_send: segments may end with LF or CRLF (always true here)"],
    ]

    opt_version = tap.print_version

    def parseArgs(self, host: str, *files: str) -> None:  # type: ignore[override]  # noqa: N802
        self["host"] = host
        self["files"] = ([self["file"]] if self["file"] else []) + list(files)


class ShadowReportOptions(usage.Options):
    """Options of ``hl7bridge shadow-report``."""

    synopsis = "[options] HOST:PORT[/metrics] or URL"
    optParameters = [
        ["timeout", "t", 10.0, "seconds to wait for the answer", tap.number("timeout", float, "a number of seconds")]
    ]

    opt_version = tap.print_version

    def parseArgs(self, url: str) -> None:  # type: ignore[override]  # noqa: N802
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        # HOST:PORT alone means the page that serve --metrics-endpoint serves.
        self["url"] = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") or "/metrics"))


class OptionsAnywhere(usage.Options):
    """Options that may follow the arguments too (``journal purge URL --older-than 30``), as GNU's getopt allows."""

    def parseOptions(self, options: Sequence[str] | None = None) -> None:  # noqa: N802
        try:
            found, arguments = getopt.gnu_getopt(
                sys.argv[1:] if options is None else list(options), self.shortOpt, self.longOpt
            )
        except getopt.GetoptError as exc:
            raise usage.UsageError(str(exc)) from None
        ordered: list[str] = []
        for name, value in found:
            takes_value = f"{name[2:]}=" in self.longOpt if name.startswith("--") else f"{name[1]}:" in self.shortOpt
            ordered += [name, value] if takes_value else [name]
        super().parseOptions([*ordered, "--", *arguments])


class PendingOptions(OptionsAnywhere):
    """Options of ``hl7bridge journal pending``."""

    synopsis = "[options] URL"
    optFlags = [["json", None, "one JSON object per message and line"]]

    opt_version = tap.print_version

    def parseArgs(self, url: str) -> None:  # type: ignore[override]  # noqa: N802
        self["url"] = url


class PurgeOptions(OptionsAnywhere):
    """Options of ``hl7bridge journal purge``."""

    synopsis = "[options] URL"
    optParameters = [
        [
            "older-than",
            None,
            DEFAULT_RETENTION_DAYS,
            "delete the messages received more than this many days ago",
            tap.number("older-than", float, "a number of days"),
        ]
    ]

    opt_version = tap.print_version

    def parseArgs(self, url: str) -> None:  # type: ignore[override]  # noqa: N802
        self["url"] = url

    def postOptions(self) -> None:  # noqa: N802
        if self["older-than"] <= 0:
            raise usage.UsageError("--older-than must be more than 0 days")


class JournalOptions(usage.Options):
    """``hl7bridge journal pending|purge URL``."""

    synopsis = "[options]"
    subCommands = [
        ["pending", None, PendingOptions, "list the messages received and never answered, oldest first"],
        ["purge", None, PurgeOptions, "delete old messages"],
    ]

    opt_version = tap.print_version

    def postOptions(self) -> None:  # noqa: N802
        if self.subCommand is None:
            raise usage.UsageError("a journal command is needed: pending or purge")


def parse_since(text: str) -> datetime:
    """An ISO 8601 date or time, in UTC: a date alone is its midnight, a time without an offset is UTC.

    Raises:
        ValueError: ``text`` is neither.
    """
    # Before Python 3.11, fromisoformat() does not take the Z that ISO 8601 allows for UTC.
    stripped = text.strip()
    when = datetime.fromisoformat(stripped[:-1] + "+00:00" if stripped[-1:] in ("Z", "z") else stripped)
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


class ReplayOptions(usage.Options):
    """Options of ``hl7bridge replay``."""

    synopsis = "[options] --journal URL"
    optParameters = [
        ["journal", None, None, "URL of the journal to replay (as serve --journal takes it)"],
        ["receiver", "r", tap.DEFAULT_RECEIVER, "dotted path of the receiver or handler to replay the messages to"],
        [
            "app-dir",
            None,
            os.curdir,
            "folder put first on the import path, where --receiver's module is looked for (the current folder)",
        ],
        ["type", None, None, "only messages of this type: ADT for every ADT, ADT^A01 for MSH-9 ADT^A01"],
        ["since", None, None, "only messages received since this ISO 8601 date or time (UTC unless it says)"],
        [
            "timeout",
            "t",
            10.0,
            "seconds to wait for each answer; a message whose recorded answer was none is waited for this long",
            tap.number("timeout", float, "a number of seconds"),
        ],
    ]

    opt_version = tap.print_version

    def postOptions(self) -> None:  # noqa: N802
        if not self["journal"]:
            raise usage.UsageError("--journal URL is needed: the journal to replay")
        if not os.path.isdir(self["app-dir"]):
            raise usage.UsageError(f"--app-dir: no folder {self['app-dir']!r}")
        if self["timeout"] <= 0:
            raise usage.UsageError("--timeout must be more than 0 seconds")
        if self["since"] is not None:
            try:
                self["since"] = parse_since(self["since"])
            except ValueError:
                raise usage.UsageError(
                    f"--since: {self['since']!r} is not an ISO 8601 date or time, such as 2024-01-31 "
                    "or 2024-01-31T08:00:00+01:00"
                ) from None


class CommandOptions(usage.Options):
    synopsis = "hl7bridge"
    subCommands = [
        ["serve", None, ServeOptions, "listen for MLLP and serve a receiver"],
        ["send", None, SendOptions, "send messages from files or stdin, check their ACKs"],
        ["shadow-report", None, ShadowReportOptions, "print the shadow report of a running serve, from its /metrics"],
        ["journal", None, JournalOptions, "list the messages a journal holds unanswered, or purge old ones"],
        ["replay", None, ReplayOptions, "replay a journal's answered messages to a receiver and compare the ACKs"],
    ]

    opt_version = tap.print_version

    def postOptions(self) -> None:  # noqa: N802
        if self.subCommand is None:
            raise usage.UsageError("a command is needed: serve, send, shadow-report, journal or replay")


def _where(port: Any) -> str:
    address = port.getHost()
    return f"{address.host}:{address.port}" if hasattr(address, "port") else str(address)


def serve(options: ServeOptions, message_lines: logs.MessageLines | None = None) -> int:
    """Listen on each ``--endpoint`` until SIGINT or SIGTERM; return the exit status.

    ``tcp:``, ``unix:``, ``ssl:`` and ``mtls:`` endpoints are served by asyncio's
    own servers (:mod:`hl7bridge.listeners`), any other by Twisted's endpoints;
    one engine serves them all. ``message_lines``, if given, writes the line per
    message (see :mod:`hl7bridge.logs`).
    """
    from hl7bridge.reactor import install

    reactor = install(uvloop=options["uvloop"])

    from twisted.internet import endpoints, task
    from twisted.internet.defer import fail
    from twisted.logger import ILogObserver, STDLibLogObserver, globalLogBeginner

    from hl7bridge.defer import to_deferred

    globalLogBeginner.beginLoggingTo([cast(ILogObserver, STDLibLogObserver())], redirectStandardIO=False)
    try:
        factory = tap.build_factory(options)
    except Exception as exc:
        problem = exc if isinstance(exc, LocalError) else tap.describe_failure(exc)
        log.error("cannot use receiver %s: %s", options["receiver"], problem)
        return 2
    if message_lines is not None:
        factory.engine.log_message = message_lines.write
    status = 0
    stoppers: list[Callable[[], object]] = []

    def journal_failed() -> None:
        nonlocal status
        status = 1
        reactor.callWhenRunning(reactor.stop)

    tap.open_journal(factory, journal_failed)

    def stop() -> Any:
        if status == 0:  # else it stops because an endpoint could not listen, as logged
            log.info("stopping: no new connections, answering what is in flight")
        for stop_listening in stoppers:
            stop_listening()
        return tap.drain_and_report(factory, tap.EXIT_GRACE)

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    # Log lines are written in batches (hl7bridge.logs); logging.shutdown writes the last at exit.
    task.LoopingCall(logs.flush).start(logs.FLUSH_INTERVAL, now=False)

    def listening(port: Any) -> None:
        stoppers.append(port.stopListening)
        log.info("serving %s on %s", options["receiver"], _where(port))

    def failed(failure: Any, endpoint: str) -> None:
        nonlocal status
        if status == 0:
            reactor.callWhenRunning(reactor.stop)
        status = 1
        log.error("cannot listen on %s: %s", endpoint, failure.getErrorMessage())

    def listen(endpoint: str, site: Any) -> Any:
        try:
            return endpoints.serverFromString(reactor, endpoint).listen(site)
        except Exception as exc:  # a malformed endpoint string, or a file it names that cannot be read
            return fail(exc)

    def listen_asyncio(endpoint: str, listener: Any) -> Any:
        try:
            listener.bind()
        except (OSError, ValueError) as exc:  # the port is in use, a TLS file is missing or wrong
            return fail(exc)
        stoppers.append(listener.close)
        # Bound and listening: connections wait in the backlog until the loop runs.
        log.info("serving %s on %s", options["receiver"], listener.where)
        return to_deferred(listener.start(), factory.loop)

    for endpoint in options["endpoints"]:
        try:
            listener = tap.listener(endpoint, factory, options)
        except ValueError as exc:
            failed(Failure(exc), endpoint)
            continue
        if listener is None:
            listen(endpoint, factory).addCallbacks(listening, failed, errbackArgs=(endpoint,))
        else:
            listen_asyncio(endpoint, listener).addErrback(failed, endpoint)
    if options["metrics-endpoint"]:
        listen(options["metrics-endpoint"], tap.metrics_site(factory)).addCallbacks(
            lambda port: log.info("metrics on %s", _where(port)), failed, errbackArgs=(options["metrics-endpoint"],)
        )
    reactor.run()
    return status


def _segments(block: bytes) -> list[bytes]:
    return [s for s in block.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r") if s.strip()]


def split_messages(data: bytes) -> list[bytes]:
    """The messages in a file or stdin; segment ends may be CR, LF or CRLF, and leave as CR.

    MLLP-framed input is sent frame by frame, as it is (as ``mllp_send`` does).
    Plain text is split into messages at each MSH; a batch envelope (FHS, BHS,
    BTS, FTS segments) is left out, so the messages of a batch file go one by one.
    """
    if framing.START_BLOCK in data or framing.END_BLOCK in data:
        events = framing.Deframer().feed(data)
        blocks = [_segments(event.data) for event in events if isinstance(event, framing.Frame)]
        return [b"\r".join(block) + b"\r" for block in blocks if block]
    messages: list[list[bytes]] = []
    for segment in _segments(data):
        if segment.startswith(b"MSH"):
            messages.append([segment])
        elif messages and not segment.startswith((b"FHS", b"BHS", b"BTS", b"FTS")):
            messages[-1].append(segment)
    return [b"\r".join(message) + b"\r" for message in messages]


def _tls_context(options: SendOptions) -> ssl.SSLContext | None:
    if not (options["tls"] or options["cafile"] or options["cert"]):
        return None
    context = ssl.create_default_context(cafile=options["cafile"])
    if options["cert"]:
        context.load_cert_chain(options["cert"], options["key"])
    return context


class Progress:
    """``sent n/N`` on standard error while many messages go out.

    On a terminal (when the ACKs are not printed to it as well) the line is
    rewritten after each message; otherwise, with ``--progress``, a whole line
    is written at most once a second, and at the end.
    """

    def __init__(self, total: int, force: bool = False, acks_on_terminal: bool = False) -> None:
        self.total = total
        self.terminal = sys.stderr.isatty() and not acks_on_terminal
        self.on = total > 1 and (self.terminal or force)
        self._last = time.monotonic()
        self._shown = 0

    def update(self, number: int) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if self.terminal:
            print(f"\rsent {number}/{self.total}", end="", file=sys.stderr, flush=True)
        elif number == self.total or now - self._last >= 1:
            print(f"sent {number}/{self.total}", file=sys.stderr, flush=True)
            self._last = now
        self._shown = number

    def finish(self) -> None:
        """End the line being rewritten, at the end or before an error is logged."""
        if self.on and self.terminal and self._shown:
            print(file=sys.stderr, flush=True)
            self._shown = 0


async def send_all(options: SendOptions, messages: list[bytes]) -> int:
    """Send ``messages`` in order; print ACKs, progress and a summary; return the exit status."""
    from hl7bridge.ack import read_ack
    from hl7bridge.client import Sender
    from hl7bridge.errors import AckMismatch, NegativeAck

    counts: Counter[str] = Counter()
    quiet = bool(options["quiet"])
    progress = Progress(len(messages), bool(options["progress"]), acks_on_terminal=not quiet and sys.stdout.isatty())
    sender = Sender(
        options["host"],
        options["port"],
        ssl=_tls_context(options),
        encoding=options["encoding"],
        connect_timeout=options["connect-timeout"],
        ack_timeout=options["timeout"],
        retries=options["retries"],
    )
    async with sender:
        for number, message in enumerate(messages, 1):
            try:
                answer = await sender.send(message)
            except NegativeAck as exc:
                answer = exc.ack
                counts[exc.code or "no MSA-1"] += 1
            except AckMismatch as exc:
                answer = exc.ack
                counts["wrong MSA-2"] += 1
                progress.finish()
                log.error("message %d: %s", number, exc)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                counts["no ACK"] += len(messages) - number + 1
                progress.finish()
                log.error("message %d: %s: %s; %d not sent", number, type(exc).__name__, exc, len(messages) - number)
                break
            else:
                counts[read_ack(answer)[0]] += 1
            if isinstance(answer, str) and not quiet:
                print(answer.replace("\r", "\n"), flush=True)
            progress.update(number)
    progress.finish()
    if len(messages) > 1 or set(counts) - {"AA", "CA"}:
        summary = ", ".join(f"{code} {count}" for code, count in sorted(counts.items()))
        print(f"{len(messages)} messages: {summary}", file=sys.stderr)
    if counts["no ACK"]:
        return 2
    return 0 if set(counts) <= {"AA", "CA"} else 1


def send(options: SendOptions) -> int:
    """``hl7bridge send``: the messages of the files given (stdin without any)."""
    if not options["files"]:
        data = sys.stdin.buffer.read()
    else:
        chunks = []
        for path in options["files"]:
            try:
                with open(path, "rb") as file:
                    chunks.append(file.read())
            except OSError as exc:
                log.error("cannot read %s: %s", path, exc.strerror or exc)
                return 2
        data = b"".join(chunks)
    messages = split_messages(data)
    if not messages:
        log.error("no HL7 message found in the input")
        return 2
    return asyncio.run(send_all(options, messages))


_SHADOW_SAMPLE = re.compile(r"^hl7bridge_shadow_comparisons_total\{(.*)\} (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def read_shadow_report(metrics_text: str) -> ShadowReport | None:
    """The shadow report in the text of a ``/metrics`` page; None if it has no shadow series."""
    if "# TYPE hl7bridge_shadow_comparisons_total counter" not in metrics_text:
        return None
    report = ShadowReport()
    for labels, value in _SHADOW_SAMPLE.findall(metrics_text):
        found = {key: re.sub(r"\\.", lambda m: _UNESCAPE[m.group()], text) for key, text in _LABEL.findall(labels)}
        report.record(found["message_type"], found["outcome"], int(float(value)))
    return report


def shadow_report(options: ShadowReportOptions) -> int:
    """``hl7bridge shadow-report URL``: the table of agreed, differed and failed per message type."""
    try:
        with urllib.request.urlopen(options["url"], timeout=options["timeout"]) as response:
            text = response.read().decode("utf-8")
    except (OSError, ValueError) as exc:
        log.error("cannot read %s: %s", options["url"], exc)
        return 2
    report = read_shadow_report(text)
    if report is None:
        log.error("%s has no shadow report: is the listener serving a Router with --metrics-endpoint?", options["url"])
        return 1
    print(report.format())
    return 0


def existing_journal(url: str) -> Journal:
    """The journal at ``url``, to read: a SQLite file must exist (it is not made empty for a typo).

    Raises:
        JournalError: the URL names no journal hl7bridge can keep, or no such file.
    """
    journal = Journal(url)
    from hl7bridge.journal.sqlite import SQLiteBackend

    if isinstance(journal.backend, SQLiteBackend) and not os.path.isfile(journal.backend.path):
        raise JournalError(f"no journal file {os.path.abspath(journal.backend.path)}")
    return journal


def _cannot_use(url: str, exc: Exception) -> int:
    """Log why the journal at ``url`` cannot be read (one line); the exit status, 2."""
    # Connection and schema errors name no message content: shown as they are.
    problem = str(exc) if isinstance(exc, JournalError) else f"{type(exc).__name__}: {exc}"
    log.error("cannot use the journal %s: %s", redact(url), problem)
    return 2


#: The headings of ``journal pending``'s columns, for the fields of :func:`pending_fields`.
PENDING_HEADINGS = (
    "received (UTC)",
    "listener",
    "peer",
    "type",
    "control id",
    "application",
    "facility",
    "attempts",
    "node",
)


def pending_fields(message: Message) -> dict[str, Any]:
    """What ``journal pending`` shows of a message: where and when it came, its MSH identity, no content."""
    return {
        "received": message.received.astimezone(timezone.utc).isoformat(timespec="milliseconds"),
        "listener": message.listener,
        "peer": message.peer,
        "message_type": message.message_type,
        "control_id": message.control_id,
        "sending_application": message.sender,
        "sending_facility": message.facility,
        "attempts": message.attempts,
        "node": message.node,
    }


async def pending(options: PendingOptions) -> int:
    """``hl7bridge journal pending URL``: a line per message received and never answered, then their count.

    With ``--json``, a JSON object per line and the count on standard error.
    """
    try:
        journal = existing_journal(options["url"])
        try:
            messages = await journal.pending()
        finally:
            await journal.close()
    except Exception as exc:
        return _cannot_use(options["url"], exc)
    count = f"{len(messages)} message{'' if len(messages) == 1 else 's'} received and never answered"
    found = [pending_fields(message) for message in messages]
    if options["json"]:
        for fields in found:
            print(json.dumps(fields, ensure_ascii=False))
        print(count, file=sys.stderr)
        return 0
    if found:
        rows = [tuple("" if value is None else str(value) for value in fields.values()) for fields in found]
        print(text_table([PENDING_HEADINGS, *rows]))
    print(count)
    return 0


async def purge(options: PurgeOptions) -> int:
    """``hl7bridge journal purge URL``: delete the messages older than ``--older-than`` days; print how many."""
    days = options["older-than"]
    try:
        journal = existing_journal(options["url"])
        try:
            purged = await journal.purge(timedelta(days=days))
        finally:
            await journal.close()
    except Exception as exc:
        return _cannot_use(options["url"], exc)
    print(f"{purged} message{'' if purged == 1 else 's'} received more than {days:g} days ago purged")
    return 0


def replay(options: ReplayOptions) -> int:
    """``hl7bridge replay``: the journal's answered messages, oldest first, through a receiver again.

    The receiver is served by an in-process listener on 127.0.0.1 (one that
    keeps no journal), on Twisted's asyncio reactor, and each message is sent
    to it as it was received: it takes the path a live message takes. Each
    ACK is compared with the recorded one (MSH-7 and MSH-10 aside). Exits 0
    when all agree, 1 when any differs or fails, 2 when the journal or the
    receiver cannot be used.
    """
    try:
        journal = existing_journal(options["journal"])
    except JournalError as exc:
        return _cannot_use(options["journal"], exc)
    from hl7bridge.reactor import event_loop, install

    reactor = install()
    from hl7bridge.defer import to_deferred
    from hl7bridge.handlers import as_receiver

    # After the reactor is installed: receiver modules written for txHL7 often import it.
    tap.use_app_dir(options["app-dir"])
    try:
        receiver = as_receiver(tap.load_receiver(options["receiver"]))
    except LocalError as exc:
        log.error("cannot use receiver %s: %s", options["receiver"], exc)
        return 2
    outcome: list[int] = []

    def finished(result: object) -> None:
        if isinstance(result, Failure):
            # Where it failed, not what the exception says: it may quote a message.
            log.error("replay failed: %s", failures.summary(result))
            result = 2
        outcome.append(cast(int, result))
        reactor.stop()

    def start() -> None:
        to_deferred(replay_journal(journal, receiver, options), event_loop()).addBoth(finished)

    # Run by the reactor, so that its thread pool (deferToThread) serves the receiver.
    reactor.callWhenRunning(start)
    reactor.run()
    return outcome[0] if outcome else 1


async def replay_journal(journal: Journal, receiver: Any, options: ReplayOptions) -> int:
    """Send each answered message of ``journal`` to ``receiver`` over a listener of its own; the exit status."""
    import hl7bridge
    from hl7bridge.client import Sender
    from hl7bridge.server import shutdown

    server = await hl7bridge.serve(receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    report = ShadowReport()
    # latin-1 reads every byte as one character: an ACK is compared byte for byte with the one recorded.
    sender = Sender("127.0.0.1", port, encoding="latin-1", ack_timeout=options["timeout"])
    try:
        async for message in journal.answered(options["type"], options["since"]):
            outcome, differences = await replay_message(sender, message)
            report.record(message.message_type, outcome)
            if outcome != AGREED:
                print(f"control id {message.control_id} ({message.message_type}) {outcome}: {differences}", flush=True)
    except Exception as exc:
        return _cannot_use(journal.url, exc)
    finally:
        await sender.close()
        await shutdown(server)
        await journal.close()
    if not report.counts:
        print("no answered message in the journal matches")
        return 0
    print(report.format())
    return 0 if all(counts[DIFFERED] + counts[FAILED] == 0 for counts in report.counts.values()) else 1


async def replay_message(sender: Any, message: Message) -> tuple[str, str]:
    """Send one journaled message as it was received; the outcome, and what differs or why it failed."""
    from hl7bridge.errors import AckMismatch, AckTimeout, ConnectTimeout, NegativeAck

    recorded = None if message.ack is None else message.ack.decode("latin-1")
    answer: str | None
    try:
        answer = await sender.send(message.raw)
    except (NegativeAck, AckMismatch) as exc:
        answer = exc.ack  # an answer all the same, to compare
    except AckTimeout:
        if recorded is not None:
            return FAILED, f"no answer within {sender.ack_timeout:g}s"
        answer = None  # no answer, as recorded
    except (OSError, asyncio.IncompleteReadError, ConnectTimeout) as exc:
        return FAILED, type(exc).__name__
    differences = compare_acks(recorded, answer)
    return (DIFFERED, ", ".join(differences)) if differences else (AGREED, "")


def main(argv: Sequence[str] | None = None) -> int:
    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else list(argv))
    except usage.UsageError as exc:
        command: usage.Options = options
        while getattr(command, "subOptions", None) is not None:  # the (sub)command whose options were wrong
            command = command.subOptions
        print(f"{command}\nhl7bridge: {exc}", file=sys.stderr)
        return 2
    serving = options.subCommand == "serve"
    message_lines = logs.configure(
        options.subOptions["log-level"] if serving else "WARNING",
        json_format=serving and options.subOptions["log-format"] == "json",
    )
    if options.subCommand == "send":
        return send(options.subOptions)
    if options.subCommand == "shadow-report":
        return shadow_report(options.subOptions)
    if options.subCommand == "journal":
        journal_command = options.subOptions
        if journal_command.subCommand == "pending":
            return asyncio.run(pending(journal_command.subOptions))
        return asyncio.run(purge(journal_command.subOptions))
    if options.subCommand == "replay":
        return replay(options.subOptions)
    return serve(options.subOptions, message_lines)


if __name__ == "__main__":
    sys.exit(main())
