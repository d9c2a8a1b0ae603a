"""MIGRATION.md followed on examples/migration: at every stage, the ACKs are those of stage 0.

Each stage's example is started as examples/migration/README.md says (twistd for
stages 0 to 2, ``hl7bridge serve`` for 3 to 5, plain Python for 6, with twisted,
txHL7 and hl7bridge unimportable), as a subprocess listening on a free port of
127.0.0.1; they start side by side and are sent to in parallel. Every message is
sent to every listener on a connection of its own: the suite's own messages
always, and the shared corpus's (CR-normalised, the empty file left out) when it
is there. Each ACK, MSH-7 and MSH-10 blanked, must equal stage 0's. Stages 0 and 1
also run as twistd plugins (``mllp``, then ``hl7bridge``), the other way the guide
gives, on the suite's own messages.

One difference is expected, and checked: a message python-hl7 cannot acknowledge
(it cannot parse it, or ``create_ack`` raises on its MSH-9) gets no ACK from txHL7
or from the plain ``hl7.mllp`` loop, and an AR from hl7bridge (MIGRATION.md, stage
1, "NAKs instead of dropped connections"). So does a message whose MSH lacks
MSH-2 or MSH-9, which txHL7 may have acknowledged; one without a control id
(MSH-10) to put in MSA-2 gets no answer from hl7bridge.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.test_side_by_side import acknowledgeable_by_python_hl7
from tests.support import CORPUS, CR, FS, VT, control_id, corpus_messages, msa, msh_complete, without_time_and_id
from tests.test_cli import SCRIPT
from tests.test_docs import BLOCKED_BY_NO_TWISTED, ROOT, Lines, environment, python_without, stop
from tests.test_handlers import imported_modules

EXAMPLES = ROOT / "examples" / "migration"
ANY_PORT = "tcp:0:interface=127.0.0.1"
RECEIVER = "myinterface.receivers.AdmissionsReceiver"
TWISTD_ARGS = [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", "--logfile=-", "--reactor", "asyncio"]
# PYTHONPATH=. where the README has it: twistd looks for neither a .tac file's imports
# nor txHL7's plugin's receiver in its folder; hl7bridge serve and twistd hl7bridge do.
IN_EXAMPLES = (("PYTHONPATH", str(EXAMPLES)),)

NO_ACK = None
ACK_TIMEOUT = 20.0
# How long to wait for an ACK that should not come (txHL7 keeps the connection open).
SILENCE = 1.0


@dataclass(frozen=True)
class Stage:
    name: str
    documented: str  # the command examples/migration/README.md gives
    argv: list[str]  # the same, on a free port
    kinds: tuple[str, ...]  # what listens, in the order the process reports its ports
    env: tuple[tuple[str, str], ...] = ()
    corpus: bool = True  # False: the suite's own messages only (the corpus takes a second per listener)


def twistd(*args: str, pythonpath: bool = True) -> tuple[str, list[str]]:
    documented = " ".join(["twistd -n --reactor asyncio", *args]).replace(ANY_PORT, "tcp:2575:interface=127.0.0.1")
    return ("PYTHONPATH=. " if pythonpath else "") + documented, [*TWISTD_ARGS, *args]


def serve(receiver: str) -> tuple[str, list[str]]:
    argv = ["serve", "--endpoint", ANY_PORT, "--receiver", receiver]
    return " ".join(["hl7bridge", *argv]).replace(ANY_PORT, "tcp:2575:interface=127.0.0.1"), [SCRIPT, *argv]


ON_ANY_PORT = (("MLLP_ENDPOINT", ANY_PORT), *IN_EXAMPLES)
STAGES = [
    Stage("0", *twistd("-y", "stage0.tac"), ("txHL7",), ON_ANY_PORT),
    Stage(
        "0-plugin",
        *twistd("mllp", "--endpoint", ANY_PORT, "--receiver", RECEIVER),
        ("txHL7",),
        IN_EXAMPLES,
        corpus=False,
    ),
    Stage("1", *twistd("-y", "stage1.tac"), ("hl7bridge",), ON_ANY_PORT),
    Stage(
        "1-plugin",
        *twistd("hl7bridge", "--endpoint", ANY_PORT, "--receiver", RECEIVER, pythonpath=False),
        ("hl7bridge",),
        corpus=False,
    ),
    Stage("2", *twistd("-y", "stage2.tac"), ("txHL7", "hl7bridge"), (*ON_ANY_PORT, ("MLLP_NEW_ENDPOINT", ANY_PORT))),
    Stage("3", *serve("stage3.router"), ("hl7bridge",)),
    Stage("4", *serve("stage4.router"), ("hl7bridge",)),
    Stage("5", *serve("stage5.router"), ("hl7bridge",)),
    Stage(
        "6",
        "python stage6.py",
        python_without(BLOCKED_BY_NO_TWISTED, EXAMPLES / "stage6.py"),
        ("hl7.mllp",),
        (("MLLP_HOST", "127.0.0.1"), ("MLLP_PORT", "0")),
    ),
]
STAGE_NAMES = [stage.name for stage in STAGES if stage.name != "0"]
WITH_CORPUS = [stage.name for stage in STAGES if stage.name != "0" and stage.corpus]


def own(control_id: str, message_type: str, body: str, facility: str = "WARD") -> str:
    return f"MSH|^~\\&|SENDER|{facility}|MYINTERFACE|EXAMPLE|20240101120000||{message_type}|{control_id}|P|2.5\r{body}"


# The suite's own messages, one for each way the example interface answers,
# and the two ways a message can be beyond python-hl7's ACKs.
OWN_MESSAGES = {
    "admission": own("OWN01", "ADT^A01^ADT_A01", "PID|1||000042^^^TEST||EXAMPLE^PATIENT\r"),
    "admission without patient id": own("OWN02", "ADT^A01^ADT_A01", "PID|1||||EXAMPLE^PATIENT\r"),
    "admission without PID": own("OWN03", "ADT^A01", "EVN|A01|20240101120000\r"),
    "order": own("OWN04", "ORM^O01^ORM_O01", "PID|1||000042\rORC|NW|4711\r"),
    "result, non-ASCII": own(
        "OWN05", "ORU^R01^ORU_R01", "PID|1||000042||M\u00fcller^Zo\u00eb\rOBX|1|ST|GLU||5.5\r", "Station G\u00f6rlitz"
    ),
    "result without OBX": own("OWN06", "ORU^R01^ORU_R01", "PID|1||000042\rOBR|1\r"),
    "update, not accepted": own("OWN07", "ADT^A08^ADT_A01", "PID|1||000042\r"),
    "query, not accepted": own("OWN08", "QRY^A19^QRY_A19", "QRD|20240101||R|I|Q1\r"),
    "MSH-9 without trigger event": own("OWN09", "ACK", "MSA|AA|SOMEONE\r"),
    "MSH without fields": "MSH|\r",
}

# What the example interface answers at stage 0: MSA-1 and MSA-3 (None: no ACK).
STAGE_0 = {
    "admission": ("AA", ""),
    "admission without patient id": ("AE", "patient id missing"),
    "admission without PID": ("AE", "patient id missing"),
    "order": ("AA", ""),
    "result, non-ASCII": ("AA", ""),
    "result without OBX": ("AE", "no results"),
    "update, not accepted": ("AR", "message type not accepted"),
    "query, not accepted": ("AR", "message type not accepted"),
    "MSH-9 without trigger event": None,
    "MSH without fields": None,
}


def corpus() -> dict[str, str]:
    """The shared corpus by file name, or nothing if it is absent (the suite's own messages still run)."""
    try:
        return dict(corpus_messages())
    except pytest.skip.Exception:
        return {}


def ack_of(port: int, text: str, expect_none: bool) -> str | None:
    """The ACK a listener gives ``text`` on a new connection, MSH-7 and MSH-10 blanked; None for none."""
    with socket.create_connection(("127.0.0.1", port), timeout=SILENCE if expect_none else ACK_TIMEOUT) as connection:
        connection.sendall(VT + text.encode("utf-8") + FS + CR)
        reply = b""
        try:
            while not reply.endswith(FS + CR):
                data = connection.recv(65536)
                if not data:
                    return NO_ACK if not reply else f"(cut off) {reply!r}"
                reply += data
        except TimeoutError:
            if not expect_none:
                raise
            return NO_ACK if not reply else f"(cut off) {reply!r}"
    return without_time_and_id(reply.strip(VT + FS + CR).decode("utf-8"))


@dataclass
class Listener:
    stage: str
    kind: str
    port: int


@dataclass
class Run:
    """What every listener of every stage answered, and what each process logged."""

    messages: dict[str, str]
    unacknowledgeable: set[str]  # names of the messages python-hl7 cannot acknowledge
    acks: dict[str, dict[str, dict[str, str | None]]]  # stage -> kind -> message name -> ACK
    logs: dict[str, str]
    alive: dict[str, bool]


LISTENING = re.compile(
    r"MLLPFactory starting on (?P<port>\d+)"
    r"|Starting factory <(?P<module>\w+)\.mllp\.MLLPFactory"
    r"|listening on \S+:(?P<plain>\d+)"
    # hl7bridge serve and twistd hl7bridge, which listen through asyncio's own servers.
    r"|serving \S+ on \S+:(?P<served>\d+)"
)


def listeners(stage: Stage, output: Lines) -> list[Listener]:
    """The ports a stage's process reports, paired with what listens on each."""
    found: list[Listener] = []
    port = None
    while len(found) < len(stage.kinds):
        match = output.wait_for(LISTENING.pattern)
        if match.group("port"):
            port = int(match.group("port"))
        elif match.group("module") and port is not None:
            found.append(Listener(stage.name, match.group("module"), port))
            port = None
        elif match.group("plain"):
            found.append(Listener(stage.name, "hl7.mllp", int(match.group("plain"))))
        elif match.group("served"):
            found.append(Listener(stage.name, "hl7bridge", int(match.group("served"))))
    assert tuple(listener.kind for listener in found) == stage.kinds, found
    return found


def start(stage: Stage) -> subprocess.Popen[str]:
    env = {key: value for key, value in environment().items() if key != "PYTHONPATH"}
    return subprocess.Popen(
        stage.argv,
        cwd=EXAMPLES,
        env={**env, **dict(stage.env)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def answers(listener: Listener, messages: dict[str, str], unacknowledgeable: set[str]) -> dict[str, str | None]:
    silent = listener.kind in ("txHL7", "hl7.mllp")
    return {
        name: ack_of(listener.port, text, (silent and name in unacknowledgeable) or not control_id(text))
        for name, text in messages.items()
    }


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    messages = {**OWN_MESSAGES, **corpus()}
    unacknowledgeable = {name for name, text in messages.items() if not acknowledgeable_by_python_hl7(text)}
    by_name = {stage.name: stage for stage in STAGES}

    def send_all(listener: Listener) -> dict[str, str | None]:
        chosen = messages if by_name[listener.stage].corpus else OWN_MESSAGES
        return answers(listener, chosen, unacknowledgeable)

    processes = {stage.name: start(stage) for stage in STAGES}  # they start up side by side
    outputs = {name: Lines(process.stdout) for name, process in processes.items()}
    try:
        found = [listener for stage in STAGES for listener in listeners(stage, outputs[stage.name])]
        with ThreadPoolExecutor(len(found)) as pool:
            results = list(pool.map(send_all, found))
        alive = {name: process.poll() is None for name, process in processes.items()}
    finally:
        for process in processes.values():
            stop(process)
    acks: dict[str, dict[str, dict[str, str | None]]] = {}
    for listener, result in zip(found, results, strict=True):
        acks.setdefault(listener.stage, {})[listener.kind] = result
    yield Run(messages, unacknowledgeable, acks, {name: output.rest() for name, output in outputs.items()}, alive)


def differences(run: Run, stage: str, names: list[str]) -> list[str]:
    """Where a stage's listeners answer otherwise than stage 0, but for the one expected change."""
    found = []
    for kind, acks in run.acks[stage].items():
        for name in names:
            reference, ack = run.acks["0"]["txHL7"][name], acks[name]
            text = run.messages[name]
            if kind == "hl7bridge" and not control_id(text):
                # No MSH-10: an ACK could not say what it answers, so hl7bridge sends none.
                same = ack is NO_ACK
            elif kind == "hl7bridge" and (name in run.unacknowledgeable or not msh_complete(text)):
                # txHL7 sent nothing, or an ACK to an MSH lacking a required field;
                # hl7bridge answers AR (its NAKs say why in MSA-3 and ERR).
                same = ack is not None and msa(ack)[1] == "AR"
            else:
                same = ack == reference
            if not same:
                found.append(f"{kind} on {name}: {ack!r}; at stage 0: {reference!r}")
    return found


def test_stage_0_answers_as_the_example_interface_should(run: Run) -> None:
    reference = run.acks["0"]["txHL7"]
    for name, outcome in STAGE_0.items():
        ack = reference[name]
        if outcome is None:
            assert ack is NO_ACK, name
            continue
        assert ack is not None, name
        assert msa(ack)[1:4] == [outcome[0], OWN_MESSAGES[name].split("|")[9], *([outcome[1]] if outcome[1] else [])]
        assert ack.startswith("MSH|^~\\&|MYINTERFACE|EXAMPLE|SENDER|"), ack
    assert "|Station G\u00f6rlitz|" in reference["result, non-ASCII"]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_stage_answers_our_messages_as_stage_0_did(run: Run, stage: str) -> None:
    assert run.alive[stage], run.logs[stage]
    assert differences(run, stage, list(OWN_MESSAGES)) == [], run.logs[stage][-3000:]


@pytest.mark.parametrize("stage", WITH_CORPUS)
def test_stage_answers_the_corpus_as_stage_0_did(run: Run, stage: str) -> None:
    names = [name for name in run.messages if name not in OWN_MESSAGES]
    if not names:
        pytest.skip(f"shared corpus not found at {CORPUS}")
    assert len(names) > 80
    assert differences(run, stage, names) == [], run.logs[stage][-3000:]


def test_stage_3_shadow_agreed_with_the_receiver(run: Run) -> None:
    log = run.logs["3"]
    assert "hl7bridge.messages" in log  # the listener's log is there to read
    assert "shadow differed" not in log and "shadow failed" not in log, log


def test_stage_6_runs_without_twisted_txhl7_or_hl7bridge(run: Run) -> None:
    """Stage 6 served with the three made unimportable; its files do not import them either."""
    package = EXAMPLES / "myinterface"
    files = [EXAMPLES / "stage6.py", package / "__init__.py", package / "messages.py"]
    for path in [*files, *sorted((package / "handlers").glob("*.py"))]:
        assert not imported_modules(path) & set(BLOCKED_BY_NO_TWISTED), path
    assert run.acks["6"]["hl7.mllp"]["admission"] is not None
    assert "ImportError" not in run.logs["6"]


def test_the_examples_readme_gives_the_commands_run_here() -> None:
    text = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    missing = [stage.documented for stage in STAGES if stage.documented not in text]
    assert missing == []


def test_stage_6_stops_quietly_on_ctrl_c() -> None:
    [stage] = [stage for stage in STAGES if stage.name == "6"]
    process = start(stage)
    output = Lines(process.stdout)
    try:
        output.wait_for(LISTENING.pattern)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        process.wait(timeout=20)
    finally:
        stop(process)
    printed = output.rest()
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed
