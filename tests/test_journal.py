"""The message journal on both backends (SQLite, PostgreSQL) and both faces.

ACK after commit, retransmissions answered once, a copy in flight waits for the
first, errors retried, what is not journaled, what happens when the journal
cannot be written, and the settings that name it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hl7bridge import ack
from hl7bridge.journal import Arrival, Journal, JournalError, Message, Recorded, parse_key, redact
from hl7bridge.receiver import AbstractHL7Receiver, MessageContainer
from hl7bridge.session import Settings
from hl7bridge.testing import asyncio_test
from tests.support import ENGINES, FACES, Peer, frame, listening, message, msa, on_postgres
from tests.test_cli import SCRIPT, Server, mllp_send

SECRET = "PID|1||90210||JOURNALSECRET^PATIENT\r"


class Counting(AbstractHL7Receiver):
    """ACKs every message (or what ``answers`` says for its control id) and counts what it handles."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.handled: list[str] = []
        self.answers = answers or {}
        self.gate: asyncio.Event | None = None

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        control_id = container.message.segment("MSH")[10][0]
        self.handled.append(control_id)
        codes = self.answers.get(control_id)
        code = codes.pop(0) if codes else "AA"
        if self.gate is None:
            return container.ack(code)
        return self._later(container, code)

    async def _later(self, container: MessageContainer, code: str) -> Any:
        assert self.gate is not None
        await self.gate.wait()
        return container.ack(code)


def text(control_id: str) -> str:
    return message(control_id, body=SECRET)


async def journaled(url: str) -> dict[str, Message]:
    """What the journal holds, answered or not, by control id (read through a journal of its own)."""
    journal = Journal(url)
    try:
        answered = [entry async for entry in journal.answered()]
        return {entry.control_id: entry for entry in [*answered, *await journal.pending()]}
    finally:
        await journal.close()


def no_content_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert "JOURNALSECRET" not in record.getMessage()
        assert "90210" not in record.getMessage()


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_a_retransmission_gets_the_same_ack_and_the_handler_does_not_run(
    face: str, journal_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Counting()
    async with listening(face, receiver, journal=journal_url, metrics=True) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(text("J1").encode()))
        first = await peer.reply()
        await peer.send(frame(text("J1").encode()) + frame(text("J2").encode()))
        again, other = await peer.replies(2)
        await peer.close()
        # Another connection, as a sender that reconnected.
        peer = await Peer.connect(port)
        await peer.send(frame(text("J1").encode()))
        third = await peer.reply()
        await peer.close()
        metrics = ENGINES[port].metrics
        assert metrics is not None
        assert metrics.retransmissions["ADT^A01"] == 2
    assert first == again == third
    assert msa(first.decode())[1:] == ["AA", "J1"]
    assert msa(other.decode())[1:] == ["AA", "J2"]
    assert receiver.handled == ["J1", "J2"]
    rows = await journaled(journal_url)
    assert rows["J1"].ack == first and rows["J1"].code == "AA" and rows["J1"].attempts == 1
    assert rows["J1"].raw == text("J1").encode()
    assert (rows["J1"].sender, rows["J1"].facility, rows["J1"].message_type) == ("SENDAPP", "SENDFAC", "ADT^A01")
    lines = [r.getMessage() for r in caplog.records if "answered from the journal" in r.getMessage()]
    assert len(lines) == 2 and all("control id J1" in line for line in lines)
    no_content_logged(caplog)


@asyncio_test
async def test_every_ack_is_in_the_journal_when_the_sender_reads_it(journal_url: str) -> None:
    receiver = Counting()
    async with listening("asyncio", receiver, journal=journal_url) as port:
        peers = [await Peer.connect(port) for _ in range(4)]
        for number, peer in enumerate(peers):
            # Pipelined: each connection has five messages in flight.
            await peer.send(b"".join(frame(text(f"C{number}-{n}").encode()) for n in range(5)))
        for number, peer in enumerate(peers):
            for n in range(5):
                reply = await peer.reply()
                # Read from the journal the moment the ACK is read: it was committed first.
                rows = await journaled(journal_url)
                assert rows[f"C{number}-{n}"].ack == reply
            await peer.close()
    assert len(receiver.handled) == 20


