"""The MLLP listeners the benchmark compares, each run as a process of its own.

    python benchmarks/servers.py KIND PORT [--profile FILE | --tracemalloc DIR]

listens on 127.0.0.1:PORT until killed (SIGTERM or SIGINT). ``--profile``
runs the listener under cProfile and writes the stats to FILE when it is
stopped, for ``python -m pstats FILE``. ``--tracemalloc`` traces the Python
heap from the start and, on each SIGUSR1, writes a snapshot to DIR (``0.snapshot``,
``1.snapshot``, ...), for the memory benchmark's breakdown.

Every listener raises its soft limit of open files to the hard limit, and the
hl7bridge listeners turn off hl7bridge's connection limits (``max_connections``
1000 by default, and ``max_connections_per_peer`` if set): the memory benchmark
holds 5,000 connections, all from 127.0.0.1.

Every listener acknowledges every message with AA. What differs is the stack
and how much of the message is looked at:

=========================  ===================================================
hl7bridge-asyncio          ``hl7bridge.serve()`` on a plain asyncio loop,
                           receiver on hl7bridge's AbstractHL7Receiver that
                           returns ``container.ack()`` (MSH-only ACK)
hl7bridge-asyncio-uvloop   the same on a uvloop loop
hl7bridge-twisted          hl7bridge's ``MLLPFactory`` under Twisted's asyncio
                           reactor (``hl7bridge.reactor.install()``), same
                           receiver
hl7bridge-twisted-uvloop   the same, ``install(uvloop=True)``
hl7bridge-legacy           hl7bridge's ``MLLPFactory`` (asyncio reactor) serving
                           an unchanged txHL7 ``AbstractHL7Receiver`` subclass
                           (full parse in parseMessage, ``create_ack``)
hl7bridge-serve            the ``hl7bridge`` command as installed (the console
                           script next to this Python): ``hl7bridge serve``
                           with its defaults, one INFO line per message
                           (``hl7bridge.messages``) to standard error, which
                           run.py sends to a file; the ACK-only receiver
hl7bridge-serve-quiet      the same with ``--log-level WARNING``: no line per
                           message
hl7bridge-serve-legacy     the same command serving the txHL7 receiver
hl7bridge-legacy-asyncio   the same txHL7 receiver through ``hl7bridge.serve()``
                           (asyncio's own server and transport) under Twisted's
                           asyncio reactor, installed as for the Twisted face
hl7bridge-pid              hl7bridge's ``MLLPFactory`` (asyncio reactor), an
                           hl7bridge receiver that reads PID-3 through
                           ``container.message`` (so it parses) and ACKs
txhl7-epoll                txHL7's own ``MLLPFactory`` on Twisted's default
                           (epoll) reactor, the same txHL7 receiver as legacy
txhl7-asyncio              the same on Twisted's asyncio reactor
plain-hl7mllp              ``hl7.mllp.start_hl7_server`` as its docs show it:
                           ``readmessage()`` then ``create_ack()``
ceiling-asyncio            an ``asyncio.Protocol`` that splits frames on FS and
                           answers each with a canned ACK: no decoding, no HL7
ceiling-uvloop             the same on uvloop
ceiling-twisted            the same framing and canned ACK as a Twisted
                           ``Protocol`` on the asyncio reactor: what Twisted's
                           transport costs on that loop, with no HL7 and no
                           hl7bridge
=========================  ===================================================

The receivers are defined here, not in hl7bridge, so the benchmark measures
what a user's receiver would get.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"

#: plain-hl7mllp's StreamReader limit. hl7.mllp's default (64 KiB) refuses the
#: large corpus ORUs (up to 77 KB) with ValueError, so it is raised here, as a
#: deployment receiving such messages would have to.
PLAIN_HL7MLLP_LIMIT = 16 * 1024 * 1024

#: hl7bridge's connection limits, off: the memory benchmark opens 5,000
#: connections from one address. The throughput runs open 64 at most.
NO_CONNECTION_LIMITS: dict[str, Any] = {"max_connections": None, "max_connections_per_peer": None}

#: What the ceiling listeners answer, whatever they receive.
CANNED_ACK = (
    b"\x0bMSH|^~\\&|BRIDGE|CENTRAL|BENCHLAB|NORTHWING|20250115083000||ACK^R01^ACK|ACK0001|P|2.5.1\r"
    b"MSA|AA|BENCH000000000001\r\x1c\r"
)


# Receivers ---------------------------------------------------------------


def hl7bridge_ack_receiver() -> Any:
    from hl7bridge.receiver import AbstractHL7Receiver

    class AckReceiver(AbstractHL7Receiver):
        """ACK-only: never touches the message body."""

        def handleMessage(self, container: Any) -> Any:  # noqa: N802
            return container.ack()

    return AckReceiver()


def hl7bridge_pid_receiver() -> Any:
    from hl7bridge.receiver import AbstractHL7Receiver

    class PidReceiver(AbstractHL7Receiver):
        """Reads the patient identifier (PID-3), which needs the parsed message, then ACKs."""

        def handleMessage(self, container: Any) -> Any:  # noqa: N802
            patient_id = container.message.segment("PID")[3]
            if not str(patient_id):
                return container.ack("AE")
            return container.ack()

    return PidReceiver()


def txhl7_receiver() -> Any:
    """A receiver as written for txHL7: its base class, unchanged."""
    from txHL7.receiver import AbstractHL7Receiver

    class TxAckReceiver(AbstractHL7Receiver):
        def handleMessage(self, container: Any) -> Any:  # noqa: N802
            return container.ack()

    return TxAckReceiver()


#: The receivers ``hl7bridge serve`` is given by dotted path (servers.NAME), by name.
SERVE_RECEIVERS: dict[str, Callable[[], Any]] = {
    "AckReceiver": hl7bridge_ack_receiver,
    "TxAckReceiver": txhl7_receiver,
}


def __getattr__(name: str) -> Any:
    # The hl7bridge-serve rows name their receiver by dotted path: servers.AckReceiver.
    if name in SERVE_RECEIVERS:
        return type(SERVE_RECEIVERS[name]())
    raise AttributeError(name)


# Loops -------------------------------------------------------------------


def new_loop(uvloop: bool) -> asyncio.AbstractEventLoop:
    if uvloop:
        import uvloop as _uvloop

        return _uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_asyncio(start: Callable[[], Any], uvloop: bool) -> None:
    """Run ``start()`` (a coroutine giving an asyncio Server) and serve forever."""
    loop = new_loop(uvloop)
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(start())
    try:
        loop.run_until_complete(server.serve_forever())
    finally:
        server.close()


# Listeners ---------------------------------------------------------------


def hl7bridge_asyncio(port: int, uvloop: bool = False) -> None:
    import hl7bridge

    receiver = hl7bridge_ack_receiver()
    run_asyncio(lambda: hl7bridge.serve(receiver, HOST, port, **NO_CONNECTION_LIMITS), uvloop)


def hl7bridge_twisted(port: int, receiver_factory: Callable[[], Any], uvloop: bool = False) -> None:
    from hl7bridge.reactor import install

    reactor = install(uvloop=uvloop)
    from hl7bridge.mllp import MLLPFactory

    reactor.listenTCP(port, MLLPFactory(receiver_factory(), **NO_CONNECTION_LIMITS), interface=HOST)
    reactor.run()


def hl7bridge_serve(receiver: str, *options: str) -> Callable[[int], list[str]]:
    """The command line of ``hl7bridge serve`` as a user runs it: the installed script, INFO logs and all."""

    def command(port: int) -> list[str]:
        return [
            str(Path(sys.executable).with_name("hl7bridge")),
            "serve",
            "--endpoint",
            f"tcp:{port}:interface={HOST}",
            "--app-dir",
            str(Path(__file__).resolve().parent),
            "--receiver",
            f"servers.{receiver}",
            "--max-connections",
            "none",
            "--max-connections-per-peer",
            "none",
            *options,
        ]

    return command


#: The PostgreSQL of the journal rows; each run of a row gets a schema of its own.
POSTGRES = os.environ.get("HL7BRIDGE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def sqlite_journal(port: int) -> str:
    """A new SQLite journal for one run of a row (the default durability: answers synced to disk)."""
    path = Path(tempfile.mkdtemp(prefix=f"hl7bridge-bench-{port}-")) / "journal.db"
    return f"sqlite:///{path}"


def postgres_journal(port: int) -> str:
    """A new schema on the benchmark's PostgreSQL for one run of a row (its default synchronous_commit)."""
    schema = f"hl7bridge_bench_{port}_{os.getpid()}"
    return f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}schema={schema}"


