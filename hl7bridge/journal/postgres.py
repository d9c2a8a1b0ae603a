"""A journal several listeners share: PostgreSQL, through asyncpg's connection pool.

Durability is PostgreSQL's. Answers are committed with the server's
``synchronous_commit`` (``on`` by default: on disk, and on a synchronous
standby too if one is configured) before the ACKs are sent. Arrivals are
committed with ``synchronous_commit = off``: visible to every node at once
(the unique key still decides), kept if a node is killed, and lost only if
PostgreSQL itself crashes within a fraction of a second, when the messages
concerned were not yet acknowledged. The journal's unique key
decides between nodes: of two copies of a message arriving at two listeners,
one inserts its row and is handled, the other waits for that row's answer.

The URL is a libpq URL (``postgresql://user:password@host:port/db``);
``?schema=NAME`` keeps the journal's tables in a schema of their own (created
if missing), and other query parameters go to asyncpg (``sslmode``, server
settings such as ``synchronous_commit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from hl7bridge.journal import (
    ARRIVAL_COLUMNS,
    CLAIM,
    MESSAGE_COLUMNS,
    NEW,
    PENDING_SQL,
    REPLAY,
    SCHEMA_VERSION,
    WAIT,
    Answered,
    Arrival,
    Existing,
    JournalError,
    Message,
    Node,
    Outcome,
    decide,
    redact,
    upgrade_steps,
)

T = TypeVar("T")

# Version 1. A later version adds its statements to MIGRATIONS under its number.
SCHEMA = """
CREATE TABLE hl7bridge_journal_nodes (
    id bigserial PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz
);
CREATE TABLE hl7bridge_journal_messages (
    id bigserial PRIMARY KEY,
    key text NOT NULL UNIQUE,
    received_at timestamptz NOT NULL,
    listener text NOT NULL,
    peer text NOT NULL,
    sending_application text NOT NULL,
    sending_facility text NOT NULL,
    message_type text NOT NULL,
    control_id text NOT NULL,
    raw bytea NOT NULL,
    node bigint,
    attempts integer NOT NULL DEFAULT 1,
    ack bytea,
    ack_code text,
    answered_at timestamptz
);
CREATE INDEX hl7bridge_journal_received ON hl7bridge_journal_messages (received_at);
CREATE INDEX hl7bridge_journal_pending ON hl7bridge_journal_messages (answered_at) WHERE answered_at IS NULL;
"""

#: Statements that take a journal from version n - 1 to n.
MIGRATIONS: dict[int, str] = {}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Rows are inserted, and taken rows locked, in key order: two nodes given the
# same keys in different orders (a sender retransmitting through the balancer)
# then wait for each other instead of deadlocking, which would fail both groups.
_INSERT = f"""
INSERT INTO hl7bridge_journal_messages ({ARRIVAL_COLUMNS}, node)
SELECT {ARRIVAL_COLUMNS}, $10
FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::bytea[]) AS m({ARRIVAL_COLUMNS})
ORDER BY key
ON CONFLICT (key) DO NOTHING
RETURNING id, key
"""

# Held while a node creates or migrates the journal's schema.
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('hl7bridge_journal_schema'))"

_ANSWER = """
UPDATE hl7bridge_journal_messages AS m SET ack = a.ack, ack_code = a.code, answered_at = now()
FROM unnest($1::bigint[], $2::bytea[], $3::text[]) AS a(id, ack, code)
WHERE m.id = a.id AND m.node = $4 AND m.answered_at IS NULL
RETURNING m.id
"""

_CLAIM = """
UPDATE hl7bridge_journal_messages SET node = $2, received_at = $3, listener = $4, peer = $5, raw = $6,
    message_type = $7, ack = NULL, ack_code = NULL, answered_at = NULL, attempts = attempts + 1
