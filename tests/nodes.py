"""Real ``hl7bridge serve --journal`` processes for the journal's crash and cluster tests.

A node runs the console script from a folder outside the checkout, with a
receiver module written into that folder (:data:`RECEIVER`): it answers AA and
records each message it handles, with the control id of the ACK it built, by
appending a line to a file of its own (fsynced, so a ``kill -9`` right after
cannot take the line back). The tests compare those files, what the senders
got, and what the journal holds.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hl7bridge.journal import Journal, Message
from tests.cases import CR, FS, VT
from tests.test_docs import Lines

HOST = "127.0.0.1"
# The console script, run as a user runs it.
SCRIPT = str(Path(sys.executable).with_name("hl7bridge"))

# Made-up patient data: no log line may carry it.
PATIENT = "TESTPATIENT^JOURNAL"

RECEIVER = '''\
"""Answers AA; records each message it handles before it answers (kill -9 cannot undo a written line)."""

import asyncio
import os
import random

from hl7bridge.ack import read_header
from hl7bridge.receiver import AbstractHL7Receiver

_HANDLED = os.open(os.environ["HANDLED_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
_DELAY = float(os.environ.get("HANDLER_DELAY", "0"))
_random = random.Random(os.getpid())


class Recording(AbstractHL7Receiver):
    async def handleMessage(self, container):
        answer = container.ack()
        line = f"{container.header.control_id} {read_header(answer).control_id}\\n"
        os.write(_HANDLED, line.encode())
        os.fsync(_HANDLED)
        if _DELAY:
            await asyncio.sleep(_random.uniform(0, _DELAY))
        return answer
'''


def write_app(folder: Path) -> Path:
    """A project folder (outside the checkout) with the recording receiver module."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "journalreceiver.py").write_text(RECEIVER)
    return folder


def message(control_id: str) -> bytes:
    """A small ADT^A01 with this control id (MSH-3 and MSH-4 fixed: the control id makes the key)."""
    return (
        f"MSH|^~\\&|JRNLSEND|JRNLFAC|JRNLRECV|JRNLFAC|20240102030405||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
        f"PID|1||000001^^^TEST||{PATIENT}\r"
    ).encode()


def msa(ack: bytes) -> list[str]:
    """MSA-1 and MSA-2 of an ACK."""
    for segment in ack.decode().split("\r"):
        if segment.startswith("MSA|"):
            return segment.split("|")[1:3]
    raise AssertionError(f"no MSA segment in {ack!r}")


def ack_control_id(ack: bytes) -> str:
    """MSH-10 of an ACK: a fresh id per ACK built, so it tells which handling built it."""
    return ack.decode().split("\r", 1)[0].split("|")[9]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def without_pythonpath() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


_STARTED = re.compile(r"serving \S+ on 127\.0\.0\.1:(?P<port>\d+)|journal \S+ open \(node (?P<node>\d+)\)")


# Every node process started: none outlives the test run, whatever a failing test left.
_LIVE: list[subprocess.Popen[str]] = []


@atexit.register
def _kill_left_nodes() -> None:
    for process in _LIVE:
        if process.poll() is None:
            process.kill()


class Node:
    """``hl7bridge serve --journal URL`` with the recording receiver; started once its journal is open."""

    def __init__(self, app: Path, journal: str, handled: Path, *, port: int = 0, delay: float = 0.0) -> None:
        self.handled = handled
        env = without_pythonpath() | {"HANDLED_FILE": str(handled), "HANDLER_DELAY": str(delay)}
        command = [SCRIPT, "serve", "--journal", journal, "--endpoint", f"tcp:{port}:interface={HOST}"]
        self.process = subprocess.Popen(
            [*command, "--receiver", "journalreceiver.Recording"],
            cwd=app,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _LIVE.append(self.process)
        self.output = Lines(self.process.stderr)
        found: dict[str, int] = {}
        try:
            while len(found) < 2:
                match = self.output.wait_for(_STARTED.pattern, 30)
                found.update({name: int(value) for name, value in match.groupdict().items() if value})
        except AssertionError:
            self.process.kill()
            raise
        self.port = found["port"]
        self.node = found["node"]  # its id in the journal's nodes table

    @classmethod
    async def start(cls, app: Path, journal: str, handled: Path, *, port: int = 0, delay: float = 0.0) -> Node:
        """Start one in a thread: the test's loop goes on meanwhile."""
        return await asyncio.to_thread(cls, app, journal, handled, port=port, delay=delay)

    def kill(self) -> None:
        """``kill -9``: no drain, no journal close, no stopped mark."""
        self.process.kill()
        self.process.wait(timeout=20)

    def stop(self) -> str:
        """SIGTERM; the whole log, once it has stopped (it must stop cleanly)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            finally:
                self.process.kill()
        log = self.output.rest()
        assert self.process.returncode in (0, -9), log
        return log


def handled(path: Path) -> list[tuple[str, str]]:
    """(control id, ACK control id) of each handling a node's receiver recorded, in order."""
    if not path.exists():
        return []
    return [(control_id, ack_id) for control_id, ack_id in map(str.split, path.read_text().splitlines())]


def check_log(log: str) -> None:
    """No traceback, no failed journal write, and no patient data, in a node's log."""
    assert "Traceback" not in log, log
    assert "writing failed" not in log, log
    assert "TESTPATIENT" not in log and "000001" not in log


@dataclass
class Contents:
    """What a journal holds, by control id."""

    answered: dict[str, Message]
    pending: dict[str, Message]


async def read_journal(url: str) -> Contents:
    """The journal's messages through its own API (as ``hl7bridge journal`` reads them)."""
    journal = Journal(url)
    try:
        answered = {message.control_id: message async for message in journal.answered()}
        pending = {message.control_id: message for message in await journal.pending()}
    finally:
        await journal.close()
    # What an operator sees after a crash lists the same messages.
    command = await asyncio.create_subprocess_exec(
        SCRIPT, "journal", "pending", "--json", url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    listed, errors = await asyncio.wait_for(command.communicate(), 60)
    assert command.returncode == 0, errors
    assert sorted(json.loads(line)["control_id"] for line in listed.splitlines()) == sorted(pending)
    return Contents(answered, pending)


class Link:
    """One MLLP connection: frames out, ACKs (without their framing) in, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Link:
        return cls(*await asyncio.wait_for(asyncio.open_connection(HOST, port), 5))

    def send(self, data: bytes) -> None:
        self.writer.write(VT + data + FS + CR)

    async def receive(self) -> bytes:
        block = await self.reader.readuntil(FS + CR)
        return block[block.index(VT) + 1 : -2]

    def close(self) -> None:
        self.writer.close()


async def exchange(port: int, control_ids: list[str], timeout: float = 10.0) -> list[bytes]:
    """Send these messages pipelined on one connection; their ACKs, in order."""
    link = await Link.open(port)
    try:
        for control_id in control_ids:
            link.send(message(control_id))

        async def replies() -> list[bytes]:
            return [await link.receive() for _ in control_ids]

        return await asyncio.wait_for(replies(), timeout)
    finally:
        link.close()