def forget_journals() -> None:
    """Delete what the journal rows wrote: their SQLite folders and PostgreSQL schemas."""
    import glob
    import shutil

    for folder in glob.glob(os.path.join(tempfile.gettempdir(), "hl7bridge-bench-*")):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        import asyncpg
    except ImportError:
        return

    async def drop() -> None:
        connection = await asyncpg.connect(POSTGRES, timeout=10)
        try:
            names = await connection.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'hl7bridge\\_bench\\_%'"
            )
            for (name,) in names:
                await connection.execute(f'DROP SCHEMA "{name}" CASCADE')
        finally:
            await connection.close()

    try:
        asyncio.run(drop())
    except OSError:
        pass  # no PostgreSQL here: its rows failed to start, and left nothing


def hl7bridge_legacy_asyncio(port: int) -> None:
    """The txHL7 receiver on asyncio's own server and transport, the asyncio reactor installed on that loop."""
    import hl7bridge
    from hl7bridge.reactor import event_loop, install

    reactor = install()
    server = event_loop().run_until_complete(hl7bridge.serve(txhl7_receiver(), HOST, port, **NO_CONNECTION_LIMITS))
    try:
        reactor.run()
    finally:
        server.close()


def txhl7(port: int, asyncio_reactor: bool) -> None:
    if asyncio_reactor:
        from twisted.internet import asyncioreactor

        asyncioreactor.install(asyncio.new_event_loop())
    from twisted.internet import reactor as installed
    from txHL7.mllp import MLLPFactory

    reactor: Any = installed
    reactor.listenTCP(port, MLLPFactory(txhl7_receiver()), interface=HOST)
    reactor.run()