WHERE id = $1
"""


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def _message(row: Any) -> Message:
    return Message(*(row[column] for column in MESSAGE_COLUMNS.split(", ")))


#: The application name of the journal's connections, unless the URL gives one.
APPLICATION_NAME = "hl7bridge"

# The two kinds of write, each on connections of its own.
ANSWERS, ARRIVALS = "answers", "arrivals"

#: Begins, and answers, a node sends at once, each on a connection of its own.
WRITES_AT_ONCE = 4


class PostgresBackend:
    """A journal in a PostgreSQL database, shared by every listener given its URL."""

    #: Begins, and answers, at once (a connection each): while some groups wait
    #: for their commit, the next are sent, and PostgreSQL syncs commits that
    #: come together at once.
    concurrency: int | None = WRITES_AT_ONCE

    def __init__(self, dsn: str, schema: str | None) -> None:
        self.dsn = dsn
        self.schema = schema
        self._pool: Any = None  # heartbeats and commands
        self._writing: set[asyncio.Future[Any]] = set()
        # The writes' connections, each kept open between writes (a pool would
        # reset a connection it gets back: one more round trip per write).
        # Answers are durable before the ACK is sent; arrivals are committed
        # with synchronous_commit off.
        self._settings: dict[str, dict[str, str]] = {}
        self._idle: dict[str, list[Any]] = {ANSWERS: [], ARRIVALS: []}

    @classmethod
    def from_url(cls, url: str) -> PostgresBackend:
        """A backend for ``postgresql://...`` (``postgresql+asyncpg://`` as SQLAlchemy writes it too)."""
        parts = urlsplit(url)
        if not parts.path.strip("/"):
            raise JournalError(f"journal URL {redact(url)!r}: name the database, as postgresql://user@host/db")
        query = parse_qsl(parts.query)
        schemas = [value for name, value in query if name == "schema"]
        schema = schemas[-1] if schemas else None
        if schema is not None and not _IDENTIFIER.fullmatch(schema):
            raise JournalError(f"journal URL: schema {schema!r} is not a plain SQL name")
        rest = urlencode([(name, value) for name, value in query if name != "schema"])
        return cls(urlunsplit(("postgresql", parts.netloc, parts.path, rest, "")), schema)

    async def connect(self) -> None:
        if self._pool is not None:
            return
        try:
            import asyncpg
        except ImportError:
            raise JournalError("a PostgreSQL journal needs asyncpg: pip install 'hl7bridge[postgresql]'") from None
        settings: dict[str, str] = {}
        if "application_name=" not in self.dsn:
            settings["application_name"] = APPLICATION_NAME  # how pg_stat_activity shows the journal's connections
        if self.schema:
            settings["search_path"] = self.schema
            # The schema must exist before a pool whose search_path names it is used.
            connection = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)
            try:
                # IF NOT EXISTS does not keep two nodes starting at once from both
                # creating it: the lock makes the second wait and find it there.
                async with connection.transaction():
                    await connection.execute(_SCHEMA_LOCK)
                    await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            finally:
                await connection.close()
        pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=2, server_settings=settings, timeout=CONNECT_TIMEOUT
        )
        try:
            async with pool.acquire() as connection, connection.transaction():
                # One process at a time creates or migrates the schema.
                await connection.execute(_SCHEMA_LOCK)
                await _migrate(connection)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._settings = {ANSWERS: settings, ARRIVALS: {**settings, "synchronous_commit": "off"}}

    async def register(self, host: str, pid: int) -> int:
        node = await self._pool.fetchval(
            "INSERT INTO hl7bridge_journal_nodes (host, pid) VALUES ($1, $2) RETURNING id", host, pid
        )
        return int(node)

    def begin(self, node: int, busy: set[str], arrivals: list[Arrival], done: Callable[[Any], None]) -> None:
        self._spawn(self._begin(node, busy, arrivals), done)

    def answer(self, node: int, answers: list[Answered], done: Callable[[Any], None]) -> None:
        self._spawn(self._answer(node, answers), done)

    def _spawn(self, write: Coroutine[Any, Any, Any], done: Callable[[Any], None]) -> None:
        task = asyncio.ensure_future(write)
        self._writing.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(functools.partial(self._written, done))

    def _written(self, done: Callable[[Any], None], task: asyncio.Future[Any]) -> None:
        self._writing.discard(task)
        done(asyncio.CancelledError() if task.cancelled() else task.exception() or task.result())

    async def _answer(self, node: int, answers: list[Answered]) -> set[int | None]:
        if not answers:
            return set()
        ids = [answered.arrival.id for answered in answers]
        acks = [answered.ack for answered in answers]
        codes = [answered.code for answered in answers]
        async with self._connection(ANSWERS) as connection:
            written = await _retried(lambda: connection.fetch(_ANSWER, ids, acks, codes, node))
        return set(ids) - {row["id"] for row in written}

    async def _begin(self, node: int, busy: set[str], arrivals: list[Arrival]) -> list[Outcome]:
        if not arrivals:
            return []
        columns = [list(column) for column in zip(*(arrival.values() for arrival in arrivals), strict=True)]
        columns[1] = [_utc(seconds) for seconds in columns[1]]  # received_at
        async with self._connection(ARRIVALS) as connection:
            rows = await _retried(lambda: connection.fetch(_INSERT, *columns, node))
            inserted = {row["key"]: row["id"] for row in rows}
            # Keys inserted by another transaction, and keys that came twice in this group.
            counts = Counter(arrival.key for arrival in arrivals)
            taken = [key for key, count in counts.items() if key not in inserted or count > 1]
            if not taken:
                return [Outcome(NEW, inserted[arrival.key]) for arrival in arrivals]

            async def decide_all() -> list[Outcome]:
                # Copies: a try that PostgreSQL aborted must leave them as they were.
                async with connection.transaction():
                    return await self._decide(connection, node, set(busy), arrivals, dict(inserted), taken)

            return await _retried(decide_all)

    async def _decide(
        self,
        connection: Any,
        node: int,
        busy: set[str],
        arrivals: list[Arrival],
        inserted: dict[str, int],
        taken: list[str],
    ) -> list[Outcome]:
        """Outcomes for a group with keys already taken: the rows locked, claims made, in one transaction."""
        rows: dict[str, Existing] = {}
        owners: dict[int, Node] = {}
        for row in await connection.fetch(
            "SELECT id, key, node, ack_code, ack, answered_at IS NOT NULL AS answered "
            "FROM hl7bridge_journal_messages WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE",
            taken,
        ):
            rows[row["key"]] = Existing(row["id"], row["node"], row["ack_code"], row["ack"], row["answered"])
        nodes = [row.node for row in rows.values() if row.node is not None and not row.answered]
        for row in await connection.fetch(
            "SELECT id, host, pid, extract(epoch FROM now() - seen_at)::float8 AS idle, stopped_at IS NOT NULL "
            "AS stopped FROM hl7bridge_journal_nodes WHERE id = ANY($1::bigint[])",
            nodes,
        ):
            owners[row["id"]] = Node(row["id"], row["host"], row["pid"], row["idle"], row["stopped"])
        outcomes = []
        for arrival in arrivals:
            key = arrival.key
            new = inserted.pop(key, None)
            if new is not None:
                busy.add(key)
                outcomes.append(Outcome(NEW, new))
                continue
            existing = rows.get(key)
            if existing is None:
                outcomes.append(Outcome(WAIT))  # purged meanwhile: tried again shortly
                continue
            action = decide(existing, node, busy, key, owners.get(existing.node) if existing.node else None)
            if action == REPLAY:
                outcomes.append(Outcome.replay(existing))
            elif action == CLAIM:
                await connection.execute(
                    _CLAIM,
                    existing.id,
                    node,
                    _utc(arrival.received),
                    arrival.listener,
                    arrival.peer,
                    arrival.raw,
                    arrival.message_type,
                )
                existing.node, existing.answered = node, False
                busy.add(key)
                outcomes.append(Outcome(NEW, existing.id))
            else:
                outcomes.append(Outcome(action))
        return outcomes

    async def heartbeat(self, node: int) -> None:
        await self._pool.execute("UPDATE hl7bridge_journal_nodes SET seen_at = now() WHERE id = $1", node)

    async def pending(self) -> list[Message]:
        rows = await self._pool.fetch(PENDING_SQL)
        return [_message(row) for row in rows]

    async def messages(self, since: datetime | None, after: int, limit: int) -> list[Message]:
        rows = await self._pool.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM hl7bridge_journal_messages WHERE answered_at IS NOT NULL "
            "AND ($1::timestamptz IS NULL OR received_at >= $1) AND id > $2 ORDER BY id LIMIT $3",
            since,
            after,
            limit,
        )
        return [_message(row) for row in rows]

    async def purge(self, before: datetime) -> int:
        status = await self._pool.execute("DELETE FROM hl7bridge_journal_messages WHERE received_at < $1", before)
        return int(status.split()[-1])

    @contextlib.asynccontextmanager
    async def _connection(self, kind: str) -> AsyncIterator[Any]:
        """A connection for ``kind`` of write: one kept open, or a new one (the first writes, or one was lost)."""
        import asyncpg

        idle = self._idle[kind]
        while idle and idle[-1].is_closed():
            idle.pop()  # lost: PostgreSQL restarted, or ended the session
        if idle:
            connection = idle.pop()
        else:
            connection = await asyncpg.connect(self.dsn, server_settings=self._settings[kind], timeout=CONNECT_TIMEOUT)
        try:
            yield connection
        finally:
            if not connection.is_closed():
                idle.append(connection)

    async def close(self, node: int | None) -> None:
        if self._pool is None:
            return
        for idle in self._idle.values():
            for connection in idle:
                await connection.close()
            idle.clear()
        try:
            if node is not None:
                await self._pool.execute("UPDATE hl7bridge_journal_nodes SET stopped_at = now() WHERE id = $1", node)
        finally:
            await self._pool.close()
            self._pool = None


