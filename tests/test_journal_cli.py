"""``hl7bridge journal pending|purge`` and ``hl7bridge replay``, run as a user runs them.

Each journal is real (SQLite in the test's folder, or PostgreSQL in a schema
of the test's own) and filled by a real listener. The console script runs in
a folder outside the checkout, where the user's receivers are
(``candidate.py``), and its output must never hold message content: the
patient names of the messages below must not appear in it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sqlite3
import subprocess
import time
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import hl7bridge
from hl7bridge.cli import parse_since
from hl7bridge.client import Sender
from hl7bridge.journal import Journal
from hl7bridge.testing import asyncio_test
from tests.support import CR, FS, HOST, VT, message, on_postgres
from tests.test_cli import SCRIPT, Server, without_pythonpath

SECRET = "SECRETPATIENT"

ADMISSIONS = [message(f"ADT000{n}", body=f"PID|1||100{n}||{SECRET}^ALPHA{n}\r") for n in (1, 2, 3)]
RESULT = (
    "MSH|^~\\&|LAB|LABFAC|RECVAPP|RECVFAC|20240102030405||ORU^R01^ORU_R01|ORU0001|P|2.5\r"
    f"PID|1||2001||{SECRET}^BRAVO\r"
    "OBX|1|NM|GLU^Glucose||5.5|mmol/L\r"
)

# The user's module, imported from the folder the command runs in.
CANDIDATE = '''"""Receivers to replay a journal to."""

import asyncio

from twisted.internet import threads

from hl7bridge.receiver import AbstractHL7Receiver


class SameReceiver(AbstractHL7Receiver):
    """Answers as the live handler did, from Twisted's thread pool as a txHL7 receiver may."""

    def handleMessage(self, container):
        return threads.deferToThread(lambda: str(container.message.create_ack("AA")))


async def rejects_results(message):
    """Answers AE to every ORU."""
    kind = str(message.segment("MSH")(9)(1)(1))
    return message.create_ack("AE" if kind == "ORU" else "AA")


async def hangs(message):
    """Never answers."""
    await asyncio.Event().wait()