def plain_hl7mllp(port: int) -> None:
    import hl7
    from hl7.mllp import start_hl7_server

    async def process_hl7_messages(hl7_reader: Any, hl7_writer: Any) -> None:
        # As in python-hl7's documentation, less its prints.
        try:
            while not hl7_writer.is_closing():
                hl7_message = await hl7_reader.readmessage()
                hl7_writer.writemessage(hl7_message.create_ack())
                await hl7_writer.drain()
        except asyncio.IncompleteReadError:
            if not hl7_writer.is_closing():
                hl7_writer.close()
                await hl7_writer.wait_closed()

    assert hl7  # imported for its parser, as the docs do
    run_asyncio(
        lambda: start_hl7_server(process_hl7_messages, HOST, port, limit=PLAIN_HL7MLLP_LIMIT),
        uvloop=False,
    )


class CeilingProtocol(asyncio.Protocol):
    """MLLP framing and a canned ACK: what the loop itself costs per message."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        count = split_frames(self.buffer)
        if count:
            self.transport.write(CANNED_ACK * count)


def split_frames(buffer: bytearray) -> int:
    """Remove the whole frames at the start of ``buffer``; return how many there were."""
    count = 0
    start = 0
    end = buffer.find(b"\x1c")
    while end >= 0:
        count += 1
        start = end + 1
        end = buffer.find(b"\x1c", start)
    del buffer[:start]
    return count


def ceiling(port: int, uvloop: bool) -> None:
    async def start() -> Any:
        return await asyncio.get_running_loop().create_server(CeilingProtocol, HOST, port)

    run_asyncio(start, uvloop)


def ceiling_twisted(port: int) -> None:
    from hl7bridge.reactor import install

    reactor = install()
    from twisted.internet.protocol import Factory, Protocol

    class CeilingTwistedProtocol(Protocol):
        def connectionMade(self) -> None:  # noqa: N802
            self.buffer = bytearray()

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            self.buffer += data
            count = split_frames(self.buffer)
            if count:
                self.transport.write(CANNED_ACK * count)  # type: ignore[union-attr]

    reactor.listenTCP(port, Factory.forProtocol(CeilingTwistedProtocol), interface=HOST)
    reactor.run()


LISTENERS: dict[str, Callable[[int], None]] = {
    "hl7bridge-asyncio": lambda port: hl7bridge_asyncio(port),
    "hl7bridge-asyncio-uvloop": lambda port: hl7bridge_asyncio(port, uvloop=True),
    "hl7bridge-twisted": lambda port: hl7bridge_twisted(port, hl7bridge_ack_receiver),
    "hl7bridge-twisted-uvloop": lambda port: hl7bridge_twisted(port, hl7bridge_ack_receiver, uvloop=True),
    "hl7bridge-legacy": lambda port: hl7bridge_twisted(port, txhl7_receiver),
    "hl7bridge-legacy-asyncio": hl7bridge_legacy_asyncio,
    "hl7bridge-pid": lambda port: hl7bridge_twisted(port, hl7bridge_pid_receiver),
    "txhl7-epoll": lambda port: txhl7(port, asyncio_reactor=False),
    "txhl7-asyncio": lambda port: txhl7(port, asyncio_reactor=True),
    "plain-hl7mllp": plain_hl7mllp,
    "ceiling-asyncio": lambda port: ceiling(port, uvloop=False),
    "ceiling-uvloop": lambda port: ceiling(port, uvloop=True),
    "ceiling-twisted": ceiling_twisted,
}


#: Listeners that are a command of their own, run in place of this process (exec).
COMMANDS: dict[str, Callable[[int], list[str]]] = {
    "hl7bridge-serve": hl7bridge_serve("AckReceiver"),
    "hl7bridge-serve-quiet": hl7bridge_serve("AckReceiver", "--log-level", "WARNING"),
    "hl7bridge-serve-legacy": hl7bridge_serve("TxAckReceiver"),
    "hl7bridge-serve-sqlite": lambda port: hl7bridge_serve("AckReceiver", "--journal", sqlite_journal(port))(port),
    "hl7bridge-serve-postgresql": lambda port: hl7bridge_serve("AckReceiver", "--journal", postgres_journal(port))(
        port
    ),
}


def raise_open_files_limit() -> None:
    """Allow as many open files as the hard limit does (5,000 connections need more than 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def snapshot_on_signal(directory: str) -> None:
    """Trace the Python heap; on each SIGUSR1, write a snapshot to ``directory``."""
    import tracemalloc

    tracemalloc.start()
    taken = 0

    def dump(signum: int, frame: Any) -> None:
        nonlocal taken
        path = os.path.join(directory, f"{taken}.snapshot")
        tracemalloc.take_snapshot().dump(path + ".part")
        os.replace(path + ".part", path)  # complete when it appears
        taken += 1

    signal.signal(signal.SIGUSR1, dump)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted([*LISTENERS, *COMMANDS]))
    parser.add_argument("port", type=int)
    traced = parser.add_mutually_exclusive_group()
    traced.add_argument("--profile", metavar="FILE", help="run under cProfile; write stats to FILE on exit")
    traced.add_argument("--tracemalloc", metavar="DIR", help="trace the Python heap; SIGUSR1 writes a snapshot to DIR")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    if args.kind in COMMANDS:
        if args.tracemalloc:
            parser.error(f"{args.kind} is a command of its own; --tracemalloc cannot trace it")
        command = COMMANDS[args.kind](args.port)
        if args.profile:
            # cProfile writes its stats when the command exits (hl7bridge serve does on SIGTERM).
            command = [sys.executable, "-m", "cProfile", "-o", args.profile, *command]
        os.execv(command[0], command)
    run = LISTENERS[args.kind]
    if args.tracemalloc:
        snapshot_on_signal(args.tracemalloc)

    if not args.profile:
        # Twisted's reactors stop on SIGTERM by themselves; asyncio loops are just killed.
        run(args.port)
        return 0

    import cProfile

    profiler = cProfile.Profile()

    def stop(signum: int, frame: Any) -> None:
        profiler.disable()
        profiler.dump_stats(args.profile)
        os._exit(0)

    profiler.enable()
    # After enable, and again after the reactor may have installed its own handlers.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        run(args.port)
    finally:
        stop(0, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