#: Seconds to wait for PostgreSQL to accept a connection.
CONNECT_TIMEOUT = 10.0

#: Tries of a statement (or transaction) that PostgreSQL aborted to break a deadlock.
DEADLOCK_TRIES = 3


async def _retried(write: Callable[[], Awaitable[T]]) -> T:
    """``write()``, again if PostgreSQL chose it to break a deadlock (it then wrote nothing).

    Rows are taken in key order, but an answer's UPDATE and another node's
    arrivals may still lock two rows in opposite orders.
    """
    import asyncpg

    for _ in range(DEADLOCK_TRIES - 1):
        try:
            return await write()
        except asyncpg.DeadlockDetectedError:
            continue
    return await write()


async def _migrate(connection: Any) -> None:
    """Create the schema, or bring an older one to :data:`SCHEMA_VERSION`."""
    exists = await connection.fetchval("SELECT to_regclass('hl7bridge_journal_schema') IS NOT NULL")
    if not exists:
        await connection.execute("CREATE TABLE hl7bridge_journal_schema (version integer NOT NULL)")
        await connection.execute(SCHEMA)
        await connection.execute("INSERT INTO hl7bridge_journal_schema (version) VALUES ($1)", SCHEMA_VERSION)
        return
    version = await connection.fetchval("SELECT version FROM hl7bridge_journal_schema")
    for step in upgrade_steps(version, MIGRATIONS):
        await connection.execute(step)
    await connection.execute("UPDATE hl7bridge_journal_schema SET version = $1", SCHEMA_VERSION)