@pytest.mark.parametrize("face", FACES)
@asyncio_test
async def test_a_copy_arriving_while_the_first_is_handled_waits_for_its_ack(face: str, journal_url: str) -> None:
    receiver = Counting()
    receiver.gate = asyncio.Event()
    async with listening(face, receiver, journal=journal_url) as port:
        first, second = await Peer.connect(port), await Peer.connect(port)
        await first.send(frame(text("W1").encode()))
        await asyncio.sleep(0.3)
        await second.send(frame(text("W1").encode()))
        await second.no_reply(0.5)  # it waits: the first copy has no answer yet
        receiver.gate.set()
        replies = [await first.reply(), await second.reply()]
        await first.close()
        await second.close()
    assert replies[0] == replies[1]
    assert receiver.handled == ["W1"]


@asyncio_test
async def test_errors_are_not_replayed_a_retransmission_is_handled_again(journal_url: str) -> None:
    receiver = Counting({"E1": ["AE", "AA"]})
    async with listening("asyncio", receiver, journal=journal_url) as port:
        peer = await Peer.connect(port)
        codes = []
        for _ in range(3):
            await peer.send(frame(text("E1").encode()))
            codes.append(msa((await peer.reply()).decode())[1])
        await peer.close()
    # AE: the sender may send it again, and it is handled again; then AA is kept.
    assert codes == ["AE", "AA", "AA"]
    assert receiver.handled == ["E1", "E1"]
    rows = await journaled(journal_url)
    assert rows["E1"].code == "AA" and rows["E1"].attempts == 2


@asyncio_test
async def test_messages_that_cannot_be_keyed_are_answered_as_without_a_journal(journal_url: str) -> None:
    receiver = Counting()
    no_type = "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20260101|||NT1|P|2.5\r"
    no_id = "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20260101||ADT^A01|||P|2.5\r"
    async with listening("asyncio", receiver, journal=journal_url) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(no_type.encode()) + frame(no_id.encode()) + frame(text("K1").encode()))
        refused, accepted = await peer.replies(2)
        await peer.no_reply(0.2)
        await peer.close()
    assert msa(refused.decode())[1:3] == ["AR", "NT1"]
    assert msa(accepted.decode())[1:3] == ["AA", "K1"]
    assert list(await journaled(journal_url)) == ["K1"]


@asyncio_test
async def test_a_journal_that_cannot_be_written_gets_ar_and_nothing_is_acked(
    journal_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Counting()
    async with listening("asyncio", receiver, journal=journal_url) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(text("F1").encode()))
        assert msa((await peer.reply()).decode())[1] == "AA"
        await drop_messages_table(journal_url)
        for number in range(2, 4):
            await peer.send(frame(text(f"F{number}").encode()))
            reply = (await peer.reply()).decode()
            assert msa(reply)[1:3] == ["AR", f"F{number}"]
            assert ack.JOURNAL_UNAVAILABLE.text in reply
        await peer.close()
    assert receiver.handled == ["F1"]  # nothing is handled that cannot be journaled
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "writing failed" in r.getMessage()]
    assert len(failures) == 1, failures  # logged once, not per message
    no_content_logged(caplog)


async def drop_messages_table(url: str) -> None:
    if url.startswith("sqlite"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        db.execute("DROP TABLE hl7bridge_journal_messages")
        db.commit()
        db.close()
        return
    import asyncpg

    dsn, schema = url.split("?schema=")
    connection = await asyncpg.connect(dsn)
    await connection.execute(f'DROP TABLE "{schema}".hl7bridge_journal_messages')
    await connection.close()


@asyncio_test
async def test_purge_removes_what_is_older_than_the_retention(journal_url: str) -> None:
    async with listening("asyncio", Counting(), journal=journal_url) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(text("P1").encode()))
        await peer.reply()
        await peer.close()
    journal = Journal(journal_url, retention_days=1)
    try:
        assert await journal.pending() == []
        assert await journal.purge() == 0  # received just now: kept
        assert await journal.purge(timedelta(0)) == 1
    finally:
        await journal.close()
    assert await journaled(journal_url) == {}


