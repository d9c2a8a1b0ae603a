"""``kill -9`` of a journaling ``hl7bridge serve`` under load, round after round, on SQLite and PostgreSQL.

Each round: senders pipeline messages with control ids of their own to one
node; the node is killed (SIGKILL) at a random moment; a new node starts on the
same journal. Then what the journal promises is checked against what the
senders got and what the receiver recorded:

- every ACK a sender received is in the journal, the same bytes;
- retransmitting a message whose answer was committed gets those bytes again,
  and the handler does not run (whether the sender had the ACK or not);
- messages received and never answered are listed as pending, among them every
  one the killed node's handler ran without its answer committed;
- retransmitting one of those is taken over by the new node at once (the old
  node's pid is gone on this host: no waiting for NODE_STALE_AFTER) and
  answered AA, its handler run once more.

The seed (``HL7BRIDGE_CRASH_SEED`` to choose another) is printed: it sets the
kill moments; the interleaving itself is the machine's.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from hl7bridge.journal import NODE_STALE_AFTER
from hl7bridge.testing import asyncio_test
from tests.nodes import (
    Link,
    Node,
    ack_control_id,
    check_log,
    exchange,
    handled,
    message,
    msa,
    read_journal,
    write_app,
)

SEED = int(os.environ.get("HL7BRIDGE_CRASH_SEED", "7215"))
ROUNDS = 4
SENDERS = 4
WINDOW = 8  # messages each sender has in flight
HANDLER_DELAY = 0.02  # a handler takes up to this long: a kill finds some handled, not answered
# A retransmission of a message whose node is gone from this host is taken over
# at once, not after NODE_STALE_AFTER: well under it.
TAKEOVER_LIMIT = 5.0
assert TAKEOVER_LIMIT < NODE_STALE_AFTER


def control_ids(prefix: str) -> Iterator[str]:
    return (f"{prefix}N{n:05d}" for n in range(20000))


async def pipeline(port: int, control_ids: Iterator[str], sent: list[str], acked: dict[str, bytes]) -> None:
    """Send with WINDOW messages in flight until the connection is cut; each ACK as received."""
    try:
        link = await Link.open(port)
    except OSError:
        return
    in_flight: list[str] = []
    try:
        for control_id in control_ids:
            link.send(message(control_id))
            sent.append(control_id)
            in_flight.append(control_id)
            if len(in_flight) < WINDOW:
                continue
            await link.writer.drain()
            ack = await link.receive()
            expected = in_flight.pop(0)
            assert msa(ack) == ["AA", expected]  # ACKs come in the order of their messages
            acked[expected] = ack
    except (ConnectionError, asyncio.IncompleteReadError):
        return  # the node was killed
    finally:
        link.close()


@asyncio_test
async def test_kill_9_loses_no_acked_message_and_hands_over_the_unanswered(journal_url: str, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED} (HL7BRIDGE_CRASH_SEED)")
    app = write_app(tmp_path / "app")
    record = tmp_path / "handled.txt"
    node = await Node.start(app, journal_url, record, delay=HANDLER_DELAY)
    taken_over = 0
    try:
        for number in range(ROUNDS):
            sent: list[str] = []
            acked: dict[str, bytes] = {}
            senders = [
                asyncio.ensure_future(pipeline(node.port, control_ids(f"R{number}S{s}"), sent, acked))
                for s in range(SENDERS)
            ]
            while len(acked) < 10 * SENDERS:
                await asyncio.sleep(0.01)
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            node.kill()
            check_log(node.stop())
            await asyncio.wait_for(asyncio.gather(*senders), 10)
            print(f"round {number}: {len(sent)} sent, {len(acked)} acked when killed")
            node = await Node.start(app, journal_url, record, delay=HANDLER_DELAY)
            taken_over += await check_round(node, journal_url, record, sent, acked)
    finally:
        check_log(node.stop())
    # The kills must have found messages handled and not answered, or the takeover was not tested.
    assert taken_over > 0


async def check_round(node: Node, url: str, record: Path, sent: list[str], acked: dict[str, bytes]) -> int:
    """Check a round after its kill, on the node started since; how many messages were taken over."""
    contents = await read_journal(url)
    answered = {key: value for key, value in contents.answered.items() if key in sent}
    pending = {key: value for key, value in contents.pending.items() if key in sent}
    handlings = Counter(control_id for control_id, _ in handled(record))

    # Every ACK a sender got was committed first: the journal has the same bytes.
    for control_id, ack in acked.items():
        assert control_id in answered, f"{control_id} was ACKed but is not answered in the journal"
        assert answered[control_id].ack == ack
        assert handlings[control_id] == 1
    # A message the killed node handled without committing its answer is pending.
    unanswered = {control_id for control_id in handlings if control_id in sent and control_id not in answered}
    assert unanswered <= set(pending)
    assert not set(pending) & set(acked)
    unacked = [control_id for control_id in sent if control_id not in acked]

    # Retransmitted, an answered message gets its journaled ACK; the handler does not run.
    before = handled(record)
    replayed = [control_id for control_id in sent if control_id in answered]
    replies = await exchange(node.port, replayed)
    assert replies == [answered[control_id].ack for control_id in replayed]
    assert handled(record) == before

    # The rest (pending, or never journaled) is handled now: a pending one is
    # taken over at once from the dead node, none waits.
    rest = [control_id for control_id in unacked if control_id not in answered]
    replies = await exchange(node.port, rest, timeout=TAKEOVER_LIMIT)
    assert [msa(reply) for reply in replies] == [["AA", control_id] for control_id in rest]
    after = handled(record)
    assert Counter(control_id for control_id, _ in after[len(before) :]) == Counter(rest)
    contents = await read_journal(url)
    assert not set(contents.pending) & set(sent)
    for control_id, reply in zip(rest, replies, strict=True):
        assert contents.answered[control_id].ack == reply
        assert ack_control_id(reply) == dict(after)[control_id]  # the ACK of the last handling
        expected_attempts = 2 if control_id in pending else 1
        assert contents.answered[control_id].attempts == expected_attempts
    # Everything sent is answered now, exactly once per message ACKed before the kill.
    assert set(sent) <= set(contents.answered)
    print(f"  {len(replayed)} answered from the journal, {len(pending)} taken over, {len(rest) - len(pending)} new")
    return len(pending)
