"""The ``hl7bridge`` command: ``hl7bridge serve`` runs a receiver on Twisted endpoints.

``hl7bridge serve --endpoint tcp:2575 --receiver package.module.Class`` takes the
options of ``twistd hl7bridge`` (see :mod:`hl7bridge.tap`) plus ``--uvloop`` and
``--log-level``, installs Twisted's asyncio reactor, listens, and on SIGINT or
SIGTERM stops listening, answers the messages in flight and exits.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any, cast

from twisted.python import usage

from hl7bridge import tap

log = logging.getLogger("hl7bridge.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ServeOptions(tap.Options):
    optFlags = [*tap.Options.optFlags, ["uvloop", None, "run on uvloop (needs hl7bridge[uvloop])"]]
    optParameters = [*tap.Options.optParameters, ["log-level", None, "INFO", f"one of {', '.join(LOG_LEVELS)}"]]

    def postOptions(self) -> None:  # noqa: N802
        super().postOptions()
        self["log-level"] = self["log-level"].upper()
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")


class CommandOptions(usage.Options):
    synopsis = "hl7bridge"
    subCommands = [["serve", None, ServeOptions, "listen for MLLP and serve a receiver"]]

    def postOptions(self) -> None:  # noqa: N802
        if self.subCommand is None:
            raise usage.UsageError("a command is needed: serve")


def serve(options: ServeOptions) -> int:
    """Listen on ``--endpoint`` until SIGINT or SIGTERM; return the exit status."""
    from hl7bridge.reactor import install

    reactor = install(uvloop=options["uvloop"])

    from twisted.internet import endpoints
    from twisted.logger import ILogObserver, STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([cast(ILogObserver, STDLibLogObserver())], redirectStandardIO=False)
    try:
        factory = tap.build_factory(options)
    except Exception as exc:
        log.error("cannot use receiver %s: %s: %s", options["receiver"], type(exc).__name__, exc)
        return 2
    status = 0

    def listening(port: Any) -> None:
        address = port.getHost()
        where = f"{address.host}:{address.port}" if hasattr(address, "port") else str(address)
        log.info("serving %s on %s", options["receiver"], where)

        def stop() -> Any:
            log.info("stopping: no new connections, answering what is in flight")
            port.stopListening()
            return factory.drain()

        reactor.addSystemEventTrigger("before", "shutdown", stop)

    def failed(failure: Any) -> None:
        nonlocal status
        status = 1
        log.error("cannot listen on %s: %s", options["endpoint"], failure.getErrorMessage())
        reactor.callWhenRunning(reactor.stop)

    endpoints.serverFromString(reactor, options["endpoint"]).listen(factory).addCallbacks(listening, failed)
    reactor.run()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else list(argv))
    except usage.UsageError as exc:
        print(f"{getattr(options, 'subOptions', None) or options}\nhl7bridge: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=options.subOptions["log-level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(options.subOptions)


if __name__ == "__main__":
    sys.exit(main())
