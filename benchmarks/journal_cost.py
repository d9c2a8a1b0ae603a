"""What a message journal costs per message on its own: no network, no session, no handler.

Groups of messages go through a journal backend the way a listener hands
them over: a group's arrivals are begun together, then their answers are
committed together (durably, with the backend's default policy), while the
next group is begun. With ``c`` connections and one message in flight on
each, a listener's groups hold about ``c / 2`` messages (half of them are
being begun while the other half are being answered), so a group of 4 is
what 8 connections give and a group of 32 what 64 give.

Measured per message: the CPU time of the loop's thread (handing groups
over and getting their results back), of the journal's own threads (SQLite's
writer and syncer: the database's work) and, for PostgreSQL, of the
database's processes that serve the journal's connections (read from
``/proc``, so only for a server on this machine); and the wall time per
group. ``make bench`` runs this after the listeners and sets the threads'
figure against the listener's own CPU per message without a journal: one
CPU that does both can give at most ``own / (own + threads)`` of the
listener's throughput, even if the loop's part of journaling cost nothing.

Run by itself: ``python benchmarks/journal_cost.py [--postgresql URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hl7bridge.ack import read_header
from hl7bridge.journal import HOST, NEW, Answered, Arrival, Backend, Outcome, backend_for

#: Messages in a group: what 2, 8, 16 and 64 connections give a listener.
GROUP_SIZES = (1, 4, 8, 32)

#: The message journaled: the benchmark's ORU^R01, with a control id of its own each time.
MESSAGE = Path(__file__).resolve().parent / "messages" / "oru_r01.hl7"

ACK = b"MSH|^~\\&|BRIDGE|CENTRAL|BENCHLAB|NORTHWING|20250115083000||ACK^R01^ACK|A1|P|2.5.1\rMSA|AA|C1\r"

#: The application name the journal's PostgreSQL connections carry here, to find their server processes.
APPLICATION = "hl7bridge-journal-cost"


@dataclass
class Cost:
    """What one backend at one group size cost, the median of the rounds."""

    backend: str  # "sqlite" or "postgresql"
    group: int  # messages per group
    loop_us: float  # CPU per message on the event loop's thread: handing over and getting back
    threads_us: float  # CPU per message on the journal's own threads (SQLite: writing and syncing)
    server_us: float  # the database server's CPU per message (0 for SQLite)
    group_wall_us: float  # wall time per group, begun to answered, with the next group begun meanwhile


def _messages(template: str) -> Callable[[int], str]:
    """Messages like ``template``, each with control id ``C<n>``."""
    head, _, rest = template.partition("\r")
    fields = head.split("|")

    def message(number: int) -> str:
        fields[9] = f"C{number}"
        return "|".join(fields) + "\r" + rest

    return message


def _cpu(stat: str) -> float:
    """CPU seconds used so far by the process or thread of a ``/proc`` stat file (0 if it is gone)."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _threads_cpu() -> tuple[float, float]:
    """CPU seconds used so far by this process's main thread, and by its other threads."""
    main = os.getpid()
    others = sum(_cpu(f"/proc/self/task/{tid}/stat") for tid in os.listdir("/proc/self/task") if int(tid) != main)
    return _cpu(f"/proc/self/task/{main}/stat"), others


def _server_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by these processes (those gone count 0)."""
    return sum(_cpu(f"/proc/{pid}/stat") for pid in pids)


async def _server_pids(url: str) -> list[int]:
    """The PostgreSQL processes serving the journal's connections (none unless the server is on this machine)."""
    import asyncpg

    connection = await asyncpg.connect(url.split("?", 1)[0])
    try:
        rows = await connection.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", APPLICATION)
    finally:
        await connection.close()
    pids = [row["pid"] for row in rows]
    return pids if all(Path(f"/proc/{pid}").exists() for pid in pids) else []


