"""Several ``hl7bridge serve`` nodes on one PostgreSQL journal, behind HAProxy in TCP mode.

What the design promises across nodes, and what is checked here:

- An ACK is sent only after its commit, so every ACK a sender got is the
  journal's ACK for that message, the same bytes.
- A message whose answer is committed is never handled again: a
  retransmission, to any node, gets the journaled ACK.
- A message can be handled twice only when the node that handled it first died
  before its answer was committed: its retransmission is then taken over by
  another node, and the journal holds the ACK of that second handling. So an
  id found in both nodes' records must be one the killed node had in flight,
  and its journaled ACK must be the one the survivor built (each ACK's MSH-10
  is fresh, and the receiver records it).
- The journal's unique key decides between nodes: one message sent to two
  nodes at once is handled by one; the other answers with its ACK.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import shutil
import socket
import subprocess
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from hl7bridge.ack import read_header
from hl7bridge.journal import FAILED, Arrival, Journal, Recorded
from hl7bridge.testing import asyncio_test
from tests.nodes import (
    HOST,
    Link,
    Node,
    ack_control_id,
    check_log,
    exchange,
    free_port,
    handled,
    message,
    msa,
    read_journal,
    write_app,
)
from tests.test_journal_crash import SEED

SENDERS = 4
MESSAGES = 150  # per sender
WINDOW = 8
HANDLER_DELAY = 0.02

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.rst"


def haproxy_config(port: int, nodes: list[int]) -> str:
    """The ``haproxy.cfg`` of docs/operations.rst, on loopback: its frontend on ``port``, its servers ``nodes``."""
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(r"\.\. code-block:: text\n\n((?:    .*\n|\n)*?    frontend mllp\n(?:    .*\n|\n)*)", text)
    assert found, "no haproxy.cfg in docs/operations.rst"
    lines = textwrap.dedent(found.group(1)).rstrip().split("\n")
    assert sum(line.strip().startswith("bind ") for line in lines) == 1
    config = [f"    bind {HOST}:{port}" if line.strip().startswith("bind ") else line for line in lines]
    config = [line for line in config if not line.strip().startswith("server ")]
    config += [f"    server node{index} {HOST}:{node} check" for index, node in enumerate(nodes)]
    return "\n".join(config) + "\n"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(path).exists()), None
    )
    if found is None:
        pytest.skip("haproxy not found (.ci/run installs Debian's haproxy package)")
    return found


class HAProxy:
    """HAProxy in the foreground (``-db``) with the config of docs/operations.rst, on loopback ports."""

    def __init__(self, folder: Path, ports: list[int]) -> None:
        self.port = free_port()
        config = folder / "haproxy.cfg"
        config.write_text(haproxy_config(self.port, ports))
        self.process = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"haproxy did not listen: {self.output}") from None
                time.sleep(0.05)
            else:
                break

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.output, _ = self.process.communicate(timeout=10)


async def deliver(port: int, control_ids: list[str], acked: dict[str, bytes], reconnects: Counter[str]) -> None:
    """Send until each message is ACKed, WINDOW in flight; after a cut, reconnect and resend what has no ACK."""
    unacked = list(control_ids)
    while unacked:
        try:
            link = await Link.open(port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        sent = 0
        try:
            while unacked:
                while sent < min(WINDOW, len(unacked)):
                    link.send(message(unacked[sent]))
                    sent += 1
                await link.writer.drain()
                ack = await link.receive()
                expected = unacked.pop(0)
                sent -= 1
                assert msa(ack) == ["AA", expected]
                acked[expected] = ack
        except (ConnectionError, asyncio.IncompleteReadError):
            reconnects["cut"] += 1
            await asyncio.sleep(0.05)
        finally:
            link.close()


@asyncio_test
async def test_a_node_killed_behind_haproxy_loses_nothing(postgres_url: str, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED} (HL7BRIDGE_CRASH_SEED)")
    app = write_app(tmp_path / "app")
    ports = [free_port(), free_port()]
    records = [tmp_path / f"handled-{index}.txt" for index in range(2)]
    nodes = list(
        await asyncio.gather(
            *(
                Node.start(app, postgres_url, record, port=port, delay=HANDLER_DELAY)
                for port, record in zip(ports, records, strict=True)
            )
        )
    )
    proxy = await asyncio.to_thread(HAProxy, tmp_path, ports)
    try:
        acked: dict[str, bytes] = {}
        reconnects: Counter[str] = Counter()
        batches = [[f"C{s}N{n:04d}" for n in range(MESSAGES)] for s in range(SENDERS)]
        senders = [asyncio.ensure_future(deliver(proxy.port, batch, acked, reconnects)) for batch in batches]
        while len(acked) < SENDERS * MESSAGES // 4:
            await asyncio.sleep(0.01)
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        victim = rng.randrange(2)
        survivor = 1 - victim
        killed = nodes[victim]
        killed.kill()
        check_log(killed.stop())
        print(f"node {victim} killed with {len(acked)} of {SENDERS * MESSAGES} ACKed")
        await asyncio.wait_for(asyncio.gather(*senders), 45)
        assert reconnects["cut"] > 0  # the kill cut connections under load

        everything = [control_id for batch in batches for control_id in batch]
        assert sorted(acked) == sorted(everything)
        contents = await read_journal(postgres_url)
        assert not contents.pending
        # Each node's handlings, control id -> the MSH-10 of the ACK it built.
        handlings = [handled(record) for record in records]
        counts = [Counter(control_id for control_id, _ in lines) for lines in handlings]
        assert all(count <= 1 for node_counts in counts for count in node_counts.values())
        ack_ids = [dict(lines) for lines in handlings]
        node_index = {nodes[index].node: index for index in range(2)}
        twice = set(counts[victim]) & set(counts[survivor])
        print(f"{len(twice)} handled by both nodes; {reconnects['cut']} connections cut")
        # Only what the killed node had in flight on its connections.
        assert len(twice) <= SENDERS * WINDOW
        for control_id in everything:
            row = contents.answered[control_id]
            assert row.node is not None
            assert row.ack == acked[control_id]
            assert row.code == "AA"
            # The journaled ACK is the one the node that holds the row built, in its last handling.
            assert ack_control_id(row.ack) == ack_ids[node_index[row.node]][control_id]
            if control_id in twice:
                assert node_index[row.node] == survivor and row.attempts == 2

        # A retransmission of an ACKed message, to either node, is answered from the journal.
        nodes[victim] = await Node.start(app, postgres_url, records[victim], port=ports[victim])
        before = [handled(record) for record in records]
        for node in nodes:
            replies = await exchange(node.port, everything, timeout=20)
            assert replies == [acked[control_id] for control_id in everything]
        assert [handled(record) for record in records] == before
    finally:
        proxy.stop()
        for node in nodes:
            check_log(node.stop())


@asyncio_test
async def test_one_message_sent_to_two_nodes_at_once_is_handled_once(postgres_url: str, tmp_path: Path) -> None:
    app = write_app(tmp_path / "app")
    records = [tmp_path / f"handled-{index}.txt" for index in range(2)]
    nodes = list(await asyncio.gather(*(Node.start(app, postgres_url, record, delay=0.1) for record in records)))
    try:
        control_ids = [f"D{n:03d}" for n in range(40)]
        # One node gets them in order, the other in reverse: each group of
        # arrivals meets the other node's, key by key, in the opposite order.
        first, second = await asyncio.gather(
            exchange(nodes[0].port, control_ids, timeout=30),
            exchange(nodes[1].port, control_ids[::-1], timeout=30),
        )
        second = second[::-1]
        assert [msa(reply) for reply in first] == [["AA", control_id] for control_id in control_ids]
        assert first == second  # the node that did not handle a message sent the other's ACK
        handlings = [line for record in records for line in handled(record)]
        assert Counter(control_id for control_id, _ in handlings) == Counter(control_ids)
        contents = await read_journal(postgres_url)
        for control_id, reply in zip(control_ids, first, strict=True):
            assert contents.answered[control_id].ack == reply
            assert contents.answered[control_id].attempts == 1
    finally:
        for node in nodes:
            check_log(node.stop())


@asyncio_test
async def test_two_nodes_beginning_the_same_keys_in_opposite_orders_do_not_deadlock(postgres_url: str) -> None:
    """Two journals (two nodes' worth) given one group of keys each, in opposite orders, at once.

    Each must begin its keys in one transaction that waits for the other's,
    not fail on a deadlock (which answers the whole group AR); the node that
    did not begin a key waits for the other's answer and sends that.
    """
    nodes = [Journal(postgres_url), Journal(postgres_url)]
    for journal in nodes:
        await journal.open()
    try:
        for number in range(6):
            keys = [f"G{number}N{n:04d}" for n in range(300)]
            outcomes: list[dict[str, Recorded | None]] = [{}, {}]
            arrivals: list[dict[str, Arrival]] = [{}, {}]
            for index, order in ((0, keys), (1, keys[::-1])):
                for control_id in order:
                    raw = message(control_id)
                    header = read_header(raw.decode())
                    assert header is not None
                    arrival = Arrival(nodes[index].key_of(header) or "", header, raw, "listener", "peer")
                    arrivals[index][control_id] = arrival
                    nodes[index].begin(arrival, functools.partial(outcomes[index].__setitem__, control_id))
            deadline = time.monotonic() + 10
            while len(outcomes[0]) + len(outcomes[1]) < len(keys):
                assert time.monotonic() < deadline, "the groups did not begin"
                await asyncio.sleep(0.01)
            assert FAILED not in [*outcomes[0].values(), *outcomes[1].values()]
            begun = [{key for key, outcome in found.items() if outcome is None} for found in outcomes]
            assert begun[0] | begun[1] == set(keys) and not begun[0] & begun[1]
            # The node that begun a key answers it; the other then sends that answer.
            for index in range(2):
                for control_id in begun[index]:
                    ack = f"ACK {control_id}".encode()
                    nodes[index].answer(arrivals[index][control_id], ack, "AA", lambda committed: None)
            while len(outcomes[0]) + len(outcomes[1]) < 2 * len(keys):
                assert time.monotonic() < deadline + 10, "a waiting copy was not answered"
                await asyncio.sleep(0.01)
            for index in range(2):
                for control_id in begun[1 - index]:
                    assert outcomes[index][control_id] == Recorded(f"ACK {control_id}".encode(), "AA")
    finally:
        for journal in nodes:
            await journal.close()