@asyncio_test
async def test_the_sqlite_journal_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        url = f"sqlite:///{tmp_path}/private.db"
        async with listening("asyncio", Counting(), journal=url) as port:
            peer = await Peer.connect(port)
            await peer.send(frame(text("M1").encode()))
            await peer.reply()
            await peer.close()
            files = sorted(tmp_path.glob("private.db*"))
            assert [path.name for path in files] == ["private.db", "private.db-shm", "private.db-wal"]
            for path in files:
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        os.umask(old)


@asyncio_test
async def test_a_journal_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/new.db"
    journal = Journal(url)
    await journal.open()
    await journal.close()
    db = sqlite3.connect(tmp_path / "new.db")
    db.execute("UPDATE hl7bridge_journal_schema SET version = 99")
    db.commit()
    db.close()
    journal = Journal(url)
    with pytest.raises(JournalError, match="schema version 99"):
        await journal.open()
    await journal.close()


def test_settings_name_what_is_wrong_with_a_journal() -> None:
    with pytest.raises(ValueError, match=r"^journal URL 'mysql://db/x'"):
        Settings(journal="mysql://db/x")
    with pytest.raises(ValueError, match="name a file"):
        Settings(journal="sqlite://")
    with pytest.raises(ValueError, match="the only option is synchronous"):
        Settings(journal="sqlite:///j.db?synchronous=off")
    with pytest.raises(ValueError, match="name the database"):
        Settings(journal="postgresql://postgres@127.0.0.1:5432")
    with pytest.raises(ValueError, match=r"^journal_key it must hold MSH-10"):
        Settings(journal="sqlite:///j.db", journal_key="MSH-3,MSH-4")
    with pytest.raises(ValueError, match=r"^journal_key 'PID-3' is not an MSH field"):
        Settings(journal_key="MSH-10,PID-3")
    with pytest.raises(ValueError, match=r"^journal_retention"):
        Settings(journal_retention=0)
    assert parse_key("msh-10, MSH-3 ,MSH-3") == (10, 3)
    assert redact("postgresql://hl7:s3cret@db:5432/j") == "postgresql://hl7:***@db:5432/j"


@asyncio_test
async def test_a_key_of_other_fields_tells_messages_apart_by_them(journal_url: str) -> None:
    receiver = Counting()
    other_sender = text("K9").replace("SENDAPP", "OTHERAPP")
    async with listening("asyncio", receiver, journal=journal_url, journal_key="MSH-10") as port:
        peer = await Peer.connect(port)
        await peer.send(frame(text("K9").encode()) + frame(other_sender.encode()))
        first, second = await peer.replies(2)
        await peer.close()
    # Keyed by MSH-10 alone, the second sender's K9 is taken for a retransmission.
    assert first == second and receiver.handled == ["K9"]
    # The key is the field's text as it is (as journals written before keep it), not split up.
    header = ack.read_header(text("K9"))
    assert header is not None
    assert Journal(journal_url, key="MSH-10").key_of(header) == "K9"
    assert Journal(journal_url, key="MSH-10,MSH-3").key_of(header) == "K9\x1fSENDAPP"


def test_serve_keeps_a_journal_next_to_where_it_runs(tmp_path: Path) -> None:
    message_file = tmp_path / "message.hl7"
    message_file.write_bytes(frame(message("CLI0001", body="PID|1||55501||TESTPERSON^SECRET\r").encode()))
    server = Server("--journal", "sqlite:///interface.db", program=(SCRIPT,), cwd=tmp_path)
    try:
        first = mllp_send(server.port, message_file)
        second = mllp_send(server.port, message_file)
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert "MSA|AA|CLI0001" in first.replace("\r", "\n") and first == second
    assert (tmp_path / "interface.db").exists()
    log = "".join(server.log)
    assert "retransmission of control id CLI0001 answered from the journal" in log
    assert "TESTPERSON" not in log and "Traceback" not in log


