"""``twistd hl7bridge``: the options and service behind the twistd plugin.

Takes txHL7's ``twistd mllp`` options (``--endpoint``, ``--receiver``) and the
limits of ``hl7bridge serve``. ``--endpoint`` may be given several times: one
receiver, one engine, several listeners. twistd must run the asyncio reactor:
``twistd -n --reactor asyncio hl7bridge ...``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any, cast

from twisted.application import service, strports
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import FileLogObserver, ILogObserver, Logger, LogLevel, formatEvent
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from hl7bridge.defer import to_deferred
from hl7bridge.errors import WrongReactor
from hl7bridge.metrics import Metrics, prometheus_text
from hl7bridge.migration.router import Router
from hl7bridge.migration.shadow import ShadowReport
from hl7bridge.mllp import MLLPFactory
from hl7bridge.reactor import event_loop
from hl7bridge.session import Settings

DEFAULT_RECEIVER = "hl7bridge.receiver.LoggingReceiver"
DEFAULT_ENDPOINT = "tcp:2575"

migration_log = logging.getLogger("hl7bridge.migration")


def load_receiver(path: str) -> Any:
    """The receiver named by a dotted path: a class is instantiated with no arguments."""
    from twisted.python.reflect import namedAny

    target = namedAny(path)
    return target() if isinstance(target, type) else target


def _optional(kind: type) -> Any:
    return lambda text: None if text.lower() == "none" else kind(text)


class Options(usage.Options):
    """The options of ``twistd hl7bridge`` and ``hl7bridge serve``."""

    synopsis = "[options]"

    _defaults = Settings()
    optParameters = [
        ["receiver", "r", DEFAULT_RECEIVER, "dotted path of an IHL7Receiver class or instance"],
        ["framing", None, _defaults.framing, "lenient or strict"],
        ["max-message-size", None, _defaults.max_message_size, "largest message in bytes", int],
        ["max-connections", None, _defaults.max_connections, "connections at once (or none)", _optional(int)],
        ["max-connections-per-peer", None, _defaults.max_connections_per_peer, "per address (or none)", _optional(int)],
        ["max-in-flight", None, _defaults.max_in_flight, "messages handled at once per connection", int],
        ["idle-timeout", None, _defaults.idle_timeout, "seconds (or none)", _optional(float)],
        ["frame-timeout", None, _defaults.frame_timeout, "seconds (or none)", _optional(float)],
        ["handler-timeout", None, _defaults.handler_timeout, "seconds (or none)", _optional(float)],
        ["drain-timeout", None, _defaults.drain_timeout, "seconds", float],
    ]
    optParameters += [["metrics-endpoint", None, None, "serve Prometheus metrics at /metrics on this endpoint"]]
    optFlags = [
        ["follow-msh18", None, "decode in the charset MSH-18 declares when the receiver names none"],
        ["metrics", None, "count and time messages per type and ACK code"],
        ["log-content", None, "also log each message and its ACK in full (patient data: off by default)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["endpoints"] = []

    def opt_endpoint(self, description: str) -> None:
        """Twisted server endpoint string to listen on; repeat it to listen on several [default: tcp:2575]"""
        self["endpoints"].append(description)

    opt_e = opt_endpoint

    def settings(self) -> dict[str, Any]:
        """The listener settings given, as keyword arguments."""
        return {field.name: self[field.name.replace("_", "-")] for field in fields(Settings)}

    def postOptions(self) -> None:  # noqa: N802
        self["endpoints"] = self["endpoints"] or [DEFAULT_ENDPOINT]
        self["follow-msh18"] = bool(self["follow-msh18"])
        self["log-content"] = bool(self["log-content"])
        self["metrics"] = bool(self["metrics"] or self["metrics-endpoint"])
        try:
            Settings(**self.settings())
        except ValueError as exc:
            raise usage.UsageError(str(exc)) from exc


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


class DrainingService(service.MultiService):
    """Stops listening first, then drains the connections of its factory and logs its shadow report."""

    def __init__(self, factory: MLLPFactory) -> None:
        super().__init__()
        self.factory = factory

    def stopService(self) -> Deferred[None]:  # noqa: N802
        stopped: Deferred[Any] = super().stopService()
        return stopped.addCallback(lambda _: drain_and_report(self.factory))


def drain_and_report(factory: MLLPFactory) -> Deferred[None]:
    """Drain ``factory``'s connections, then log its shadow report if it serves a Router.

    The report (of a :class:`~hl7bridge.migration.Router` only) waits for the
    comparisons still running (each is bounded by the router's ``shadow_timeout``),
    then logs one line per message type, with counts only.
    """
    drained: Deferred[Any] = factory.drain()
    router = factory.engine.receiver
    if not isinstance(router, Router):
        return drained

    def report(_: object) -> None:
        for kind, counts in router.report.as_dict().items():
            text = ", ".join(f"{outcome} {n}" for outcome, n in counts.items())
            migration_log.info("shadow report %s: %s", kind, text, extra={"message_type": kind, **counts})

    drained.addCallback(lambda _: to_deferred(router.wait_for_shadows(), event_loop()))
    return drained.addCallback(report)


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
    """The factory for the receiver and settings given (after the reactor is installed:
    receiver modules written for txHL7 often import ``twisted.internet.reactor``)."""
    return MLLPFactory(load_receiver(options["receiver"]), **options.settings())


def makeService(options: Options) -> service.IService:  # noqa: N802
    """The listening service for ``twistd hl7bridge``."""
    try:
        event_loop()
    except WrongReactor as exc:
        raise usage.UsageError(
            "hl7bridge needs Twisted's asyncio reactor. Add --reactor asyncio: "
            f"twistd -n --reactor asyncio hl7bridge ... ({exc})"
        ) from exc
    log_to_twisted()
    factory = build_factory(options)
    top = DrainingService(factory)
    for endpoint in options["endpoints"]:
        strports.service(endpoint, cast(IProtocolFactory, factory)).setServiceParent(top)
    if options["metrics-endpoint"]:
        site = cast(IProtocolFactory, metrics_site(factory))
        strports.service(options["metrics-endpoint"], site).setServiceParent(top)
    return cast(service.IService, top)
