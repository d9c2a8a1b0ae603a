"""``hl7bridge serve``: run a receiver on Twisted endpoints under the asyncio reactor."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, cast

from hl7bridge import framing
from hl7bridge.session import Settings

DEFAULT_RECEIVER = "hl7bridge.receiver.LoggingReceiver"
DEFAULT_ENDPOINT = "tcp:2575"

log = logging.getLogger("hl7bridge.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hl7bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="listen for MLLP and serve a receiver")
    serve.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        help=f"Twisted server endpoint string (default {DEFAULT_ENDPOINT}, e.g. tcp:2575:interface=127.0.0.1)",
    )
    serve.add_argument(
        "--receiver",
        default=DEFAULT_RECEIVER,
        help=f"dotted path of an IHL7Receiver class or instance (default {DEFAULT_RECEIVER})",
    )
    defaults = Settings()
    limits = serve.add_argument_group("framing, limits and timeouts (see hl7bridge.Settings)")
    limits.add_argument("--framing", choices=framing.FRAMING_MODES, default=defaults.framing)
    limits.add_argument("--max-message-size", type=int, default=defaults.max_message_size, metavar="BYTES")
    limits.add_argument("--max-connections", type=_limit, default=defaults.max_connections, metavar="N|none")
    limits.add_argument(
        "--max-connections-per-peer", type=_limit, default=defaults.max_connections_per_peer, metavar="N|none"
    )
    limits.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight, metavar="N")
    limits.add_argument("--idle-timeout", type=_seconds, default=defaults.idle_timeout, metavar="SECONDS|none")
    limits.add_argument("--frame-timeout", type=_seconds, default=defaults.frame_timeout, metavar="SECONDS|none")
    limits.add_argument("--handler-timeout", type=_seconds, default=defaults.handler_timeout, metavar="SECONDS|none")
    limits.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout, metavar="SECONDS")
    limits.add_argument(
        "--follow-msh18",
        action="store_true",
        help="decode in the charset MSH-18 declares when the receiver names no codec",
    )
    serve.add_argument("--uvloop", action="store_true", help="run on uvloop (needs hl7bridge[uvloop])")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _limit(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _seconds(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def setting_options(args: argparse.Namespace) -> dict[str, Any]:
    """The listener settings given on the command line, as keyword arguments."""
    return {field.name: getattr(args, field.name) for field in fields(Settings)}


def load_receiver(path: str) -> Any:
    """The receiver named by a dotted path: a class is instantiated with no arguments."""
    from twisted.python.reflect import namedAny

    target = namedAny(path)
    return target() if isinstance(target, type) else target


def serve(args: argparse.Namespace) -> int:
    """Listen on ``args.endpoint`` until SIGINT or SIGTERM; return the exit status."""
    from hl7bridge.reactor import install

    reactor = install(uvloop=args.uvloop)

    from twisted.internet import endpoints
    from twisted.logger import ILogObserver, STDLibLogObserver, globalLogBeginner

    from hl7bridge.mllp import MLLPFactory

    globalLogBeginner.beginLoggingTo([cast(ILogObserver, STDLibLogObserver())], redirectStandardIO=False)
    try:
        # After install(): receiver modules written for txHL7 often import
        # twisted.internet.reactor, which must find the asyncio reactor.
        receiver = load_receiver(args.receiver)
        factory = MLLPFactory(receiver, **setting_options(args))
    except Exception as exc:
        log.error("cannot use receiver %s: %s: %s", args.receiver, type(exc).__name__, exc)
        return 2
    status = 0

    def listening(port: Any) -> None:
        address = port.getHost()
        where = f"{address.host}:{address.port}" if hasattr(address, "port") else str(address)
        log.info("serving %s on %s", args.receiver, where)

        def stop() -> Any:
            log.info("stopping: no new connections, closing %d open", factory.engine.connections)
            port.stopListening()
            return factory.drain()

        reactor.addSystemEventTrigger("before", "shutdown", stop)

    def failed(failure: Any) -> None:
        nonlocal status
        status = 1
        log.error("cannot listen on %s: %s", args.endpoint, failure.getErrorMessage())
        reactor.callWhenRunning(reactor.stop)

    endpoints.serverFromString(reactor, args.endpoint).listen(factory).addCallbacks(listening, failed)
    reactor.run()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
