"""The suite runs on Twisted's asyncio reactor (see setup.cfg's pytest options)."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest


@pytest.fixture(autouse=True)
def _hl7bridge_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hl7bridge")


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A journal URL per backend: a SQLite file in ``tmp_path``, or :func:`postgres_url`."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'journal.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A journal URL on HL7BRIDGE_TEST_POSTGRES's database, in a schema of the test's own.

    The schema has a name of its own and is dropped afterwards; the test is
    skipped only when nothing answers at that address.
    """
    # Here, not at the top: tests.support imports twisted.internet.reactor, which pytest-twisted installs first.
    from tests.support import POSTGRES, on_postgres

    address = urlsplit(POSTGRES)
    host, port = address.hostname or "127.0.0.1", address.port or 5432
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        pytest.skip(f"no PostgreSQL answers at {host}:{port} ({exc}); set HL7BRIDGE_TEST_POSTGRES to one that does")
    schema = f"hl7bridge_test_{uuid.uuid4().hex[:16]}"
    yield f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}schema={schema}"
    on_postgres(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
