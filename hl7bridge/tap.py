"""``twistd hl7bridge``: the options and service behind the twistd plugin.

Takes txHL7's ``twistd mllp`` options (``--endpoint``, ``--receiver``) and the
limits of ``hl7bridge serve``. ``--endpoint`` may be given several times: one
receiver, one engine, several listeners. twistd must run the asyncio reactor:
``twistd -n --reactor asyncio hl7bridge ...``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any, NoReturn, cast

from twisted.application import service, strports
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import FileLogObserver, ILogObserver, Logger, LogLevel, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from hl7bridge import listeners
from hl7bridge.defer import to_deferred
from hl7bridge.errors import LocalError, ReceiverNotLoaded, WrongReactor
from hl7bridge.journal import redact
from hl7bridge.listeners import DEFAULT_TLS_HANDSHAKE_TIMEOUT
from hl7bridge.metrics import Metrics, prometheus_text
from hl7bridge.migration.router import Router
from hl7bridge.migration.shadow import ShadowReport
from hl7bridge.mllp import MLLPFactory
from hl7bridge.reactor import event_loop
from hl7bridge.session import Settings

DEFAULT_RECEIVER = "hl7bridge.receiver.LoggingReceiver"
DEFAULT_ENDPOINT = "tcp:2575"

log = logging.getLogger("hl7bridge.tap")
migration_log = logging.getLogger("hl7bridge.migration")


def describe_failure(exc: BaseException) -> str:
    """What was raised, and where in the code that raised it: one line for a log or a usage error."""
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    # The innermost frame that is neither this module's nor the import machinery's.
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename != __file__ and not frame.filename.startswith("<frozen importlib")
    ]
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _import(module: str) -> Any:
    """``module`` imported, or None if it does not exist (as opposed to failing as it imports)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # exc.name is the module that is missing: this one or a package it is in (try a shorter
        # path then), or a module that this one imports (its own error, to report).
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise ReceiverNotLoaded(f"importing {module} failed: {describe_failure(exc)}") from exc
    except Exception as exc:
        raise ReceiverNotLoaded(f"importing {module} failed: {describe_failure(exc)}") from exc


def load_receiver(path: str) -> Any:
    """The receiver named by a dotted path: a class is instantiated with no arguments.

    The longest leading part of ``path`` that is a module is imported, and the
    rest is looked up in it as attributes.

    Raises:
        ReceiverNotLoaded: ``path`` names no module or object, or importing the
            module or instantiating the class raised; the message names the
            missing module or attribute, or the error raised and its file and line.
    """
    parts = path.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise ReceiverNotLoaded(f"{path!r} is not a dotted path such as package.module.Receiver")
    for split in range(len(parts) - 1, 0, -1):
        target = _import(".".join(parts[:split]))
        if target is not None:
            break
    else:
        start = os.path.abspath(sys.path[0] or os.curdir)
        raise ReceiverNotLoaded(f"No module named {parts[0]!r} (the import path starts with {start})")
    for number in range(split, len(parts)):
        if not hasattr(target, parts[number]):
            if number == split and number + 1 < len(parts):
                raise ReceiverNotLoaded(f"No module named {'.'.join(parts[: number + 1])!r}")
            known = ".".join(parts[:number])
            raise ReceiverNotLoaded(
                f"{'module ' if number == split else ''}{known!r} has no attribute {parts[number]!r}"
            )
        target = getattr(target, parts[number])
    if not isinstance(target, type):
        return target
    try:
        return target()
    except Exception as exc:
        raise ReceiverNotLoaded(f"creating {path}() failed: {describe_failure(exc)}") from exc


