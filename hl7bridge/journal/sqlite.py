"""The embedded journal: one SQLite file in WAL mode, written on threads of its own.

Two threads serve the event loop. The writer takes whatever the loop has
queued, arrivals and answers alike, and writes it in one transaction (group
commit: the longer a transaction takes, the more the next one carries), with
one statement for all its arrivals and one for all its answers. The syncer
makes committed answers durable before their ACKs are let go, and meanwhile
the writer goes on with new arrivals: a message never waits for another's
disk sync to be handled.

Durability: what ``synchronous=FULL`` gives, an ACK sent survives a power cut,
not only a killed process. FULL is ``synchronous=NORMAL`` plus a sync of the
write-ahead log after each commit, and that is how it is done here: every
transaction commits with NORMAL (it survives a killed process: the operating
system has it), and the syncer syncs the write-ahead log after a transaction
that commits answers, before their ACKs are let go; one sync covers every
transaction committed before it began. A transaction of arrivals alone is not
synced: a message whose arrival a power cut loses was never acknowledged.
``sqlite:///file.db?synchronous=normal`` leaves the sync out: ACKs then survive
a killed process but not a power cut.

The file is created readable by its owner only (0600): it holds patient data.
SQLite gives the ``-wal`` and ``-shm`` files it makes beside it the same
permissions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

from hl7bridge.journal import (
    ARRIVAL_COLUMNS,
    CLAIM,
    MESSAGE_COLUMNS,
    NEW,
    PENDING_SQL,
    REPLAY,
    SCHEMA_VERSION,
    Answered,
    Arrival,
    Existing,
    JournalError,
    Message,
    Node,
    Outcome,
    decide,
    upgrade_steps,
)

T = TypeVar("T")

# Version 1. A later version adds its statements to MIGRATIONS under its number.
SCHEMA = """
CREATE TABLE hl7bridge_journal_nodes (
    id INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL,
    stopped_at REAL
);
CREATE TABLE hl7bridge_journal_messages (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    received_at REAL NOT NULL,
    listener TEXT NOT NULL,
    peer TEXT NOT NULL,
    sending_application TEXT NOT NULL,
    sending_facility TEXT NOT NULL,
    message_type TEXT NOT NULL,
    control_id TEXT NOT NULL,
    raw BLOB NOT NULL,
    node INTEGER,
    attempts INTEGER NOT NULL DEFAULT 1,
    ack BLOB,
    ack_code TEXT,
    answered_at REAL
);
CREATE INDEX hl7bridge_journal_received ON hl7bridge_journal_messages (received_at);
CREATE INDEX hl7bridge_journal_pending ON hl7bridge_journal_messages (answered_at) WHERE answered_at IS NULL;
"""

#: Statements that take a journal from version n - 1 to n.
MIGRATIONS: dict[int, str] = {}


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def _message(row: tuple[Any, ...]) -> Message:
    received = _when(row[1])
    assert received is not None
    return Message(
        row[0], received, row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10],
        _when(row[11]), row[12], row[13],
    )  # fmt: skip


#: Rows per INSERT or UPDATE statement (SQLite before 3.32 takes at most 999 parameters).
ROWS_PER_STATEMENT = 64

# One UPDATE for many answers needs UPDATE ... FROM (SQLite 3.33).
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)

_sync = getattr(os, "fdatasync", os.fsync)


@functools.lru_cache(maxsize=ROWS_PER_STATEMENT)
def _insert(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return (
        f"INSERT INTO hl7bridge_journal_messages (id, {ARRIVAL_COLUMNS}, node) VALUES {values} "
        "ON CONFLICT (key) DO NOTHING"
    )


@functools.lru_cache(maxsize=ROWS_PER_STATEMENT)
def _update(rows: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * rows)
    return (
        "UPDATE hl7bridge_journal_messages SET ack = answer.column2, ack_code = answer.column3, answered_at = ? "
        f"FROM (VALUES {values}) AS answer "
        "WHERE hl7bridge_journal_messages.id = answer.column1 AND node = ? AND answered_at IS NULL"
    )


_UPDATE_ONE = (
    "UPDATE hl7bridge_journal_messages SET ack = ?, ack_code = ?, answered_at = ? "
    "WHERE id = ? AND node = ? AND answered_at IS NULL"
)


class _Request:
    """A begin or an answer handed to the writer, and what becomes of it."""

    __slots__ = ("answers", "arrivals", "busy", "done", "node", "result")

    def __init__(self, node: int, done: Callable[[Any], None]) -> None:
        self.node = node
        self.done = done  # called on the loop with the result, or the exception
        self.busy: set[str] = set()
        self.arrivals: list[Arrival] = []
        self.answers: list[Answered] = []
        self.result: Any = None


class _Call:
    """A function for a worker's thread to run in its turn, and its result."""

    __slots__ = ("args", "function", "future")

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.function = function
        self.args = args
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run(self) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.function(*self.args))
            except BaseException as exc:
                self.future.set_exception(exc)


