"""The suite runs on Twisted's asyncio reactor (see setup.cfg's pytest options)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

#: The PostgreSQL the journal tests use; each test gets a schema of its own.
POSTGRES = os.environ.get("HL7BRIDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _hl7bridge_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hl7bridge")


def postgres_missing() -> str | None:
    """Why the journal's PostgreSQL tests cannot run here, or None if they can."""
    parts = urlsplit(POSTGRES)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2).close()
    except OSError as exc:
        return f"nothing answers at {parts.hostname}:{parts.port or 5432} (HL7BRIDGE_TEST_POSTGRES): {exc}"
    return None


def in_thread(coroutine: Any) -> Any:
    """Run a coroutine on a loop of its own in a thread: for fixtures, outside the reactor's loop."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as exc:  # handed to the caller
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def postgres_schema() -> Iterator[str]:
    """A journal URL on the test PostgreSQL in a fresh schema, dropped afterwards."""
    missing = postgres_missing()
    if missing:
        pytest.skip(missing)
    schema = f"test_{uuid.uuid4().hex[:12]}"
    yield f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}schema={schema}"

    async def drop() -> None:
        import asyncpg

        connection = await asyncpg.connect(POSTGRES)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()

    in_thread(drop())


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A journal URL of each backend: an SQLite file in tmp_path, a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/journal.db"
    else:
        yield from postgres_schema()