def use_app_dir(folder: str) -> None:
    """Put ``folder`` first on the import path (once), where ``--receiver``'s module is looked for."""
    folder = os.path.abspath(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def number(option: str, kind: Callable[[str], Any], what: str, none: bool = False) -> Callable[[str], Any]:
    """A ``usage.Options`` coercer for ``--option``; ``none`` lets ``none`` stand for None.

    Its error names the option as typed (``--idle-timeout: 'abc' is not a number
    of seconds (or none)``): Twisted's own would show Python's ``could not convert
    string to float``, without the option.
    """

    def coerce(text: str) -> Any:
        if none and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise usage.UsageError(f"--{option}: {text!r} is not {what}{' (or none)' if none else ''}") from None

    return coerce


def print_version(options: usage.Options) -> None:
    """Print hl7bridge's version and exit"""
    from hl7bridge import __version__

    print(f"hl7bridge {__version__}")
    sys.exit(0)


def _setting(option: str, help: str, kind: Callable[[str], Any], what: str, none: bool = False) -> list[Any]:
    """The ``optParameters`` row of the listener setting ``option`` names, with the setting's default."""
    default = getattr(Settings(), option.replace("-", "_"))
    return [option, None, default, help + (" (or none)" if none else ""), number(option, kind, what, none)]


class Options(usage.Options):
    """The options of ``twistd hl7bridge`` and ``hl7bridge serve``."""

    synopsis = "[options]"

    optParameters = [
        ["receiver", "r", DEFAULT_RECEIVER, "dotted path of an IHL7Receiver class or instance"],
        [
            "app-dir",
            None,
            os.curdir,
            "folder put first on the import path, where --receiver's module is looked for: the current folder "
            "by default, as with python -m, uvicorn and gunicorn",
        ],
        ["framing", None, Settings().framing, "lenient or strict"],
        _setting("max-message-size", "largest message in bytes", int, "a number of bytes"),
        _setting("max-connections", "connections at once", int, "a whole number", none=True),
        _setting(
            "max-connections-per-peer",
            "connections at once from one address; no limit by default",
            int,
            "a whole number",
            none=True,
        ),
        _setting("max-in-flight", "messages handled at once per connection", int, "a whole number"),
        _setting(
            "idle-timeout",
            "seconds without a byte before a connection is closed; the receiver's getTimeout() wins "
            "when it gives a number",
            float,
            "a number of seconds",
            none=True,
        ),
        _setting("frame-timeout", "seconds a message may take to arrive", float, "a number of seconds", none=True),
        _setting("handler-timeout", "seconds a handler may take before AE", float, "a number of seconds", none=True),
        _setting("drain-timeout", "seconds to answer what is in flight on stop", float, "a number of seconds"),
    ]
    optParameters += [
        [
            "tls-handshake-timeout",
            None,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            "seconds a client of an ssl: or mtls: endpoint has to finish its TLS handshake",
            number("tls-handshake-timeout", float, "a number of seconds"),
        ],
        ["metrics-endpoint", None, None, "serve Prometheus metrics at /metrics on this endpoint"],
        [
            "journal",
            None,
            None,
            "keep a message journal: ACK after commit, retransmissions answered once "
            "(sqlite:///file.db, sqlite:////abs/file.db or postgresql://user@host:port/db)",
        ],
        ["journal-key", None, Settings().journal_key, "the MSH fields that identify a message in the journal"],
        _setting("journal-retention", "days a journaled message is kept", float, "a number of days"),
    ]
    optFlags = [
        ["follow-msh18", None, "decode in the charset MSH-18 declares when the receiver names none"],
        ["metrics", None, "count and time messages per type and ACK code"],
        ["log-content", None, "also log each message and its ACK in full (patient data: off by default)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["endpoints"] = []

    opt_version = print_version

    def opt_endpoint(self, description: str) -> None:
        """Twisted server endpoint string to listen on; repeat it to listen on several [default: tcp:2575]"""
        self["endpoints"].append(description)

    opt_e = opt_endpoint

    def settings(self) -> dict[str, Any]:
        """The listener settings given, as keyword arguments."""
        return {field.name: self[field.name.replace("_", "-")] for field in fields(Settings)}

    def postOptions(self) -> None:  # noqa: N802
        self["endpoints"] = self["endpoints"] or [DEFAULT_ENDPOINT]
        if not os.path.isdir(self["app-dir"]):
            raise usage.UsageError(f"--app-dir: no folder {self['app-dir']!r}")
        self["follow-msh18"] = bool(self["follow-msh18"])
        self["log-content"] = bool(self["log-content"])
        self["metrics"] = bool(self["metrics"] or self["metrics-endpoint"])
        if self["tls-handshake-timeout"] <= 0:
            raise usage.UsageError("--tls-handshake-timeout must be more than 0 seconds")
        try:
            Settings(**self.settings())
        except ValueError as exc:
            # Settings names its fields (max_connections must be ...): here they are options.
            field, _, rest = str(exc).partition(" ")
            if field not in {setting.name for setting in fields(Settings)}:
                raise usage.UsageError(str(exc)) from exc
            raise usage.UsageError(f"--{field.replace('_', '-')} {rest.replace('None', 'none')}") from exc


#: Attributes every ``logging.LogRecord`` has; any other attribute was given as ``extra``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured values a record carries (``extra=``), such as those of ``hl7bridge.messages``."""
    return {key: value for key, value in vars(record).items() if key not in _RECORD_ATTRIBUTES}


def json_line(when: float, level: str, logger: str, text: str, fields: dict[str, Any], error: str | None) -> str:
    """One log entry as a line of JSON: time (UTC, ISO 8601), level, logger, message, then the fields."""
    stamp = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
    entry = {"time": stamp, "level": level, "logger": logger, "message": text, **fields}
    if error:
        entry["error"] = error
    return json.dumps(entry, default=str, ensure_ascii=False)


class JSONFormatter(logging.Formatter):
    """Python logging records as lines of JSON (``hl7bridge serve --log-format json``)."""

    #: An entry from its parts, with no record (:class:`hl7bridge.logs.MessageLines`).
    line = staticmethod(json_line)
    shows_fields = True

    def format(self, record: logging.LogRecord) -> str:
        error = self.formatException(record.exc_info) if record.exc_info else None
        return json_line(
            record.created, record.levelname, record.name, record.getMessage(), record_fields(record), error
        )


def json_log_observer() -> ILogObserver:
    """Twisted's log as lines of JSON on standard output: ``twistd --logger hl7bridge.tap.json_log_observer``."""
    levels = {
        LogLevel.debug: "DEBUG",
        LogLevel.info: "INFO",
        LogLevel.warn: "WARNING",
        LogLevel.error: "ERROR",
        LogLevel.critical: "CRITICAL",
    }

    def line(event: dict[str, Any]) -> str:
        failure = event.get("log_failure")
        return (
            json_line(
                event["log_time"],
                levels.get(event.get("log_level"), "INFO"),
                event.get("log_namespace", "-"),
                formatEvent(event),
                event.get("hl7bridge_fields", {}),
                failure.getTraceback() if failure is not None else None,
            )
            + "\n"
        )

    return cast(ILogObserver, FileLogObserver(sys.stdout, line))


class TwistedLogHandler(logging.Handler):
    """Python logging records, emitted into Twisted's log (what twistd writes)."""

    LEVELS = {
        logging.DEBUG: LogLevel.debug,
        logging.INFO: LogLevel.info,
        logging.WARNING: LogLevel.warn,
        logging.ERROR: LogLevel.error,
        logging.CRITICAL: LogLevel.critical,
    }

    def emit(self, record: logging.LogRecord) -> None:
        level = self.LEVELS.get(record.levelno, LogLevel.info)
        Logger(namespace=record.name).emit(
            level, "{text}", text=self.format(record), hl7bridge_fields=record_fields(record)
        )


def log_to_twisted(level: int = logging.INFO) -> None:
    """Send hl7bridge's log records to Twisted's log, once."""
    logger = logging.getLogger("hl7bridge")
    if not any(isinstance(handler, TwistedLogHandler) for handler in logger.handlers):
        logger.addHandler(TwistedLogHandler())
        logger.setLevel(level)
        logger.propagate = False


#: Seconds ``hl7bridge serve`` and ``twistd hl7bridge`` give handler jobs still
#: in Twisted's thread pool after the drain, before the process exits regardless.
EXIT_GRACE = 1.0


class DrainingService(service.MultiService):
    """Stops listening first, then drains the connections of its factory and logs its shadow report.

    Args:
        factory: the listener's factory.
        exit_grace: if set, handler jobs still running in Twisted's thread pool
            after the drain are abandoned: they are logged, and the process
            exits this many seconds later whatever they do (Python cannot stop
            a thread, and the reactor would wait for them). None: wait for them.
    """

    def __init__(self, factory: MLLPFactory, exit_grace: float | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.exit_grace = exit_grace

    def startService(self) -> None:  # noqa: N802
        super().startService()
        open_journal(self.factory, _stop_reactor)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        stopped: Deferred[Any] = super().stopService()
        return stopped.addCallback(lambda _: drain_and_report(self.factory, self.exit_grace))


def _stop_reactor() -> None:
    from twisted.internet import reactor

    cast(Any, reactor).stop()


def open_journal(factory: MLLPFactory, failed: Callable[[], object]) -> None:
    """Open the factory's journal now, if it has one, rather than at the first message.

    If it cannot be opened, one line says why and ``failed`` is called (it
    stops the process). Messages that arrive meanwhile wait for it.
    """
    journal = factory.engine.journal
    if journal is None:
        return

    def cannot(failure: Failure) -> None:
        # Connection and schema errors name no message content: shown as they are.
        log.error("cannot open the journal %s: %s: %s", redact(journal.url), failure.type.__name__, failure.value)
        failed()

    to_deferred(factory.engine.open(), factory.loop).addErrback(cannot)


def drain_and_report(factory: MLLPFactory, exit_grace: float | None = None) -> Deferred[None]:
    """Drain ``factory``'s connections, then log its shadow report if it serves a Router.

    The report (of a :class:`~hl7bridge.migration.Router` only) waits for the
    comparisons still running (each is bounded by the router's ``shadow_timeout``),
    then logs one line per message type, with counts only. With ``exit_grace``,
    see :class:`DrainingService`.
    """
    drained: Deferred[Any] = factory.drain()
    if exit_grace is not None:
        drained.addCallback(lambda _: abandon_thread_work(exit_grace))
    router = factory.engine.receiver
    if not isinstance(router, Router):
        return drained

    def report(_: object) -> None:
        for kind, counts in router.report.as_dict().items():
            text = ", ".join(f"{outcome} {n}" for outcome, n in counts.items())
            migration_log.info("shadow report %s: %s", kind, text, extra={"message_type": kind, **counts})

    drained.addCallback(lambda _: to_deferred(router.wait_for_shadows(), event_loop()))
    return drained.addCallback(report)


def abandon_thread_work(grace: float) -> None:
    """Let no handler job left in Twisted's thread pool hold up the exit for more than ``grace`` seconds.

    The reactor joins its pool's threads when it stops, so a handler blocked in
    a thread (a slow query, ``time.sleep``) would keep the process alive, and
    queued jobs would still start. The jobs are counted in a log line, and the
    process ends ``grace`` seconds later if it has not ended by then.
    """
    from twisted.internet import reactor

    pool = getattr(reactor, "threadpool", None)
    running, queued = (len(pool.working), pool.q.qsize()) if pool is not None else (0, 0)
    if not (running or queued):
        return
    log.warning(
        "stopping: %d handler jobs still running in Twisted's thread pool and %d not started are abandoned; "
        "exiting in %ss whatever they do",
        running,
        queued,
        grace,
    )
    timer = threading.Timer(grace, _exit_now)
    timer.daemon = True
    timer.start()


def _exit_now() -> None:
    # The main thread is waiting for the pool's threads, which may never end.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


class MetricsResource(Resource):
    """``GET /metrics``: metrics in Prometheus's text format, from each source's ``families()``."""

    isLeaf = True

    def __init__(self, *sources: Metrics | ShadowReport) -> None:
        super().__init__()
        self.sources = sources

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"see /metrics\n"
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return prometheus_text(family for source in self.sources for family in source.families()).encode()


def metrics_site(factory: MLLPFactory) -> Site:
    """A web site serving ``factory``'s metrics (its ``metrics`` setting must be on), and the
    shadow report when it serves a :class:`~hl7bridge.migration.Router`."""
    assert factory.engine.metrics is not None
    router = factory.engine.receiver
    reports = [router.report] if isinstance(router, Router) else []
    return Site(MetricsResource(factory.engine.metrics, *reports))


def build_factory(options: Options) -> MLLPFactory:
    """The factory for the receiver and settings given, the receiver looked for in
    ``--app-dir`` first (after the reactor is installed: receiver modules written for
    txHL7 often import ``twisted.internet.reactor``)."""
    use_app_dir(options["app-dir"])
    return MLLPFactory(load_receiver(options["receiver"]), **options.settings())


def listener(endpoint: str, factory: MLLPFactory, options: Options) -> listeners.Listener | None:
    """The asyncio listener of ``endpoint`` for ``factory``'s engine; None if Twisted's endpoints serve it.

    ``tcp:``, ``unix:``, ``ssl:`` and ``mtls:`` strings are served by asyncio's
    own servers (:mod:`hl7bridge.listeners`), any other by Twisted's endpoints
    with ``factory``. Both end in the same engine.

    Raises:
        ValueError: a malformed ``tcp:``, ``unix:``, ``ssl:`` or ``mtls:`` string.
    """
    return listeners.listener_for(endpoint, factory.engine, factory.loop, options["tls-handshake-timeout"])


class ListeningService(service.Service):
    """One ``--endpoint`` of ``twistd hl7bridge``, served by a :class:`~hl7bridge.listeners.Listener`.

    It binds in ``privilegedStartService`` (before twistd gives up root, for
    a port below 1024) and starts accepting in ``startService``. It stops
    accepting in ``stopService``; draining is :class:`DrainingService`'s.
    """

    def __init__(self, endpoint: str, listener: listeners.Listener, receiver: str) -> None:
        self.endpoint = endpoint
        self.listener = listener
        self.receiver = receiver
        self._bound = False

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        if self._bound:
            return
        try:
            self.listener.bind()
        except (OSError, ValueError) as exc:
            _refuse(f"cannot listen on {self.endpoint}: {exc}", status=1)
        self._bound = True

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._bind()
        to_deferred(self.listener.start(), self.listener.loop).addErrback(
            lambda failure: log.error("cannot listen on %s: %s", self.endpoint, failure.getErrorMessage())
        )
        log.info("serving %s on %s", self.receiver, self.listener.where)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self.listener.close()


def _refuse(text: str, status: int = 2) -> NoReturn:
    """End twistd with ``text`` on standard error and ``status`` (2: a usage error), without a traceback."""
    print(f"twistd hl7bridge: {text}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def makeService(options: Options) -> service.IService:  # noqa: N802
    """The listening service for ``twistd hl7bridge``."""
    try:
        event_loop()
    except WrongReactor as exc:
        _refuse(
            "hl7bridge needs Twisted's asyncio reactor. Add --reactor asyncio: "
            f"twistd -n --reactor asyncio hl7bridge ... ({exc})"
        )
    log_to_twisted()
    try:
        factory = build_factory(options)
    except LocalError as exc:
        _refuse(f"cannot use receiver {options['receiver']}: {exc}")
    top = DrainingService(factory, EXIT_GRACE)
    for endpoint in options["endpoints"]:
        try:
            found = listener(endpoint, factory, options)
        except ValueError as exc:
            _refuse(f"cannot listen on {endpoint}: {exc}", status=1)
        if found is None:
            strports.service(endpoint, cast(IProtocolFactory, factory)).setServiceParent(top)
        else:
            ListeningService(endpoint, found, options["receiver"]).setServiceParent(top)
    if options["metrics-endpoint"]:
        site = cast(IProtocolFactory, metrics_site(factory))
        strports.service(options["metrics-endpoint"], site).setServiceParent(top)
    return cast(service.IService, top)
