"""The message journal: ACK after commit, retransmissions answered once, replay.

With a journal, a listener records each message when it arrives (its bytes,
where it came from, its MSH-3, MSH-4, MSH-9 and MSH-10) and commits its ACK
before the ACK is written to the socket. A message whose key (MSH-3, MSH-4 and
MSH-10 by default) already has an accepting answer (AA or CA, or the
receiver's deliberate silence) gets that same answer again, and the handler
does not run. A retransmission that arrives while the first copy is still
being handled, by this process or another on the same journal, waits for the
first copy's answer.

A session calls the journal at two points only: :meth:`Journal.begin` when a
frame arrives, :meth:`Journal.answer` when its answer is about to be written.
What is asked for in one turn of the event loop is written in one transaction
(group commit). One backend per database does the writing:
:mod:`hl7bridge.journal.sqlite` (the embedded default, on a thread of its own)
and :mod:`hl7bridge.journal.postgres` (several listeners sharing one journal).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

from twisted.python.failure import Failure

from hl7bridge import failures
from hl7bridge.ack import Header

log = logging.getLogger("hl7bridge.journal")

T = TypeVar("T")

#: The schema version this hl7bridge writes; older journals are migrated on open.
SCHEMA_VERSION = 1

#: MSH fields that identify a message by default: sending application and facility, control id.
DEFAULT_KEY = "MSH-3,MSH-4,MSH-10"

#: Days a journaled message is kept by default; older ones are purged.
DEFAULT_RETENTION_DAYS = 7.0

#: Answers that settle a message for good: a retransmission gets them again
#: without the handler running. An error or a rejection (AE, AR, CE, CR) does
#: not: the sender may send the message again and it is handled again.
FINAL_CODES = frozenset({"AA", "CA", "none"})

#: Seconds between a node's signs of life in the journal.
HEARTBEAT_INTERVAL = 2.0

#: A node not heard from for this long is presumed gone: a message it was
#: handling may be taken over by the node that gets its retransmission.
NODE_STALE_AFTER = 10.0

#: Seconds between looks at a message another node is handling, for its answer.
WAIT_POLL_INTERVAL = 0.25

#: Seconds between purges of messages older than the retention, while serving.
PURGE_INTERVAL = 3600.0

# A separator no MSH field holds, to make one key text of several fields.
_KEY_JOIN = "\x1f"


class JournalError(ValueError):
    """A journal URL or setting that cannot be used, or a journal this hl7bridge cannot read."""


def parse_key(text: str) -> tuple[int, ...]:
    """The MSH field numbers of a key such as ``"MSH-3,MSH-4,MSH-10"``.

    Raises:
        JournalError: an item is not ``MSH-n`` with n from 3 to 21, or MSH-10 is missing.
    """
    numbers = []
    for item in text.split(","):
        name = item.strip().upper()
        if not name.startswith("MSH-") or not name[4:].isdigit() or not 3 <= int(name[4:]) <= 21:
            raise JournalError(f"{item.strip()!r} is not an MSH field from MSH-3 to MSH-21")
        numbers.append(int(name[4:]))
    if 10 not in numbers:
        raise JournalError("it must hold MSH-10, the message control id")
    return tuple(dict.fromkeys(numbers))


def _key_reader(numbers: tuple[int, ...]) -> Callable[[Header], str]:
    """What makes a message's key text of the MSH fields ``numbers`` (one field: that field's text)."""
    if len(numbers) == 1:
        (number,) = numbers
        return lambda header: header.padded[number]
    fields = operator.itemgetter(*numbers)  # a tuple only for two fields or more
    return lambda header: _KEY_JOIN.join(fields(header.padded))


def check_retention(days: float) -> None:
    """Raise :class:`JournalError` unless ``days`` is a retention a journal can keep."""
    if days <= 0:
        raise JournalError("must be more than 0 days")


def upgrade_steps(version: int, migrations: dict[int, str]) -> list[str]:
    """The migrations, in order, that take a journal of schema ``version`` to :data:`SCHEMA_VERSION`.

    Raises:
        JournalError: the journal was written by a newer hl7bridge.
    """
    if version > SCHEMA_VERSION:
        raise JournalError(f"the journal has schema version {version}, newer than this hl7bridge's {SCHEMA_VERSION}")
    return [migrations[number] for number in range(version + 1, SCHEMA_VERSION + 1)]


@dataclass(frozen=True)
class Recorded:
    """The answer a message's key already has in the journal (``ack`` None: it was not answered)."""

    ack: bytes | None
    code: str