def _call(method: Callable[..., None], *args: Any) -> asyncio.Future[Any]:
    """A backend call whose ``done`` callback sets a future."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(result: Any) -> None:
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    method(*args, done)
    return future


async def _measure(kind: str, url: str, group: int, messages: int, rounds: int) -> Cost:
    backend: Backend = backend_for(url)
    await backend.connect()
    node = await backend.register(HOST, os.getpid())
    template = _messages(MESSAGE.read_text().replace("\r\n", "\r").replace("\n", "\r"))
    raw_of: dict[int, bytes] = {}
    numbers = iter(range(1, 10**9))

    def arrivals(groups: int) -> list[list[Arrival]]:
        """The groups of arrivals to journal, made before they are timed (a listener makes them as they come)."""
        made = []
        for _ in range(groups * group):
            number = next(numbers)
            text = template(number)
            header = read_header(text)
            assert header is not None
            raw = raw_of.setdefault(len(text), text.encode())  # the bytes written do not depend on the id
            made.append(Arrival(f"BENCHLAB\x1fNORTHWING\x1fG{group}C{number}", header, raw, "bench", "127.0.0.1"))
        return [made[start : start + group] for start in range(0, len(made), group)]

    def begin(group_arrivals: list[Arrival]) -> asyncio.Future[Any]:
        return _call(backend.begin, node, set(), group_arrivals)

    def answer(group_arrivals: list[Arrival]) -> asyncio.Future[Any]:
        answers = [Answered(arrival, ACK, "AA", lambda committed: None) for arrival in group_arrivals]
        return _call(backend.answer, node, answers)

    def begun(group_arrivals: list[Arrival], outcomes: list[Outcome]) -> None:
        for arrival, outcome in zip(group_arrivals, outcomes, strict=True):
            assert outcome.action == NEW, outcome
            arrival.id = outcome.id

    async def run(groups: list[list[Arrival]]) -> None:
        # As a listener's loop: a group's answers go while the next group is begun.
        begun(groups[0], await begin(groups[0]))
        for previous, current in itertools.pairwise(groups):
            beginning, answering = begin(current), answer(previous)
            begun(current, await beginning)
            lost = await answering
            assert not lost, lost
        lost = await answer(groups[-1])
        assert not lost, lost

    try:
        await run(arrivals(max(2, 200 // group)))  # warm-up: connections opened, caches and files warm
        pids = await _server_pids(url) if kind == "postgresql" else []
        costs = []
        for _ in range(rounds):
            groups = max(2, messages // group)
            made = arrivals(groups)
            (loop, threads), server, wall = _threads_cpu(), _server_cpu(pids), time.perf_counter()
            await run(made)
            wall = time.perf_counter() - wall
            (loop_after, threads_after), server_after = _threads_cpu(), _server_cpu(pids)
            per_message = 1e6 / (groups * group)
            costs.append(
                (
                    (loop_after - loop) * per_message,
                    (threads_after - threads) * per_message,
                    (server_after - server) * per_message,
                    wall / groups * 1e6,
                )
            )
    finally:
        await backend.close(node)
    return Cost(kind, group, *(statistics.median(cost[index] for cost in costs) for index in range(4)))


def measure(
    postgresql: str | None, groups: tuple[int, ...] = GROUP_SIZES, messages: int = 4000, rounds: int = 5
) -> list[Cost]:
    """Each backend at each group size; SQLite in a new file, PostgreSQL (if given) in a schema of its own."""
    costs = []
    with tempfile.TemporaryDirectory(prefix="hl7bridge-journal-cost-") as folder:
        for group in groups:
            url = f"sqlite:///{folder}/journal-{group}.db"
            costs.append(asyncio.run(_measure("sqlite", url, group, messages, rounds)))
    if postgresql:
        schema = f"hl7bridge_bench_cost_{os.getpid()}"
        separator = "&" if "?" in postgresql else "?"
        url = f"{postgresql}{separator}schema={schema}&application_name={APPLICATION}"
        try:
            for group in groups:
                costs.append(asyncio.run(_measure("postgresql", url, group, messages, rounds)))
        finally:
            asyncio.run(_drop_schema(postgresql, schema))
    return costs


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url.split("?", 1)[0])
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


def bound(own_us: float, journal_us: float) -> float:
    """The best ratio to the listener without a journal when one CPU does the listener's work and the journal's."""
    return own_us / (own_us + journal_us)


def table(costs: list[Cost]) -> str:
    lines = [
        "| journal | messages per group | loop's CPU per message | journal threads' CPU per message"
        " | database server's CPU per message | wall time per group |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for cost in costs:
        threads = f"{cost.threads_us:.0f} µs" if cost.backend == "sqlite" else "-"
        server = f"{cost.server_us:.0f} µs" if cost.backend == "postgresql" else "-"
        lines.append(
            f"| {cost.backend} | {cost.group} | {cost.loop_us:.0f} µs | {threads} | {server}"
            f" | {cost.group_wall_us:.0f} µs |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--postgresql", help="a PostgreSQL URL to measure too (in a schema made and dropped here)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=4000, help="messages per round")
    parser.add_argument("--groups", default=",".join(map(str, GROUP_SIZES)), help="messages per group, as 1,4,8")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    groups = tuple(int(size) for size in args.groups.split(","))
    costs = measure(args.postgresql, groups, messages=args.messages, rounds=args.rounds)
    print(json.dumps([asdict(cost) for cost in costs], indent=1) if args.json else table(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