class _Worker:
    """A thread of its own that takes all that is queued at once.

    Requests queued together go to ``work`` as one batch: while ``work``
    runs, what is put waits and goes with the next batch, so the slower the
    work, the bigger the batch. A function given to :meth:`call` runs alone,
    in its turn. The thread starts with the first thing put.
    """

    def __init__(self, name: str, work: Callable[[list[_Request]], None]) -> None:
        self._name = name
        self._work = work
        self._queue: queue.SimpleQueue[_Request | _Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, *requests: _Request) -> None:
        self._start()
        for request in requests:
            self._queue.put(request)

    def call(self, function: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        self._start()
        call = _Call(function, args)
        self._queue.put(call)
        return call.future

    def stop(self) -> None:
        """End the thread once what is queued is done, and wait for it."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _start(self) -> None:
        if self._thread is None:
            # A daemon: a process ending without closing its journal is a killed one, which the journal survives.
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while True:
            items = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._queue.get_nowait())
            batch: list[_Request] = []
            for item in items:
                if isinstance(item, _Request):
                    batch.append(item)
                    continue
                if batch:
                    self._work(batch)
                    batch = []
                if item is None:
                    return
                item.run()
            if batch:
                self._work(batch)


class SQLiteBackend:
    """A journal in one SQLite file, written by a thread of its own and synced by another."""

    #: No limit: the writer takes what is queued in one transaction.
    concurrency: int | None = None

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self.path = path
        self.synced = synchronous == "FULL"  # answers wait for a sync of the write-ahead log
        self._writer = _Worker("hl7bridge-journal", self._write)
        self._syncer = _Worker("hl7bridge-journal-sync", self._sync)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None
        self._wal = -1  # the write-ahead log, opened to sync it

    @classmethod
    def from_url(cls, url: str) -> SQLiteBackend:
        """``sqlite:///relative.db`` (to the current folder) or ``sqlite:////absolute/path.db``,
        with ``?synchronous=normal`` to commit answers without syncing the disk."""
        rest, _, query = url.split("://", 1)[1].partition("?")
        path = unquote(rest[1:]) if rest.startswith("/") else ""
        if not path or path == ":memory:" or path.endswith("/"):
            raise JournalError(f"journal URL {url!r}: name a file, as sqlite:///relative.db or sqlite:////abs/path.db")
        options = dict(parse_qsl(query))
        synchronous = options.pop("synchronous", "full").upper()
        if synchronous not in ("FULL", "NORMAL") or options:
            raise JournalError(f"journal URL {url!r}: the only option is synchronous=full (the default) or normal")
        return cls(path, synchronous)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._writer.call(function, *args))

    # On the writer's thread

    def _connect(self) -> None:
        if self._db is not None:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise JournalError(f"journal {self.path}: no folder {folder}")
        # Created 0600 before SQLite opens it, whatever the umask.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, cached_statements=256)
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # the sync of answers is the backend's (see above)
        try:
            with _transaction(db):
                _migrate(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        # There while a connection is open (the migration's commit wrote it);
        # its name in the folder is made durable once, as FULL would.
        self._wal = os.open(self.path + "-wal", os.O_RDONLY)
        if self.synced:
            directory = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def _register(self, host: str, pid: int) -> int:
        assert self._db is not None
        now = time.time()
        with _transaction(self._db) as db:
            cursor = db.execute(
                "INSERT INTO hl7bridge_journal_nodes (host, pid, started_at, seen_at) VALUES (?, ?, ?, ?)",
                (host, pid, now, now),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _write(self, requests: list[_Request]) -> None:
        """One transaction for a batch: its answers, then its arrivals."""
        assert self._db is not None and self._loop is not None
        try:
            with _transaction(self._db) as db:
                node = requests[0].node
                answers = [answered for request in requests for answered in request.answers]
                if answers:
                    lost = self._answer_all(db, node, answers)
                    for request in requests:
                        if request.answers:
                            request.result = lost
                arrivals = [arrival for request in requests for arrival in request.arrivals]
                if arrivals:
                    ids = iter(self._insert_all(db, node, arrivals))
                    for request in requests:
                        if request.arrivals:
                            busy = request.busy
                            request.result = [
                                self._outcome(db, node, busy, arrival, next(ids)) for arrival in request.arrivals
                            ]
        except Exception as exc:
            for request in requests:
                request.result = exc
            self._loop.call_soon_threadsafe(_deliver, requests)
            return
        now, later = requests, list[_Request]()
        if self.synced:
            # Answers, and answers sent again, only once on disk.
            now = []
            for request in requests:
                replays = request.arrivals and any(outcome.action == REPLAY for outcome in request.result)
                (later if request.answers or replays else now).append(request)
        if now:
            self._loop.call_soon_threadsafe(_deliver, now)
        if later:
            self._syncer.put(*later)

    @staticmethod
    def _answer_all(db: sqlite3.Connection, node: int, answers: list[Answered]) -> set[int | None]:
        """Write the answers; the ids of those whose message is no longer this node's."""
        now = time.time()
        written = 0
        if _UPDATE_FROM:
            for start in range(0, len(answers), ROWS_PER_STATEMENT):
                chunk = answers[start : start + ROWS_PER_STATEMENT]
                parameters: list[Any] = [now]
                for answered in chunk:
                    parameters += (answered.arrival.id, answered.ack, answered.code)
                parameters.append(node)
                written += db.execute(_update(len(chunk)), parameters).rowcount
        else:
            rows = [(answered.ack, answered.code, now, answered.arrival.id, node) for answered in answers]
            written = db.executemany(_UPDATE_ONE, rows).rowcount
        if written == len(answers):
            return set()
        # Rare (another node took a message over): which ones were written, by the time written.
        ids = {answered.arrival.id for answered in answers}
        found = db.execute(
            "SELECT id FROM hl7bridge_journal_messages WHERE id BETWEEN ? AND ? AND node = ? AND answered_at = ?",
            (min(i for i in ids if i is not None), max(i for i in ids if i is not None), node, now),
        ).fetchall()
        return ids - {row[0] for row in found}

    @staticmethod
    def _insert_all(db: sqlite3.Connection, node: int, arrivals: list[Arrival]) -> list[int | None]:
        """Insert the arrivals whose keys are free; each one's new row id, or None where its key is taken."""
        (top,) = db.execute("SELECT coalesce(max(id), 0) FROM hl7bridge_journal_messages").fetchone()
        inserted = 0
        for start in range(0, len(arrivals), ROWS_PER_STATEMENT):
            chunk = arrivals[start : start + ROWS_PER_STATEMENT]
            parameters: list[Any] = []
            for offset, arrival in enumerate(chunk, top + 1 + start):
                parameters += (offset, *arrival.values(), node)
            inserted += db.execute(_insert(len(chunk)), parameters).rowcount
        ids: list[int | None] = list(range(top + 1, top + 1 + len(arrivals)))
        if inserted < len(arrivals):
            found = {row[0] for row in db.execute("SELECT id FROM hl7bridge_journal_messages WHERE id > ?", (top,))}
            ids = [row if row in found else None for row in ids]
        return ids

    def _outcome(self, db: sqlite3.Connection, node: int, busy: set[str], arrival: Arrival, id: int | None) -> Outcome:
        """What becomes of an arrival: new (``id`` its row), or, its key being taken, :func:`decide`'s answer."""
        if id is not None:
            busy.add(arrival.key)
            return Outcome(NEW, id)
        row = db.execute(
            "SELECT id, node, ack_code, ack, answered_at FROM hl7bridge_journal_messages WHERE key = ?",
            (arrival.key,),
        ).fetchone()
        existing = Existing(row[0], row[1], row[2], row[3], row[4] is not None)
        owner = self._node(db, existing.node) if not existing.answered and existing.node is not None else None
        action = decide(existing, node, busy, arrival.key, owner)
        if action == REPLAY:
            return Outcome.replay(existing)
        if action == CLAIM:
            db.execute(
                "UPDATE hl7bridge_journal_messages SET node = ?, received_at = ?, listener = ?, peer = ?, raw = ?, "
                "message_type = ?, ack = NULL, ack_code = NULL, answered_at = NULL, attempts = attempts + 1 "
                "WHERE id = ?",
                (
                    node,
                    arrival.received,
                    arrival.listener,
                    arrival.peer,
                    arrival.raw,
                    arrival.message_type,
                    existing.id,
                ),
            )
            busy.add(arrival.key)
            return Outcome(NEW, existing.id)
        return Outcome(action)

    # On the syncer's thread

    def _sync(self, requests: list[_Request]) -> None:
        """One sync of the write-ahead log for every transaction committed before it: their answers are durable."""
        assert self._loop is not None
        try:
            _sync(self._wal)
        except Exception as exc:  # a disk error: these answers are not durable, and not sent
            for request in requests:
                request.result = exc
        self._loop.call_soon_threadsafe(_deliver, requests)

    @staticmethod
    def _node(db: sqlite3.Connection, node: int) -> Node | None:
        row = db.execute(
            "SELECT id, host, pid, seen_at, stopped_at FROM hl7bridge_journal_nodes WHERE id = ?", (node,)
        ).fetchone()
        if row is None:
            return None
        return Node(row[0], row[1], row[2], time.time() - row[3], row[4] is not None)

    def _query(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Message]:
        assert self._db is not None
        return [_message(row) for row in self._db.execute(sql, parameters).fetchall()]

    def _execute(self, sql: str, parameters: tuple[Any, ...]) -> int:
        assert self._db is not None
        with _transaction(self._db) as db:
            return db.execute(sql, parameters).rowcount

    def _close(self, node: int | None) -> None:
        if self._db is None:
            return
        if node is not None:
            with _transaction(self._db) as db:
                db.execute("UPDATE hl7bridge_journal_nodes SET stopped_at = ? WHERE id = ?", (time.time(), node))
        self._db.close()
        self._db = None
        os.close(self._wal)
        self._wal = -1

    # On the loop

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._run(self._connect)

    async def register(self, host: str, pid: int) -> int:
        return await self._run(self._register, host, pid)

    def begin(self, node: int, busy: set[str], arrivals: list[Arrival], done: Callable[[Any], None]) -> None:
        request = _Request(node, done)
        request.busy, request.arrivals = busy, arrivals
        self._writer.put(request)

    def answer(self, node: int, answers: list[Answered], done: Callable[[Any], None]) -> None:
        request = _Request(node, done)
        request.answers = answers
        self._writer.put(request)

    async def heartbeat(self, node: int) -> None:
        await self._run(
            self._execute, "UPDATE hl7bridge_journal_nodes SET seen_at = ? WHERE id = ?", (time.time(), node)
        )

    async def pending(self) -> list[Message]:
        return await self._run(self._query, PENDING_SQL)

    async def messages(self, since: datetime | None, after: int, limit: int) -> list[Message]:
        sql = (
            f"SELECT {MESSAGE_COLUMNS} FROM hl7bridge_journal_messages "
            "WHERE answered_at IS NOT NULL AND received_at >= ? AND id > ? ORDER BY id LIMIT ?"
        )
        return await self._run(self._query, sql, (since.timestamp() if since else 0.0, after, limit))

    async def purge(self, before: datetime) -> int:
        sql = "DELETE FROM hl7bridge_journal_messages WHERE received_at < ?"
        return await self._run(self._execute, sql, (before.timestamp(),))

    async def close(self, node: int | None) -> None:
        try:
            self._syncer.stop()  # no sync under way on the file closed next
            await self._run(self._close, node)
        finally:
            self._writer.stop()


def _deliver(requests: list[_Request]) -> None:
    """On the loop: each request's result, or its exception, to its callback."""
    for request in requests:
        request.done(request.result)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, rolled back if the block raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate(db: sqlite3.Connection) -> None:
    """Create the schema, or bring an older one to :data:`SCHEMA_VERSION`."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hl7bridge_journal_schema'"
    ).fetchone()
    if not exists:
        db.execute("CREATE TABLE hl7bridge_journal_schema (version INTEGER NOT NULL)")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO hl7bridge_journal_schema (version) VALUES (?)", (SCHEMA_VERSION,))
        return
    (version,) = db.execute("SELECT version FROM hl7bridge_journal_schema").fetchone()
    for step in upgrade_steps(version, MIGRATIONS):
        for statement in step.split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute("UPDATE hl7bridge_journal_schema SET version = ?", (SCHEMA_VERSION,))