#: begin()'s outcome: None when this copy is to be handled, a Recorded answer
#: to send again, or FAILED when the journal could not be written.
FAILED = Recorded(None, "failed")


class Arrival:
    """One message as it arrived, from :meth:`Journal.begin` until its answer is committed."""

    __slots__ = (
        "begun",
        "control_id",
        "facility",
        "header",
        "id",
        "journal",
        "key",
        "listener",
        "message_type",
        "peer",
        "raw",
        "received",
        "sender",
    )

    def __init__(self, key: str, header: Header, raw: bytes, listener: str, peer: str) -> None:
        self.key = key
        self.header = header
        self.raw = raw
        self.listener = listener
        self.peer = peer
        self.sender = header.field(3)
        self.facility = header.field(4)
        self.message_type = header.message_type
        self.control_id = header.control_id
        self.received = time.time()  # seconds since the epoch
        self.id: int | None = None  # its row, once begun
        self.begun: Callable[[Recorded | None], None] | None = None
        self.journal: Journal | None = None  # the journal it was begun in

    def values(self) -> tuple[Any, ...]:
        """Its row's values for :data:`ARRIVAL_COLUMNS`, in their order (``received``: seconds since the epoch)."""
        return (
            self.key,
            self.received,
            self.listener,
            self.peer,
            self.sender,
            self.facility,
            self.message_type,
            self.control_id,
            self.raw,
        )


#: The columns an arrival writes, as :meth:`Arrival.values` gives them (the same on every backend).
ARRIVAL_COLUMNS = (
    "key, received_at, listener, peer, sending_application, sending_facility, message_type, control_id, raw"
)


@dataclass
class Answered:
    """An answer to commit for a begun arrival."""

    arrival: Arrival
    ack: bytes | None
    code: str
    committed: Callable[[bool], None]


#: What a backend decides for an arrival whose key is already in the journal.
REPLAY, WAIT, CLAIM = "replay", "wait", "claim"


@dataclass
class Existing:
    """The journal's row for a key that an arrival finds taken."""

    id: int
    node: int | None
    code: str | None
    ack: bytes | None
    answered: bool


@dataclass
class Node:
    """A process writing to the journal, and how recently it was heard from."""

    id: int
    host: str
    pid: int
    seconds_since_seen: float
    stopped: bool


def decide(row: Existing, me: int, busy: set[str], key: str, owner: Node | None) -> str:
    """What to do with an arrival whose key is taken: send the answer again, wait, or take the message over.

    ``busy`` holds the keys this node is handling now (including earlier
    arrivals of the same batch).
    """
    if row.answered and row.code in FINAL_CODES:
        return REPLAY
    if row.answered:
        return CLAIM  # an error or a rejection: the sender tries again
    if row.node == me:
        return WAIT if key in busy else CLAIM  # else an attempt of ours whose answer was never committed
    if owner is None or owner.stopped or owner.seconds_since_seen > NODE_STALE_AFTER:
        return CLAIM
    if owner.host == HOST and owner.pid != os.getpid() and not _running(owner.pid):
        return CLAIM  # a process of this machine that is gone (kill -9)
    return WAIT


@dataclass
class Outcome:
    """A backend's answer for one arrival: its row id when it is to be handled, or what to do instead."""

    action: str  # "new" (or claimed), REPLAY or WAIT
    id: int | None = None
    recorded: Recorded | None = None

    @classmethod
    def replay(cls, row: Existing) -> Outcome:
        """Send ``row``'s recorded answer again."""
        return cls(REPLAY, recorded=Recorded(row.ack, row.code or "none"))