def test_serve_stops_with_one_line_when_the_journal_cannot_be_opened(tmp_path: Path) -> None:
    result = subprocess.run(
        [SCRIPT, "serve", "--endpoint", "tcp:0:interface=127.0.0.1", "--journal", "postgresql://nobody@127.0.0.1:1/x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "cannot open the journal" in line]
    assert len(lines) == 1 and "postgresql://nobody@127.0.0.1:1/x" in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_journal_url_it_cannot_use(tmp_path: Path) -> None:
    result = subprocess.run(
        [SCRIPT, "serve", "--journal", "oracle://db/x"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--journal URL 'oracle://db/x'" in result.stderr


@asyncio_test
async def test_an_sqlite_journal_may_trade_power_cut_safety_for_speed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fast.db?synchronous=normal"
    receiver = Counting()
    async with listening("asyncio", receiver, journal=url) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(text("N1").encode()))
        first = await peer.reply()
        await peer.send(frame(text("N1").encode()))
        assert await peer.reply() == first
        await peer.close()
    assert receiver.handled == ["N1"]
    assert (await journaled(url))["N1"].ack == first


@asyncio_test
async def test_nodes_starting_at_once_on_a_new_schema_all_open(postgres_url: str) -> None:
    # The first start of several nodes (a deployment, a restart of all): each creates the schema if missing.
    for attempt in range(5):
        url = postgres_url.replace("schema=", f"schema=a{attempt}_")
        journals = [Journal(url) for _ in range(4)]
        try:
            await asyncio.gather(*(journal.open() for journal in journals))
            assert len({journal.node for journal in journals}) == 4
        finally:
            for journal in journals:
                await journal.close()
            on_postgres(f'DROP SCHEMA IF EXISTS "{url.split("schema=")[1]}" CASCADE')


@asyncio_test
async def test_a_journal_that_cannot_be_opened_yet_is_tried_again(tmp_path: Path) -> None:
    # MLLPFactory opens its journal at the first message: the folder is not there yet.
    url = f"sqlite:///{tmp_path}/later/journal.db"
    receiver = Counting()
    async with listening("twisted", receiver, journal=url) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(text("O1").encode()))
        assert msa((await peer.reply()).decode())[1:3] == ["AR", "O1"]
        (tmp_path / "later").mkdir()
        await peer.send(frame(text("O1").encode()))
        assert msa((await peer.reply()).decode())[1:3] == ["AA", "O1"]
        await peer.close()
    assert receiver.handled == ["O1"]


def arrival(journal: Journal, control_id: str) -> Arrival:
    raw = text(control_id).encode()
    header = ack.read_header(raw.decode("latin-1"))
    assert header is not None
    key = journal.key_of(header)
    assert key is not None
    return Arrival(key, header, raw, "tcp:2575", "127.0.0.1:40000")


def begin_at_once(journal: Journal, arrivals: list[Arrival]) -> list[asyncio.Future[Recorded | None]]:
    """Begin every arrival in one turn of the loop (one group); each one's outcome, when it comes."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Recorded | None]] = [loop.create_future() for _ in arrivals]
    for entry, future in zip(arrivals, futures, strict=True):
        journal.begin(entry, future.set_result)
    return futures


async def answer_at_once(journal: Journal, answers: list[tuple[Arrival, bytes, str]]) -> list[bool]:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[bool]] = [loop.create_future() for _ in answers]
    for (entry, ack_bytes, code), future in zip(answers, futures, strict=True):
        journal.answer(entry, ack_bytes, code, future.set_result)
    return await asyncio.gather(*futures)


@asyncio_test
async def test_one_group_of_new_keys_copies_and_answered_keys_gets_each_its_outcome(journal_url: str) -> None:
    # More than one statement's worth of rows, new keys mixed with keys already
    # taken: answered AA (sent again), answered AE (handled again), in flight
    # (waits), and a key that comes twice in the group (the second waits).
    journal = Journal(journal_url)
    await journal.open()
    try:
        accepted, failed, busy = (arrival(journal, name) for name in ("G-AA", "G-AE", "G-BUSY"))
        assert await asyncio.gather(*begin_at_once(journal, [accepted, failed, busy])) == [None, None, None]
        assert await answer_at_once(journal, [(accepted, b"ACK-AA", "AA"), (failed, b"ACK-AE", "AE")]) == [True] * 2
        new = [arrival(journal, f"G{number:03}") for number in range(150)]
        twice = arrival(journal, "G-TWICE")
        copies = [arrival(journal, name) for name in ("G-AA", "G-AE", "G-BUSY", "G-TWICE")]
        group = [*new[:70], copies[0], twice, copies[1], *new[70:], copies[2], copies[3]]
        futures = dict(zip(map(id, group), begin_at_once(journal, group), strict=True))
        waiting = [futures[id(copies[2])], futures[id(copies[3])]]
        settled = [futures[id(entry)] for entry in [*new, twice, copies[0], copies[1]]]
        outcomes = await asyncio.gather(*settled)
        assert outcomes[:-2] == [None] * 151  # the new keys, and the first of the two copies in the group
        assert outcomes[-2] == Recorded(b"ACK-AA", "AA")
        assert outcomes[-1] is None  # AE: handled again, in the row it had
        assert copies[1].id == failed.id
        ids = [entry.id for entry in [*new, twice]]
        assert None not in ids and len(set(ids)) == len(ids)
        assert not any(future.done() for future in waiting)
        written = await answer_at_once(journal, [(entry, f"ACK-{entry.control_id}".encode(), "AA") for entry in new])
        assert written == [True] * 150
        await answer_at_once(journal, [(busy, b"ACK-BUSY", "AA"), (twice, b"ACK-TWICE", "AA")])
        assert await asyncio.wait_for(asyncio.gather(*waiting), 5) == [
            Recorded(b"ACK-BUSY", "AA"),
            Recorded(b"ACK-TWICE", "AA"),
        ]
    finally:
        await journal.close()
    held = await journaled(journal_url)
    assert held["G042"].ack == b"ACK-G042" and held["G149"].code == "AA"
    assert held["G-AE"].ack is None and held["G-AE"].attempts == 2  # taken again, not answered yet
    assert len(held) == 150 + 4


@asyncio_test
async def test_an_answer_sent_again_goes_no_sooner_than_the_answer_it_repeats(tmp_path: Path) -> None:
    # A copy begun in the same group as its first copy's answer finds that
    # answer written, not yet on disk: it is sent again only once it is.
    journal = Journal(f"sqlite:///{tmp_path}/order.db")
    await journal.open()
    try:
        first = arrival(journal, "ORDER1")
        await begin_at_once(journal, [first])[0]
        events: list[str] = []
        committed = asyncio.get_running_loop().create_future()

        def on_committed(written: bool) -> None:
            events.append("committed")
            committed.set_result(written)

        journal.answer(first, b"ACK-ORDER1", "AA", on_committed)
        copy = begin_at_once(journal, [arrival(journal, "ORDER1")])[0]
        copy.add_done_callback(lambda _: events.append("sent again"))
        assert await copy == Recorded(b"ACK-ORDER1", "AA")
        assert await committed is True
        assert events == ["committed", "sent again"]
    finally:
        await journal.close()


@asyncio_test
async def test_an_answer_whose_message_another_node_took_over_is_not_sent(journal_url: str) -> None:
    first, second = Journal(journal_url), Journal(journal_url)
    await first.open()
    await second.open()
    try:
        mine = arrival(first, "TAKEN1")
        others = [arrival(first, f"KEPT{number}") for number in range(3)]
        assert await asyncio.gather(*begin_at_once(first, [mine, *others])) == [None] * 4
        await stop_node(journal_url, first.node)  # as if it had stopped: its messages may be taken over
        assert await begin_at_once(second, [arrival(second, "TAKEN1")])[0] is None
        written = await answer_at_once(first, [(entry, b"ACK", "AA") for entry in [*others, mine]])
        assert written == [True, True, True, False]
    finally:
        await first.close()
        await second.close()


async def stop_node(url: str, node: int | None) -> None:
    if url.startswith("sqlite"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        db.execute("UPDATE hl7bridge_journal_nodes SET stopped_at = 0 WHERE id = ?", (node,))
        db.commit()
        db.close()
        return
    import asyncpg

    dsn, schema = url.split("?schema=")
    connection = await asyncpg.connect(dsn)
    await connection.execute(f'UPDATE "{schema}".hl7bridge_journal_nodes SET stopped_at = now() WHERE id = $1', node)
    await connection.close()


class Headers(AbstractHL7Receiver):
    """ACKs every message, keeping the sending facility its handler saw."""

    def __init__(self) -> None:
        self.facilities: list[str] = []

    def handleMessage(self, container: MessageContainer) -> Any:  # noqa: N802
        self.facilities.append(str(container.message.segment("MSH")[4]))
        return container.ack()


@asyncio_test
async def test_a_journaled_message_with_letters_beyond_ascii_in_its_msh_is_read_as_declared(journal_url: str) -> None:
    # The journal keys a message by its MSH as it arrives; the handler and the
    # ACK read it decoded as the message declares (UTF-8 here), not as it was keyed.
    receiver = Headers()
    body = message("UTF1").replace("SENDFAC", "HÔPITAL").replace("|P|2.5\r", "|P|2.5|||||UNICODE UTF-8\r", 1)
    async with listening("asyncio", receiver, journal=journal_url) as port:
        peer = await Peer.connect(port)
        await peer.send(frame(body.encode("utf-8")))
        reply = (await peer.reply()).decode("utf-8")
        await peer.close()
    assert receiver.facilities == ["HÔPITAL"]
    assert reply.split("\r")[0].split("|")[5] == "HÔPITAL"  # MSH-6 of the ACK: the sender's facility
    assert msa(reply)[1:3] == ["AA", "UTF1"]


def test_the_sqlite_writer_takes_what_was_queued_meanwhile_in_one_batch() -> None:
    # Group commit: while one transaction is written, what comes waits and goes in the next one.
    from hl7bridge.journal.sqlite import _Request, _Worker

    batches: list[int] = []
    started, gate = threading.Event(), threading.Event()

    def work(batch: list[_Request]) -> None:
        batches.append(len(batch))
        started.set()
        assert gate.wait(5)

    worker = _Worker("hl7bridge-test", work)
    worker.put(_Request(1, print))
    assert started.wait(5)
    worker.put(*(_Request(1, print) for _ in range(5)))
    called = worker.call(lambda: list(batches))  # in its turn: after the five, before the last
    worker.put(_Request(1, print))
    gate.set()
    assert called.result(5) == [1, 5]
    worker.stop()
    assert batches == [1, 5, 1]


@asyncio_test
async def test_connections_postgresql_cut_are_replaced_without_failing_a_message(postgres_url: str) -> None:
    # A PostgreSQL restart, or an administrator ending sessions: the node opens new connections.
    name = f"hl7bridge-test-{os.getpid()}"
    url = f"{postgres_url}&application_name={name}"
    receiver = Counting()
    async with listening("asyncio", receiver, journal=url) as port:
        peers = [await Peer.connect(port) for _ in range(8)]
        for round_ in range(3):
            # Several at once: several connections in use, then kept.
            for number, peer in enumerate(peers):
                await peer.send(frame(text(f"CUT{round_}-{number}").encode()))
            replies = [msa((await peer.reply()).decode())[1] for peer in peers]
            assert replies == ["AA"] * 8, replies
            if round_ < 2:
                on_postgres("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", name)
                await asyncio.sleep(0.5)
        for peer in peers:
            await peer.close()
    assert len(receiver.handled) == 24
