"""The ``hl7bridge`` command: ``serve`` runs a receiver on Twisted endpoints, ``send`` sends.

``hl7bridge send [-p PORT] HOST [FILE ...]`` sends the messages of the files
(or stdin), prints their ACKs, shows progress and ends with a count per ACK
code, and exits 1 if any was negative, 2 if some got no ACK; it takes
python-hl7's ``mllp_send`` options too.

``hl7bridge serve --endpoint tcp:2575 --receiver package.module.Class`` takes the
options of ``twistd hl7bridge`` (see :mod:`hl7bridge.tap`) plus ``--uvloop``,
``--log-level`` and ``--log-format``, installs Twisted's asyncio reactor, listens, and on SIGINT or
SIGTERM stops listening, answers the messages in flight and exits.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.python import usage
from twisted.python.failure import Failure

from hl7bridge import framing, logs, tap
from hl7bridge.errors import LocalError
from hl7bridge.migration.shadow import ShadowReport

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


class CommandOptions(usage.Options):
    synopsis = "hl7bridge"
    subCommands = [
        ["serve", None, ServeOptions, "listen for MLLP and serve a receiver"],
        ["send", None, SendOptions, "send messages from files or stdin, check their ACKs"],
        ["shadow-report", None, ShadowReportOptions, "print the shadow report of a running serve, from its /metrics"],
    ]

    opt_version = tap.print_version

    def postOptions(self) -> None:  # noqa: N802
        if self.subCommand is None:
            raise usage.UsageError("a command is needed: serve, send or shadow-report")


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


def main(argv: Sequence[str] | None = None) -> int:
    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else list(argv))
    except usage.UsageError as exc:
        print(f"{getattr(options, 'subOptions', None) or options}\nhl7bridge: {exc}", file=sys.stderr)
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
    return serve(options.subOptions, message_lines)


if __name__ == "__main__":
    sys.exit(main())