NEW = "new"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    """This machine's name, with its boot id where Linux gives one (a restarted machine is another host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return f"{socket.gethostname()}/{file.read().strip()}"
    except OSError:
        return socket.gethostname()


HOST = _host()


@dataclass
class Message:
    """A journaled message, as ``journal pending`` and ``replay`` read it."""

    id: int
    received: datetime
    listener: str
    peer: str
    sender: str
    facility: str
    message_type: str
    control_id: str
    raw: bytes
    ack: bytes | None
    code: str | None
    answered: datetime | None
    node: int | None
    attempts: int


#: The columns a backend selects for a :class:`Message`, in its fields' order.
MESSAGE_COLUMNS = (
    "id, received_at, listener, peer, sending_application, sending_facility, message_type, control_id, raw, "
    "ack, ack_code, answered_at, node, attempts"
)

#: The messages received and never answered, oldest first (the same SQL on every backend).
PENDING_SQL = (
    f"SELECT {MESSAGE_COLUMNS} FROM hl7bridge_journal_messages WHERE answered_at IS NULL ORDER BY received_at, id"
)


class Backend(Protocol):
    """What a database does for a :class:`Journal`; every method is called on the event loop."""

    #: Begins, and answers, that the journal lets run at once (None: no limit,
    #: the backend groups what it is given). More overlap round trips; fewer make bigger groups.
    concurrency: int | None

    async def connect(self) -> None:
        """Connect; create the schema, or migrate an older one."""

    async def register(self, host: str, pid: int) -> int:
        """Register this process as a node writing to the journal; its node id."""

    def begin(self, node: int, busy: set[str], arrivals: list[Arrival], done: Callable[[Any], None]) -> None:
        """Journal ``arrivals``; ``done`` is called on the loop with one outcome each, in order, or the exception.

        Outcomes are :func:`decide`'s for keys already taken. ``busy`` holds the
        keys this node is handling (see :func:`decide`); the backend adds the
        keys it begins. An outcome that sends a recorded answer again comes only
        once that answer is as durable as a committed one.
        """

    def answer(self, node: int, answers: list[Answered], done: Callable[[Any], None]) -> None:
        """Commit ``answers``, durably; ``done`` is called on the loop with the row ids of those not written
        (another node took the message over), or the exception."""

    async def heartbeat(self, node: int) -> None:
        """This node is alive."""

    async def pending(self) -> list[Message]:
        """Messages received and never answered, oldest first."""

    async def messages(self, since: datetime | None, after: int, limit: int) -> list[Message]:
        """Up to ``limit`` answered messages received since ``since``, with ids above ``after``, by id."""

    async def purge(self, before: datetime) -> int:
        """Delete messages received before ``before``; how many."""

    async def close(self, node: int | None) -> None:
        """Mark the node stopped (if given) and let go of the database."""


class Journal:
    """A listener's journal: begins and answers are grouped per loop turn and committed together.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or
            ``postgresql://user@host:port/db`` (``?schema=NAME`` for a schema of its own).
        key: the MSH fields that identify a message (see :func:`parse_key`).
        retention_days: messages older than this are purged while serving.

    Raises:
        JournalError: the URL names no journal hl7bridge can keep, or the key is wrong.
    """

    def __init__(self, url: str, key: str = DEFAULT_KEY, retention_days: float = DEFAULT_RETENTION_DAYS) -> None:
        self.url = url
        self.key_fields = parse_key(key)
        self._key = _key_reader(self.key_fields)
        try:
            check_retention(retention_days)
        except JournalError as exc:
            raise JournalError(f"retention {exc}") from None
        self.retention = timedelta(days=retention_days)
        self.backend = backend_for(url)
        self.node: int | None = None
        self._opening: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrivals: list[Arrival] = []
        self._answers: list[Answered] = []
        self._scheduled = False
        self._beginnings = 0  # begin writes under way
        self._answerings = 0  # answer writes under way
        self._busy: dict[str, Arrival] = {}  # keys being handled here: begun, answer not committed
        self._beginning: Counter[str] = Counter()  # keys of arrivals in writes under way
        self._waiting: dict[str, list[Arrival]] = {}  # arrivals waiting for a key's answer
        self._tasks: set[asyncio.Task[Any]] = set()
        self._opening_first = False
        self._closing = False
        self._failing = False

    def __repr__(self) -> str:
        return f"<Journal {redact(self.url)}>"

    def key_of(self, header: Header) -> str | None:
        """The key of a message with this MSH; None when its control id is empty (it is not journaled)."""
        if not header.control_id:
            return None
        return self._key(header)

    async def open(self) -> None:
        """Connect, create or migrate the schema, start the heartbeat and the purge (once; later calls wait for it).

        If it fails, a later call tries again.

        Raises:
            Exception: what the database driver raised (unreachable, no permission).
        """
        if self._opening is None:
            self._loop = asyncio.get_running_loop()
            self._opening = self._loop.create_future()
            try:
                await self.backend.connect()
                self.node = await self.backend.register(HOST, os.getpid())
            except BaseException as exc:
                self._opening.set_exception(exc)
                self._opening.exception()  # retrieved: the caller gets it
                self._opening = None  # the next write tries again: the database may be back
                raise
            self._opening.set_result(self.node)
            self._spawn(self._keep_alive())
            log.info("journal %s open (node %d)", redact(self.url), self.node)
            return
        await asyncio.shield(self._opening)

    # The two points a session calls

    def begin(self, arrival: Arrival, begun: Callable[[Recorded | None], None]) -> None:
        """Journal an arrival; ``begun`` is called, on the loop, with None (handle it) or the answer to send."""
        arrival.begun = begun
        arrival.journal = self
        self._arrivals.append(arrival)
        self._schedule()

    def answer(self, arrival: Arrival, ack_bytes: bytes | None, code: str, committed: Callable[[bool], None]) -> None:
        """Commit an arrival's answer; ``committed(True)`` once it is durable, ``committed(False)`` if it is not."""
        self._answers.append(Answered(arrival, ack_bytes, code, committed))
        self._schedule()

    # Group commit

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self.node is None:
            if self._arrivals or self._answers:
                # Not opened by its listener first: open it, then write what waits.
                if not self._opening_first:
                    self._opening_first = True
                    self._spawn(self._open_first())
            return
        limit = self.backend.concurrency
        # Arrivals and answers go separately: a new message need not wait for
        # the disk sync that answers wait for. What waits for a write to end
        # goes with the next one.
        if self._arrivals and (limit is None or self._beginnings < limit):
            arrivals, self._arrivals = self._arrivals, []
            self._beginnings += 1
            # A write under way may begin these keys: another must not take them for stranded.
            busy = set(self._busy).union(self._beginning)
            self._beginning.update(arrival.key for arrival in arrivals)
            # A callback, not a task or a future per write: the loop's own work per message counts.
            self.backend.begin(self.node, busy, arrivals, functools.partial(self._begun, arrivals))
        if self._answers and (limit is None or self._answerings < limit):
            answers, self._answers = self._answers, []
            self._answerings += 1
            self.backend.answer(self.node, answers, functools.partial(self._answered, answers))

    async def _open_first(self) -> None:
        try:
            await self.open()
        except Exception:
            arrivals, answers = self._arrivals, self._answers
            self._arrivals, self._answers = [], []
            self._report_failure(len(arrivals) + len(answers))
            for arrival in arrivals:
                self._settle(arrival, None)
            self._commit_all(answers, None)
        finally:
            self._opening_first = False
        self._schedule()

    def _begun(self, arrivals: list[Arrival], begun: list[Outcome] | BaseException) -> None:
        self._beginnings -= 1
        self._beginning.subtract(arrival.key for arrival in arrivals)
        self._beginning += Counter()  # drops the keys counted down to 0
        outcomes = self._result(begun, len(arrivals))
        if self._arrivals:
            self._schedule()
        for index, arrival in enumerate(arrivals):
            self._settle(arrival, outcomes[index] if outcomes is not None else None)

    def _answered(self, answers: list[Answered], answered: set[int | None] | BaseException) -> None:
        self._answerings -= 1
        if self._answers:
            self._schedule()
        self._commit_all(answers, self._result(answered, len(answers)))

    def _result(self, written: T | BaseException, count: int) -> T | None:
        """A write's result, or None (reported) if it failed."""
        if isinstance(written, BaseException):
            self._report_failure(count, written)
            return None
        if self._failing:
            self._failing = False
            log.warning("journal %s: writing again", redact(self.url))
        return written

    def _commit_all(self, answers: list[Answered], lost: set[int | None] | None) -> None:
        """Tell each answer whether it was committed (``lost`` None: the write failed)."""
        for answered in answers:
            key = answered.arrival.key
            if self._busy.get(key) is answered.arrival:
                del self._busy[key]
            self._wake(key)  # copies that came meanwhile
            answered.committed(lost is not None and answered.arrival.id not in lost)

    def _settle(self, arrival: Arrival, outcome: Outcome | None) -> None:
        if outcome is not None and outcome.action not in (NEW, REPLAY):
            # Handled elsewhere (or by an earlier copy here): look again when
            # that answer is committed here, or after a while for other nodes.
            self._waiting.setdefault(arrival.key, []).append(arrival)
            assert self._loop is not None
            self._loop.call_later(WAIT_POLL_INTERVAL, self._wake, arrival.key)
            return
        # Let go of the callback, which holds the arrival: no cycle for the garbage collector.
        begun, arrival.begun = arrival.begun, None
        assert begun is not None
        if outcome is None:
            begun(FAILED)
        elif outcome.action == NEW:
            arrival.id = outcome.id
            self._busy[arrival.key] = arrival
            begun(None)
        else:
            begun(outcome.recorded)

    def _wake(self, key: str) -> None:
        """Arrivals waiting for ``key``'s answer go with the next write, to be decided again."""
        if self._closing:
            return
        waiting = self._waiting.pop(key, None)
        if waiting:
            self._arrivals.extend(waiting)
            self._schedule()

    def _report_failure(self, count: int, error: BaseException | None = None) -> None:
        # Driver errors may quote values (a key, a control id): the type and place only.
        summary = failures.summary(Failure(error) if error is not None else Failure())
        if not self._failing:
            self._failing = True
            log.error(
                "journal %s: writing failed (%s); messages are answered AR until it works", redact(self.url), summary
            )
        else:
            log.debug("journal: writing failed again (%s), %d entries", summary, count)

    # Life of the node

    def _spawn(self, coroutine: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_alive(self) -> None:
        """Heartbeats every few seconds, a purge of old messages every hour."""
        assert self.node is not None and self._loop is not None
        next_purge = self._loop.time()
        while True:
            try:
                await self.backend.heartbeat(self.node)
                if self._loop.time() >= next_purge:
                    next_purge = self._loop.time() + PURGE_INTERVAL
                    purged = await self.purge()
                    if purged:
                        log.info("journal: %d messages older than %s purged", purged, self.retention)
            except Exception:
                self._report_failure(0)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def purge(self, older_than: timedelta | None = None) -> int:
        """Delete messages received longer ago than ``older_than`` (the retention by default); how many."""
        await self.backend.connect()
        age = self.retention if older_than is None else older_than
        return await self.backend.purge(datetime.now(timezone.utc) - age)

    # Reading, for the journal commands

    async def pending(self) -> list[Message]:
        """Messages received and never answered (the process that had them stopped first), oldest first."""
        await self.backend.connect()
        return await self.backend.pending()

    async def answered(self, message_type: str | None = None, since: datetime | None = None) -> AsyncIterator[Message]:
        """Answered messages in the order they were first received, of one type and since a time.

        ``message_type`` ``ADT^A01`` matches MSH-9 ``ADT^A01`` (whatever its third
        component), ``ADT`` every ADT message.
        """
        await self.backend.connect()
        after = 0
        while True:
            page = await self.backend.messages(since, after, 500)
            for message in page:
                kind = message.message_type
                if message_type is None or kind == message_type or kind.startswith(message_type + "^"):
                    yield message
            if len(page) < 500:
                return
            after = page[-1].id

    async def close(self) -> None:
        """Commit what is queued, mark this node stopped, let go of the database."""
        if self._opening is None:
            await self.backend.close(None)
            return
        self._closing = True  # copies still waiting for an answer are let go: their connections are closed
        while self._arrivals or self._answers or self._beginnings or self._answerings:
            if not self._scheduled:
                self._flush()
            await asyncio.sleep(0.01)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.close(self.node)


def redact(url: str) -> str:
    """A journal URL as logs show it: without a password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, place = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{place}"


def backend_for(url: str) -> Backend:
    """The backend a URL names (no I/O yet).

    Raises:
        JournalError: an unknown scheme, or a URL without a database.
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "sqlite":
        from hl7bridge.journal.sqlite import SQLiteBackend

        return SQLiteBackend.from_url(url)
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        from hl7bridge.journal.postgres import PostgresBackend

        return PostgresBackend.from_url(url)
    raise JournalError(
        f"journal URL {redact(url)!r}: use sqlite:///relative.db, sqlite:////absolute.db or postgresql://user@host/db"
    )


def check_url(url: str) -> None:
    """Raise :class:`JournalError` if ``url`` names no journal hl7bridge can keep."""
    backend_for(url)
