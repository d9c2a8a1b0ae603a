"""The embedded journal: one SQLite file in WAL mode, written on a thread of its own.

Durability: what ``synchronous=FULL`` gives, an ACK sent survives a power cut,
not only a killed process. FULL is ``synchronous=NORMAL`` plus a sync of the
write-ahead log after each commit, and that is how it is done here: every
transaction commits with NORMAL (it survives a killed process: the operating
system has it), and one that commits answers is followed by a sync of the
write-ahead log, after its write lock is released, before its ACKs are let go.
A transaction of arrivals alone is not synced: a message whose arrival a power
cut loses was never acknowledged.
``sqlite:///file.db?synchronous=normal`` leaves the sync out: ACKs then survive
a killed process but not a power cut.

The file is created readable by its owner only (0600): it holds patient data.
SQLite gives the ``-wal`` and ``-shm`` files it makes beside it the same
permissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

from hl7bridge.journal import (
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


class SQLiteBackend:
    """A journal in one SQLite file; every statement runs on the backend's own thread."""

    #: Writes at once: one runs on the journal's thread while the next is queued for it.
    concurrency = 2

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self.path = path
        self.synced = synchronous == "FULL"  # answers wait for a sync of the write-ahead log
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hl7bridge-journal")
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
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # On the backend's thread

    def _connect(self) -> None:
        if self._db is not None:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise JournalError(f"journal {self.path}: no folder {folder}")
        # Created 0600 before SQLite opens it, whatever the umask.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
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
        # There while a connection is open (the migration's commit wrote it).
        self._wal = os.open(self.path + "-wal", os.O_RDONLY)

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

    def _write(
        self, node: int, busy: set[str], arrivals: list[Arrival], answers: list[Answered]
    ) -> tuple[list[Outcome], set[int | None]]:
        assert self._db is not None
        lost = set()
        with _transaction(self._db) as db:
            now = time.time()
            for answered in answers:
                cursor = db.execute(
                    "UPDATE hl7bridge_journal_messages SET ack = ?, ack_code = ?, answered_at = ? "
                    "WHERE id = ? AND node = ? AND answered_at IS NULL",
                    (answered.ack, answered.code, now, answered.arrival.id, node),
                )
                if cursor.rowcount != 1:
                    lost.add(answered.arrival.id)
            outcomes = [self._begin(db, node, busy, arrival) for arrival in arrivals]
        if answers and self.synced:
            os.fsync(self._wal)  # the lock is released: other processes may write meanwhile
        return outcomes, lost

    def _begin(self, db: sqlite3.Connection, node: int, busy: set[str], arrival: Arrival) -> Outcome:
        received = arrival.received.timestamp()
        cursor = db.execute(
            "INSERT INTO hl7bridge_journal_messages (key, received_at, listener, peer, sending_application, "
            "sending_facility, message_type, control_id, raw, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO NOTHING",
            (
                arrival.key,
                received,
                arrival.listener,
                arrival.peer,
                arrival.sender,
                arrival.facility,
                arrival.message_type,
                arrival.control_id,
                arrival.raw,
                node,
            ),
        )
        if cursor.rowcount == 1:
            busy.add(arrival.key)
            return Outcome(NEW, cursor.lastrowid)
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
                (node, received, arrival.listener, arrival.peer, arrival.raw, arrival.message_type, existing.id),
            )
            busy.add(arrival.key)
            return Outcome(NEW, existing.id)
        return Outcome(action)

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
        await self._run(self._connect)

    async def register(self, host: str, pid: int) -> int:
        return await self._run(self._register, host, pid)

    def write(
        self, node: int, busy: set[str], arrivals: list[Arrival], answers: list[Answered]
    ) -> asyncio.Future[tuple[list[Outcome], set[int | None]]]:
        # The executor's future itself: no task and no coroutine per write.
        return asyncio.get_running_loop().run_in_executor(self._executor, self._write, node, busy, arrivals, answers)

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
            await self._run(self._close, node)
        finally:
            self._executor.shutdown(wait=False)


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