'''


async def accept(message: object) -> object:
    """The live handler: AA for everything."""
    return message.create_ack("AA")  # type: ignore[attr-defined]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The user's folder, outside the checkout, with the candidate receivers."""
    (tmp_path / "candidate.py").write_text(CANDIDATE)
    return tmp_path


def command(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``hl7bridge`` console script, run in ``folder``."""
    return subprocess.run(
        [SCRIPT, *args], cwd=folder, env=without_pythonpath(), capture_output=True, text=True, timeout=120
    )


async def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`command` in a thread, so that the loop goes on serving meanwhile."""
    result = await asyncio.to_thread(command, folder, *args)
    shown = result.stdout + result.stderr
    assert SECRET not in shown and "Traceback" not in shown, shown
    return result


async def fill(url: str, texts: list[str]) -> None:
    """Send ``texts`` to a listener keeping the journal at ``url``, each answered AA."""
    server = await hl7bridge.serve(accept, HOST, 0, journal=url)
    try:
        async with Sender(HOST, server.sockets[0].getsockname()[1]) as sender:
            for text in texts:
                assert "MSA|AA|" in await sender.send(text)
    finally:
        await hl7bridge.shutdown(server)


async def journaled(url: str) -> list[tuple[str, bytes | None, int]]:
    """(control id, ACK, attempts) of each answered message in the journal, in order."""
    journal = Journal(url)
    try:
        return [(found.control_id, found.ack, found.attempts) async for found in journal.answered()]
    finally:
        await journal.close()


def backdate(url: str, control_id: str, days: float) -> None:
    """Make a journaled message look received ``days`` days ago."""
    when = datetime.now(timezone.utc) - timedelta(days=days)
    if url.startswith("sqlite:"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
            sql = "UPDATE hl7bridge_journal_messages SET received_at = ? WHERE control_id = ?"
            assert db.execute(sql, (when.timestamp(), control_id)).rowcount == 1
    else:
        dsn, _, query = url.partition("?")
        schema = query.removeprefix("schema=")
        sql = f'UPDATE "{schema}".hl7bridge_journal_messages SET received_at = $1 WHERE control_id = $2'
        on_postgres(sql, when, control_id, dsn=dsn)


def table(output: str) -> dict[str, tuple[int, int, int]]:
    """The rows of a printed shadow report: message type -> (agreed, differed, failed)."""
    rows = re.findall(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", output, re.MULTILINE)
    return {kind: (int(agreed), int(differed), int(failed)) for kind, agreed, differed, failed in rows}


def test_pending_lists_what_a_killed_listener_never_answered(journal_url: str, folder: Path) -> None:
    server = Server("--receiver", "candidate.hangs", "--journal", journal_url, program=[SCRIPT], cwd=folder)
    try:
        with socket.create_connection((HOST, server.port), timeout=10) as peer:
            peer.sendall(VT + ADMISSIONS[0].encode() + FS + CR)
            deadline = time.monotonic() + 30
            while True:  # until the listener has journaled it: its handler never answers
                shown = command(folder, "journal", "pending", journal_url)
                if shown.stdout.endswith("1 message received and never answered\n"):
                    break
                assert time.monotonic() < deadline, shown
                time.sleep(0.2)
    finally:
        server.process.send_signal(signal.SIGKILL)  # as a crash leaves it: no drain, no answer
        server.process.wait(timeout=20)
        server.output.rest()
    result = command(folder, "journal", "pending", journal_url)
    assert result.returncode == 0, result.stderr
    heading, row, count = result.stdout.splitlines()
    assert heading.split() == [
        "received", "(UTC)", "listener", "peer", "type", "control", "id", "application", "facility", "attempts", "node",
    ]  # fmt: skip
    received, listener, peer, kind, control_id, application, facility, attempts, node = row.split()
    assert abs(datetime.fromisoformat(received) - datetime.now(timezone.utc)) < timedelta(minutes=5)
    assert received.endswith("+00:00")
    assert (listener, kind, control_id, application, facility, attempts) == (
        f"127.0.0.1:{server.port}", "ADT^A01", "ADT0001", "SENDAPP", "SENDFAC", "1",
    )  # fmt: skip
    assert peer.startswith("127.0.0.1:") and node.isdigit()
    assert count == "1 message received and never answered"
    assert SECRET not in result.stdout + result.stderr
    as_json = command(folder, "journal", "pending", "--json", journal_url)
    [line] = as_json.stdout.splitlines()
    fields = json.loads(line)
    assert fields["control_id"] == "ADT0001" and fields["attempts"] == 1 and fields["node"] == int(node)
    assert fields["sending_application"] == "SENDAPP" and fields["received"] == received
    assert as_json.stderr.strip() == "1 message received and never answered"


@asyncio_test
async def test_purge_deletes_the_messages_older_than_asked(journal_url: str, folder: Path) -> None:
    await fill(journal_url, ADMISSIONS)
    backdate(journal_url, "ADT0001", 10)
    backdate(journal_url, "ADT0002", 3)
    result = await run(folder, "journal", "purge", journal_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1 message received more than 7 days ago purged\n"
    assert [found[0] for found in await journaled(journal_url)] == ["ADT0002", "ADT0003"]
    result = await run(folder, "journal", "purge", journal_url, "--older-than", "2")
    assert result.stdout == "1 message received more than 2 days ago purged\n"
    assert [found[0] for found in await journaled(journal_url)] == ["ADT0003"]
    result = await run(folder, "journal", "purge", "--older-than", "0.5", journal_url)
    assert result.returncode == 0 and result.stdout == "0 messages received more than 0.5 days ago purged\n"


@asyncio_test
async def test_replay_compares_the_candidates_acks_with_the_recorded_ones(journal_url: str, folder: Path) -> None:
    await fill(journal_url, [ADMISSIONS[0], RESULT, ADMISSIONS[1]])
    before = await journaled(journal_url)
    replay = ("replay", "--journal", journal_url, "--receiver")

    same = await run(folder, *replay, "candidate.SameReceiver")
    assert same.returncode == 0, same.stdout + same.stderr
    assert table(same.stdout) == {"ADT^A01": (2, 0, 0), "ORU^R01": (1, 0, 0)}
    assert same.stdout.splitlines()[0].split() == ["message", "type", "agreed", "differed", "failed"]

    strict = await run(folder, *replay, "candidate.rejects_results")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "control id ORU0001 (ORU^R01) differed: MSA-1\n" in strict.stdout
    assert table(strict.stdout) == {"ADT^A01": (2, 0, 0), "ORU^R01": (0, 1, 0)}

    only = await run(folder, *replay, "candidate.rejects_results", "--type", "ADT")
    assert only.returncode == 0 and table(only.stdout) == {"ADT^A01": (2, 0, 0)}, only.stdout
    only = await run(folder, *replay, "candidate.rejects_results", "--type", "ORU^R01")
    assert only.returncode == 1 and table(only.stdout) == {"ORU^R01": (0, 1, 0)}, only.stdout
    only = await run(folder, *replay, "candidate.rejects_results", "--type", "ADT^A04")
    assert only.returncode == 0 and only.stdout == "no answered message in the journal matches\n"

    # The result came two days ago: since yesterday (a date, so midnight UTC), only the admissions.
    backdate(journal_url, "ORU0001", 2)
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    recent = await run(folder, *replay, "candidate.rejects_results", "--since", yesterday)
    assert recent.returncode == 0 and table(recent.stdout) == {"ADT^A01": (2, 0, 0)}, recent.stdout
    naive = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=3)
    three_days = naive.isoformat(timespec="seconds")  # a time without an offset is UTC
    recent = await run(folder, *replay, "candidate.rejects_results", "--since", three_days)
    assert recent.returncode == 1 and table(recent.stdout)["ORU^R01"] == (0, 1, 0), recent.stdout
    later = await run(folder, *replay, "candidate.SameReceiver", "--since", "2999-01-01T00:00:00Z")
    assert later.returncode == 0 and later.stdout == "no answered message in the journal matches\n"

    # Replaying sends nothing to anyone and changes nothing in the journal.
    after = await journaled(journal_url)
    assert [(found[0], found[2]) for found in after] == [("ADT0001", 1), ("ORU0001", 1), ("ADT0002", 1)]
    assert [found[1] for found in after] == [found[1] for found in before]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("journal", "pending", "mysql://127.0.0.1/journal"), r"cannot use the journal mysql://127\.0\.0\.1/journal: "),
        (
            ("journal", "purge", "sqlite:///missing.db"),
            r"cannot use the journal sqlite:///missing\.db: no journal file ",
        ),
        (
            ("replay", "--journal", "postgresql://postgres:secret@127.0.0.1:1/test"),
            r"cannot use the journal postgresql://postgres:\*\*\*@127\.0\.0\.1:1/test: \w+Error: ",
        ),
        (("replay", "--journal", "sqlite:///journal.db", "-r", "candidate.Missing"), r"cannot use receiver "),
        (("replay", "--journal", "sqlite:///journal.db", "--since", "last week"), r"hl7bridge: --since: 'last week' "),
    ],
)
def test_a_journal_or_receiver_that_cannot_be_used_is_one_line_and_status_2(
    folder: Path, args: tuple[str, ...], complaint: str
) -> None:
    sqlite3.connect(folder / "journal.db").close()
    result = command(folder, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "secret" not in result.stderr
    assert re.search(complaint, result.stderr.splitlines()[-1]), result.stderr
    if not args[-1].startswith("last"):  # a usage error shows the usage above its line
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_since_takes_iso_8601_dates_and_times_in_utc_unless_they_say() -> None:
    utc = timezone.utc
    assert parse_since("2024-01-31") == datetime(2024, 1, 31, tzinfo=utc)
    assert parse_since("2024-01-31T08:30") == datetime(2024, 1, 31, 8, 30, tzinfo=utc)
    assert parse_since("2024-01-31 08:30:00Z") == datetime(2024, 1, 31, 8, 30, tzinfo=utc)
    assert parse_since("2024-01-31T08:30:00+01:00") == datetime(2024, 1, 31, 7, 30, tzinfo=utc)
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_the_commands_give_their_version(folder: Path) -> None:
    from hl7bridge import __version__

    for args in (["journal"], ["journal", "pending"], ["journal", "purge"], ["replay"]):
        assert command(folder, *args, "--version").stdout == f"hl7bridge {__version__}\n", args
