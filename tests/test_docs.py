"""The code in the documentation is checked here, so that the guide cannot rot.

Every code block of MIGRATION.md, README.md and docs/ (```LANGUAGE fences of the
Markdown files, ``.. code-block:: LANGUAGE`` of the reStructuredText ones) must be
in one of LANGUAGES: ``python``, ``sh``, ``ini`` (the pytest.ini of docs/testing.rst,
which configures every pytest run here) or ``text`` (diagrams and output). A
reStructuredText literal block (``::``) that holds a command fails: it would not be
run. Every ``python`` block is compiled, and whatever it imports from hl7bridge
must exist.

Every ``sh`` block is run, command by command, and every ``python`` block, each
as the first rule that matches says: COMMANDS for a command (matched in full, its
comment from `` # `` on left out), PYTHON_RULES for a python block (matched against
its first line). A block or command that no rule covers fails; a rule may say why
it does not run (``check`` None). The blocks run side by side, four at a time, each
step bounded by a 60 s timeout.

Where a block runs
    In a folder of its own, its project: examples/migration's interface
    (``myinterface``); ``service.tac``, a copy of its ``stage0.tac`` (the service
    as it runs before the migration); ``tests/samples.py`` with ``ADMISSIONS``, the
    made-up ADT^A01 messages below, addressed to that interface, and the same
    messages as ``admissions/*.hl7``; a copy of ``examples/side_by_side.py``; for a
    block that names ``.pem`` files, the bridge's and a sender's certificates and
    keys (``bridge-cert.pem``, ``sender.pem``, ...), each self-signed for 127.0.0.1
    and trusted by the other (``senders-ca.pem``, ``bridge-ca.pem``); and
    every file that a block above it in the same document stands for, later blocks
    replacing earlier ones. The project is on PYTHONPATH (hl7bridge and its
    twistd plugin come from this interpreter's install, as a user's do), and this
    interpreter's bin folder is first on PATH. Commands run in ``sh``.

What changes, mechanically, in a block and in its project's files
    Each documented port (PORTS) becomes a free port; a ``tcp:PORT`` endpoint gets
    ``:interface=127.0.0.1``; ``"0.0.0.0"`` and a quoted ``"HOST.example.invalid"``
    become ``"127.0.0.1"`` (a script's ``listenTCP(PORT, ...)`` still listens on
    every interface); ``/tmp/`` becomes the project folder and ``.venv/bin/`` this
    interpreter's bin folder.

A service
    is started, is sent a made-up ADT^A01 on each MLLP port that its command, or a
    file of the project that the command names, mentions (retrying until it
    listens), and must answer each with AA; a metrics port must serve
    ``/metrics``. It is then stopped with SIGTERM, and must not have printed a
    traceback. ``make run``, ``mllp_send`` and ``hl7bridge send`` run against the
    ``hl7bridge serve`` command that ``make -n run`` prints.

``python`` blocks, by their first line:

``# doctest: run``
    A script; it must exit with status 0.
``# doctest: pytest``
    A test module; pytest runs it with the ``pytest.ini`` of docs/testing.rst
    (``--reactor=asyncio``), as a project using ``hl7bridge.testing`` does.
``# doctest: serve``
    A service that listens until stopped. It is started with ``MLLP_PORT=0``,
    must print ``listening on HOST:PORT``, must answer a made-up ADT^A01 with
    AA, and is then stopped with SIGTERM.
``# doctest: client``
    A script run as ``script HOST PORT FOLDER`` against ``hl7bridge serve``
    (the logging receiver), with a folder of two made-up messages; it must exit
    with status 0 and print both ACKs.
``# PATH`` (``# myinterface/routing.py``)
    The block stands for that file of the reader's project; it runs imported as
    its module, and in the blocks below it that use it.
``# tests/test_NAME.py (pytest --reactor=asyncio)``
    A test module of the project; pytest runs it as a ``# doctest: pytest`` block.
``# tests/test_NAME.py: plain pytest, no plugin needed``
    The same, with no pytest plugin, and Twisted, txHL7 and hl7bridge unimportable.
``# FILE: COMMAND`` (``# service.py: python service.py``)
    The block stands for FILE, and COMMAND runs it as a shell block's would.
``# Before: ...``
    Code the guide shows in order to replace it: compiled only.

``no-twisted`` after a ``# doctest:`` mode (``# doctest: serve no-twisted``) makes
``twisted``, ``txHL7`` and ``hl7bridge`` unimportable in that subprocess. A
``# doctest:`` block whose docstring starts with a file name
(``\"\"\"admissions_service.py: ...``) also stands for that file.
"""

from __future__ import annotations

import ast
import configparser
import contextlib
import dataclasses
import importlib
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "migration"
BIN = Path(sys.executable).parent
TIMEOUT = 60

MARKER = re.compile(r"#\s*doctest:\s*(?P<mode>\S+)(?P<flags>[^\n]*)")
MODES = ("run", "pytest", "serve", "client")
FLAGS = ("no-twisted",)
BLOCKED_BY_NO_TWISTED = ("twisted", "txHL7", "hl7bridge")

# The languages a block may be written in, and what is done with each.
LANGUAGES = {
    "python": "compiled; run as PYTHON_RULES says",
    "sh": "run as COMMANDS says",
    "ini": "the pytest.ini of every pytest run here",
    "text": "not code (diagrams, output): not run",
    "{include}": "MyST's include directive (docs/migration.md)",
}

# The ports the documents listen on: each is replaced by a free one, and checked.
PORTS = {"2575": "mllp", "2576": "mllp", "2577": "mllp", "9102": "metrics"}

MESSAGE = (
    "MSH|^~\\&|DOCSEND|TESTFAC|DOCRECV|TESTFAC|20240101120000||ADT^A01^ADT_A01|{id}|P|2.5\r"
    "PID|1||000000^^^TEST||TESTPATIENT^ALPHA\r"
)

# tests.samples.ADMISSIONS of every project: "your sample messages, as text". They
# are addressed to the example interface (MSH-5, MSH-6), so that an ACK built by
# create_ack names the interface as its receiver's ACKs do.
ADMISSIONS = [
    f"MSH|^~\\&|SENDER|WARD|MYINTERFACE|EXAMPLE|20240101120000||ADT^A01^ADT_A01|DOCSAMPLE{number}|P|2.5\r"
    f"PID|1||00000{number}^^^TEST||TESTPATIENT^{name}\r"
    for number, name in ((1, "ALPHA"), (2, "BRAVO"))
]


@dataclass(frozen=True)
class Block:
    path: str
    line: int
    text: str
    language: str = "python"

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.text.lstrip("\n").split("\n", 1)[0].strip()

    @property
    def marker(self) -> tuple[str, tuple[str, ...]] | None:
        found = MARKER.fullmatch(self.first_line)
        if found is None:
            return None
        return found.group("mode"), tuple(found.group("flags").split())


def markdown_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (indented ones too, as in list items)."""
    found = []
    lines = path.read_text(encoding="utf-8").split("\n")
    number = 0
    while number < len(lines):
        opening = re.fullmatch(r"(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n`]*)", lines[number])
        if opening is None:
            number += 1
            continue
        fence, info = opening.group("fence"), opening.group("info").strip()
        end = number + 1
        while end < len(lines) and not re.fullmatch(r"[ \t]*" + re.escape(fence) + r"[ \t]*", lines[end]):
            end += 1
        body = textwrap.dedent("\n".join(lines[number + 1 : end]))
        found.append(Block(path.relative_to(ROOT).as_posix(), number + 2, body, info.split()[0] if info else ""))
        number = end + 1
    return found


def rst_blocks(path: Path) -> list[Block]:
    """The ``.. code-block:: LANGUAGE`` directives of a reStructuredText file."""
    found = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines):
        directive = re.fullmatch(
            r"(?P<indent>[ \t]*)\.\. (code-block|code|sourcecode)::[ \t]*(?P<language>\S*)[ \t]*", line
        )
        if directive is None:
            continue
        indent = len(directive.group("indent"))
        body_start = number + 1
        # Options (":caption: ...") come first, then a blank line, then the code.
        while body_start < len(lines) and re.fullmatch(r"[ \t]+:[\w-]+:.*", lines[body_start]):
            body_start += 1
        end = body_start
        while end < len(lines):
            text = lines[end]
            if text.strip() and len(text) - len(text.lstrip()) <= indent:
                break
            end += 1
        body = textwrap.dedent("\n".join(lines[body_start:end])).strip("\n") + "\n"
        found.append(Block(path.relative_to(ROOT).as_posix(), body_start + 1, body, directive.group("language")))
    return found


def documented_files() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "MIGRATION.md", ROOT / "README.md", *sorted(docs.glob("*.rst")), *sorted(docs.glob("*.md"))]


def all_blocks() -> list[Block]:
    blocks = []
    for path in documented_files():
        blocks += markdown_blocks(path) if path.suffix == ".md" else rst_blocks(path)
    return blocks


EVERY_BLOCK = all_blocks()
BLOCKS = [block for block in EVERY_BLOCK if block.language == "python"]
SHELL_BLOCKS = [block for block in EVERY_BLOCK if block.language == "sh"]
INI_BLOCKS = [block for block in EVERY_BLOCK if block.language == "ini"]
PYTEST_INI = next(block.text for block in INI_BLOCKS if block.text.startswith("[pytest]"))


def test_blocks_are_found_where_expected() -> None:
    per_file = {path.relative_to(ROOT).as_posix(): 0 for path in documented_files()}
    for block in BLOCKS:
        per_file[block.path] += 1
    assert per_file["MIGRATION.md"] >= 10, per_file
    assert per_file["README.md"] >= 1, per_file
    for page in ("docs/handlers.rst", "docs/testing.rst", "docs/quickstart.rst"):
        assert per_file[page] >= 1, per_file
    assert {block.path for block in SHELL_BLOCKS} >= {"MIGRATION.md", "README.md", "docs/quickstart.rst"}
    modes = {block.marker[0] for block in BLOCKS if block.marker}
    assert modes == set(MODES), f"every kind of runnable block should be used at least once: {modes}"


@pytest.mark.parametrize("path", documented_files(), ids=lambda path: path.name)
def test_every_block_is_in_a_language_that_is_checked(path: Path) -> None:
    """A block written as ```py, ```bash or with no language would escape the checks."""
    blocks = markdown_blocks(path) if path.suffix == ".md" else rst_blocks(path)
    unknown = [f"{block.id} {block.language!r}" for block in blocks if block.language not in LANGUAGES]
    assert unknown == [], f"spell the language as one of {sorted(LANGUAGES)}"


def test_the_ini_block_is_the_pytest_configuration_used_here() -> None:
    """docs/testing.rst's pytest.ini is the configuration of every pytest run below: no other ini block."""
    assert [block.text for block in INI_BLOCKS] == [PYTEST_INI]
    assert re.search(r"^addopts = --reactor=asyncio$", PYTEST_INI, re.MULTILINE)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.id)
def test_block_compiles(block: Block) -> None:
    compile(block.text, block.id, "exec")


def hl7bridge_names(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name) pairs the code takes from hl7bridge; name None for a module import."""
    names: list[tuple[str, str | None]] = []
    plain_import = False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hl7bridge":
            names += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hl7bridge":
                    names.append((alias.name, None))
                    plain_import = plain_import or (alias.name == "hl7bridge" and alias.asname is None)
    if plain_import:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hl7bridge":
                names.append(("hl7bridge", node.attr))
    return names


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.id)
def test_block_uses_only_names_hl7bridge_has(block: Block) -> None:
    for module_name, name in hl7bridge_names(ast.parse(block.text)):
        module = importlib.import_module(module_name)
        if name is None or name == "*" or hasattr(module, name):
            continue
        # A submodule: from hl7bridge import testing
        importlib.import_module(f"{module_name}.{name}")


@pytest.mark.parametrize("block", [block for block in BLOCKS if block.marker], ids=lambda block: block.id)
def test_marker_is_known(block: Block) -> None:
    assert block.marker is not None
    mode, flags = block.marker
    assert mode in MODES, f"unknown mode {mode!r}; one of {MODES}"
    assert set(flags) <= set(FLAGS), f"unknown flags {flags}; known: {FLAGS}"


# Subprocesses


def environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(extra)
    return env


BOOTSTRAP = """
import runpy, sys
for name in sys.argv[2].split(",") if sys.argv[2] else ():
    sys.modules[name] = None  # importing it now fails
target = sys.argv[1]
sys.argv = [target, *sys.argv[3:]]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def python_without(blocked: tuple[str, ...], script: Path | str, *args: str) -> list[str]:
    """The command that runs ``script`` (a file, or a module's name) as __main__ with ``blocked`` unimportable."""
    return [sys.executable, "-c", BOOTSTRAP, str(script), ",".join(blocked), *args]


def command(block: Block, script: Path | str, *args: str) -> list[str]:
    """Run ``script`` as __main__, with Twisted and hl7bridge blocked if the block asks."""
    assert block.marker is not None
    return python_without(BLOCKED_BY_NO_TWISTED if "no-twisted" in block.marker[1] else (), script, *args)


class Lines:
    """The lines a subprocess writes to one stream, read in a thread so waiting can time out."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.seen: list[str] = []
        self._stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._ended = False  # the stream's end has been read from the queue
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self._ended = True
                break
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"{pattern!r} not printed in time; printed so far:\n{''.join(self.seen)}")

    def rest(self) -> str:
        """Everything printed, once the process has ended; the stream is closed then."""
        while not self._ended:
            try:
                line = self._queue.get(timeout=10)
            except queue.Empty:
                break
            if line is None:
                self._ended = True
                break
            self.seen.append(line)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._stream.close()
        return "".join(self.seen)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def send_one(host: str, port: int, control_id: str) -> str:
    """One framed message over a plain socket; the framed reply's text."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as connection:
        connection.sendall(b"\x0b" + MESSAGE.format(id=control_id).encode() + b"\x1c\r")
        reply = b""
        while not reply.endswith(b"\x1c\r"):
            data = connection.recv(65536)
            if not data:
                break
            reply += data
    return reply.strip(b"\x0b\x1c\r").decode()


HANDED_OUT: set[int] = set()  # blocks run side by side: no port twice
HANDING_OUT = threading.Lock()


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        with HANDING_OUT:
            if port not in HANDED_OUT:
                HANDED_OUT.add(port)
                return port


# The project a block runs in


@dataclass
class Project:
    """A block's folder (see the module's docstring), and the free ports that stand for PORTS."""

    folder: Path
    ports: dict[str, int]
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # what each file said before relocation

    def relocate(self, text: str) -> str:
        """``text`` as it runs here: the substitutions of the module's docstring."""
        text = re.sub(r"\b(" + "|".join(PORTS) + r")\b", lambda found: str(self.ports[found.group(1)]), text)

        def on_loopback(found: re.Match[str]) -> str:
            endpoint = found.group(0)
            if "interface=" in endpoint:
                return endpoint
            return re.sub(r"^tcp:\d+", r"\g<0>:interface=127.0.0.1", endpoint)

        text = re.sub(r"\btcp:\d+[^\s\"'`]*", on_loopback, text)
        text = text.replace('"0.0.0.0"', '"127.0.0.1"')
        text = re.sub(r'"[\w.-]+\.example\.invalid"', '"127.0.0.1"', text)
        text = re.sub(r"(?<![\w./-])/tmp/", f"{self.folder}/", text)
        return re.sub(r"(?<![\w./-])\.venv/bin/", f"{BIN}/", text)

    def write(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.relocate(text), encoding="utf-8")
        self.sources[name] = text
        return path

    def env(self, **extra: str) -> dict[str, str]:
        return environment(
            PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            PYTHONPATH=str(self.folder),
            **extra,
        )

    def run(self, argv: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
        """``argv``, run to its end in the project; it must exit with status 0 and print no traceback."""
        result = subprocess.run(
            argv, cwd=self.folder, env=self.env(**extra), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert result.returncode == 0, f"{argv[-1]!r} failed:\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def shell(self, line: str) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", self.relocate(line)])

    def ports_named(self, line: str) -> list[str]:
        """The documented ports that ``line``, or a file of the project that it names, mentions."""
        texts = [line, *(self.sources.get(word, "") for word in shlex.split(line, comments=True))]
        return [port for port in PORTS if any(re.search(rf"\b{port}\b", text) for text in texts)]


def stands_for(block: Block) -> str | None:
    """The file of the reader's project that a python block is, if it names one."""
    if block.language != "python":
        return None
    named = re.fullmatch(r"# (?P<file>[\w.-]+(/[\w.-]+)*\.(py|tac))(: .*| \(.*\))?", block.first_line)
    if named:
        return named.group("file")
    if block.marker:
        docstring = ast.get_docstring(ast.parse(block.text)) or ""
        named = re.match(r"(?P<file>[\w.-]+\.py): ", docstring)
        return named.group("file") if named else None
    return None


def project_for(block: Block, folder: Path) -> Project:
    """The project of ``block``: see the module's docstring."""
    project = Project(folder, {port: free_port() for port in PORTS})
    for source in sorted((EXAMPLES / "myinterface").rglob("*.py")):
        project.write(source.relative_to(EXAMPLES).as_posix(), source.read_text(encoding="utf-8"))
    project.write("service.tac", (EXAMPLES / "stage0.tac").read_text(encoding="utf-8"))
    project.write("examples/side_by_side.py", (ROOT / "examples" / "side_by_side.py").read_text(encoding="utf-8"))
    project.write("tests/__init__.py", "")
    project.write("tests/samples.py", f'"""Made-up admissions."""\n\nADMISSIONS = {ADMISSIONS!r}\n')
    for text in ADMISSIONS:
        project.write(f"admissions/{text.split('|')[9]}.hl7", text)
    for earlier in BLOCKS:
        name = stands_for(earlier)
        if name and earlier.path == block.path and earlier.line < block.line:
            project.write(name, earlier.text)
    if ".pem" in block.text:
        certificates(project.folder)
    return project


def certificates(folder: Path) -> None:
    """The mutual TLS files the pages name: the bridge's and a sender's, self-signed, each trusted by the other."""
    from tests.support import self_signed

    for side, cert, key, trusted_as in (
        ("bridge", "bridge-cert.pem", "bridge-key.pem", "bridge-ca.pem"),
        ("sender", "sender.pem", "sender-key.pem", "senders-ca.pem"),
    ):
        (folder / side).mkdir()
        made_cert, made_key = self_signed(folder / side)
        for name, made in ((cert, made_cert), (key, made_key), (trusted_as, made_cert)):
            (folder / name).write_bytes(made.read_bytes())


# Services


def answer(process: subprocess.Popen[str], port: int, control_id: str) -> str:
    """The ACK of a made-up message sent to ``port``, once the process listens there."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return send_one("127.0.0.1", port, control_id)
        except ConnectionRefusedError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nothing answered on port {port}") from None
            time.sleep(0.1)


def check_listening(project: Project, process: subprocess.Popen[str], ports: list[str]) -> None:
    """Each MLLP port answers a made-up ADT^A01 with AA; each metrics port serves /metrics."""
    mllp = [port for port in ports if PORTS[port] == "mllp"]
    for number, port in enumerate(mllp, 1):
        reply = answer(process, project.ports[port], f"DOCPORT{number}")
        assert f"MSA|AA|DOCPORT{number}" in reply, reply
    for port in ports:
        if PORTS[port] == "metrics":
            url = f"http://127.0.0.1:{project.ports[port]}/metrics"
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                assert "hl7bridge_messages_total" in response.read().decode()


@contextlib.contextmanager
def serving(project: Project, line: str) -> Iterator[None]:
    """The shell command ``line`` as a service (see the module's docstring), while the block goes on."""
    ports = project.ports_named(line)
    assert ports, f"{line!r} names no documented port: add it to PORTS"
    process = subprocess.Popen(
        ["sh", "-c", "exec " + project.relocate(line)],
        cwd=project.folder,
        env=project.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Lines(process.stdout)
    try:
        try:
            check_listening(project, process, ports)
        except (AssertionError, OSError) as error:
            stop(process)
            raise AssertionError(f"{line!r}: {error}\nIt printed:\n{output.rest()}") from error
        yield
    finally:
        stop(process)
        log = output.rest()
    assert "Traceback" not in log, log


# Shell commands


def service(project: Project, line: str) -> None:
    with serving(project, line):
        pass


def make_dry_run(target: str) -> str:
    """The last command ``make -n TARGET`` prints in the checkout: what the target runs."""
    env = {key: value for key, value in environment().items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "-n", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def make_run_command() -> str:
    served = re.fullmatch(r"(\S*/)?hl7bridge (?P<arguments>serve .*)", make_dry_run("run"))
    assert served, "make run should run hl7bridge serve"
    return "hl7bridge " + served.group("arguments")


def make_run(project: Project, line: str) -> None:
    service(project, make_run_command())


def make_test(project: Project, line: str) -> None:
    assert re.fullmatch(r"\S*python -m pytest.*", make_dry_run("test"))


def make_docs(project: Project, line: str) -> None:
    assert re.fullmatch(r"\S*python -m sphinx -W .*-b html docs docs/_build/html", make_dry_run("docs"))


def pip_install(project: Project, line: str) -> None:
    """What would be installed exists: the checkout, and each extra named in setup.cfg."""
    target = re.fullmatch(r"python3 -m pip install (-e )?'?\.(\[(?P<extras>[\w,]+)\])?'?", line)
    assert target, line
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg", encoding="utf-8")
    known = set(setup["options.extras_require"])
    assert set((target["extras"] or "").split(",")) - {""} <= known, f"{line!r}: the extras are {sorted(known)}"


def run_to_end(project: Project, line: str) -> None:
    project.shell(line)


def mllp_send(project: Project, line: str) -> None:
    words = shlex.split(project.relocate(line), comments=True)
    sent = Path(words[words.index("-f") + 1]).read_text(encoding="utf-8")
    control_id = sent.strip("\x0b\x1c\r\n").split("\r")[0].split("|")[9]
    with serving(project, make_run_command()):
        # As bytes: text mode would read the CRs of an HL7 answer as line ends.
        result = subprocess.run(
            ["sh", "-c", project.relocate(line)],
            cwd=project.folder,
            env=project.env(),
            capture_output=True,
            timeout=TIMEOUT,
        )
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert f"MSA|AA|{control_id}".encode() in result.stdout, result.stdout
    # Shown on a terminal, a CR would write each segment over the one before it.
    assert b"\r" not in result.stdout, "pipe it through tr '\\r' '\\n' to show the ACK readably"


def hl7bridge_send(project: Project, line: str) -> None:
    with serving(project, make_run_command()):
        result = project.shell(line)  # its exit status is 0 only when every message is accepted
    for text in ADMISSIONS:
        assert f"MSA|AA|{text.split('|')[9]}" in result.stdout, result.stdout


def fill_journal(project: Project, url: str) -> None:
    """The journal at ``url`` as the interface's service keeping it leaves it: ADMISSIONS answered by its receiver."""
    port = free_port()
    receiver = "myinterface.receivers.AdmissionsReceiver"
    process = subprocess.Popen(
        [str(BIN / "hl7bridge"), "serve", "-e", f"tcp:{port}:interface=127.0.0.1", "-r", receiver, "--journal", url],
        cwd=project.folder,
        env=project.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Lines(process.stdout)
    try:
        output.wait_for(r"serving \S+ on 127\.0\.0\.1:")
        project.shell(f"hl7bridge send -p {port} 127.0.0.1 admissions/*.hl7")
    finally:
        stop(process)
        log = output.rest()
    assert "Traceback" not in log, log


def journal_command(project: Project, line: str) -> None:
    """``line`` run by sh once the SQLite journal it names holds ADMISSIONS and their ACKs."""
    url = re.search(r"sqlite:///[\w./-]+", line)
    assert url, f"{line!r}: the pages show SQLite journals, which this check fills"
    fill_journal(project, url.group())
    printed = project.shell(line).stdout  # replay exits with status 0 only when every ACK agreed
    if line.startswith("hl7bridge replay"):
        assert re.search(rf"^ADT\^A01\s+{len(ADMISSIONS)}\s+0\s+0\s*$", printed, re.MULTILINE), printed
    elif line.startswith("hl7bridge journal pending"):
        assert printed.endswith("0 messages received and never answered\n"), printed
    else:
        assert re.fullmatch(r"\d+ messages? received more than [\d.]+ days ago purged\n", printed), printed


def side_by_side_once(project: Project, line: str) -> None:
    printed = project.shell(line).stdout
    assert len(re.findall(r"^[\w.]+: AA for ", printed, re.MULTILINE)) == 3, printed


@dataclass(frozen=True)
class Rule:
    pattern: str
    how: str
    check: Callable[[Project, str], None] | None  # None: not run, for the reason ``how`` gives


COMMANDS = (
    Rule(r"make run", "`make -n run` must print an `hl7bridge serve` command; that runs as a service", make_run),
    Rule(r"make test", "`make -n test` must print a `python -m pytest` command (the suite runs it)", make_test),
    Rule(
        r"make docs",
        "`make -n docs` must print a Sphinx build (test_sphinx_builds_without_warnings runs it)",
        make_docs,
    ),
    Rule(
        r"python3 -m pip install .*",
        "not run (it installs); the extras it names must be in setup.cfg (`make install` installs the suite's)",
        pip_install,
    ),
    Rule(r"printf '[^']*' > /tmp/[\w.-]+", "run by sh", run_to_end),
    Rule(
        r"(\.venv/bin/)?mllp_send .*",
        "run by sh against what `make run` serves; it must print the AA of the message it sends, without CRs",
        mllp_send,
    ),
    Rule(
        r"hl7bridge serve .* --endpoint mtls:.*",
        "not run: it names certificate files (test_serve_listens_on_several_endpoints_with_mutual_tls runs one)",
        None,
    ),
    Rule(r"(twistd|hl7bridge serve) .*", "a service", service),
    Rule(r"hl7bridge send .* --cafile .*", "not run: it needs a TLS listener, certificates and a host name", None),
    Rule(
        r"hl7bridge send -p 2575 127\.0\.0\.1 admissions/\*\.hl7",
        "run by sh against what `make run` serves, with ADMISSIONS as admissions/*.hl7; each must get AA",
        hl7bridge_send,
    ),
    Rule(
        r"hl7bridge (journal (pending|purge)|replay) .*",
        "run by sh once the SQLite journal it names holds ADMISSIONS, answered by the interface's receiver; "
        "replay must find every ACK agreeing",
        journal_command,
    ),
    Rule(r"python examples/side_by_side\.py --once", "run by sh; each listener must answer AA", side_by_side_once),
    Rule(r"python [\w./-]+\.py", "a service, on the ports the script names", service),
    Rule(r"python -c .*", "run by sh; it must exit with status 0", run_to_end),
)


def commands(block: Block) -> list[str]:
    """The commands of a shell block, one per line (``\\`` continues one), without their comments (`` # `` on)."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    lines = [re.sub(r"(^|\s+)#(\s.*)?$", "", line).strip() for line in text.split("\n")]
    return [line for line in lines if line]


def rule_for(line: str) -> Rule | None:
    return next((rule for rule in COMMANDS if re.fullmatch(rule.pattern, line)), None)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda block: block.id)
def test_every_shell_command_has_a_rule(block: Block) -> None:
    assert commands(block)
    missing = [line for line in commands(block) if rule_for(line) is None]
    assert missing == [], f"no rule in COMMANDS says how to run {missing}"


def checked(block: Block) -> list[tuple[str, Callable[[Project, str], None]]]:
    """The commands of a shell block that something is checked for, each with its check."""
    return [(line, rule.check) for line in commands(block) if (rule := rule_for(line)) and rule.check]


def run_shell_block(block: Block, folder: Path) -> None:
    project = project_for(block, folder)
    for line, check in checked(block):
        check(project, line)


@pytest.mark.parametrize("block", [block for block in SHELL_BLOCKS if checked(block)], ids=lambda block: block.id)
def test_shell_block_runs(block: Block, ran: dict[str, Exception | None]) -> None:
    failure = ran[block.id]
    if failure is not None:
        raise failure


def rst_literal_blocks(path: Path) -> list[Block]:
    """The literal blocks (a paragraph ending in ``::``, then indented lines) of a reStructuredText file."""
    found = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines):
        if not line.rstrip().endswith("::") or line.lstrip().startswith(".. "):
            continue
        end = number + 1
        while end < len(lines) and (not lines[end].strip() or lines[end].startswith((" ", "\t"))):
            end += 1
        body = textwrap.dedent("\n".join(lines[number + 1 : end])).strip("\n") + "\n"
        found.append(Block(path.relative_to(ROOT).as_posix(), number + 3, body, "literal"))
    return found


@pytest.mark.parametrize("path", [path for path in documented_files() if path.suffix == ".rst"], ids=lambda p: p.name)
def test_no_command_hides_in_a_literal_block(path: Path) -> None:
    """A ``::`` block is not run: a command there must be a ``.. code-block:: sh`` instead."""
    hidden = [f"{block.id}: {line}" for block in rst_literal_blocks(path) for line in commands(block) if rule_for(line)]
    assert hidden == []


# Python blocks


def run_script(block: Block, project: Project) -> None:
    script = project.write(stands_for(block) or "snippet.py", block.text)
    project.run(command(block, script))


# The kit is a pytest11 entry point of the installed hl7bridge. A virtualenv
# whose hl7bridge metadata predates that entry point (an editable install not
# redone since) lacks it; register the plugin then, as the entry point would.
KIT_CONFTEST = """
import hl7bridge.testing


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("hl7bridge"):
        config.pluginmanager.register(hl7bridge.testing, "hl7bridge")
"""


def pytest_on_the_reactor(project: Project, test_file: str) -> None:
    (project.folder / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")
    (project.folder / "conftest.py").write_text(KIT_CONFTEST, encoding="utf-8")
    # Hypothesis is in the suite's virtualenv, not in a project like the reader's; its plugin takes seconds to load.
    unrelated = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
    result = project.run([sys.executable, "-m", "pytest", "-q", *unrelated, test_file])
    assert re.search(r"\d+ passed", result.stdout), result.stdout


def run_pytest(block: Block, project: Project) -> None:
    project.write("test_snippet.py", block.text)
    pytest_on_the_reactor(project, "test_snippet.py")


def run_service(block: Block, project: Project) -> None:
    script = project.write(stands_for(block) or "service.py", block.text)
    process = subprocess.Popen(
        command(block, script),
        cwd=project.folder,
        env=project.env(MLLP_HOST="127.0.0.1", MLLP_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Lines(process.stdout)
    try:
        found = output.wait_for(r"listening on (\S+):(\d+)")
        reply = send_one(found.group(1), int(found.group(2)), "DOCSERVE1")
        assert "MSA|AA|DOCSERVE1" in reply, reply
    finally:
        stop(process)
    log = output.rest()
    assert "Traceback" not in log, log


def run_client(block: Block, project: Project) -> None:
    folder = project.folder / "messages"
    folder.mkdir()
    for number in (1, 2):
        # Files as people keep them: one message each, segments on lines of their own.
        text = MESSAGE.format(id=f"DOCCLIENT{number}").replace("\r", "\n")
        (folder / f"adt-{number}.hl7").write_text(text, encoding="utf-8")
    server = subprocess.Popen(
        [sys.executable, "-m", "hl7bridge", "serve", "--endpoint", "tcp:0:interface=127.0.0.1"],
        cwd=project.folder,
        env=project.env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    log = Lines(server.stderr)
    try:
        port = log.wait_for(r"serving \S+ on 127\.0\.0\.1:(\d+)").group(1)
        script = project.write(stands_for(block) or "client.py", block.text)
        result = project.run(command(block, script, "127.0.0.1", port, str(folder)))
    finally:
        stop(server)
        log.rest()
    for number in (1, 2):
        assert f"MSA|AA|DOCCLIENT{number}" in result.stdout, result.stdout


def named_file(block: Block) -> str:
    name = stands_for(block)
    assert name is not None
    return name


def run_test_file(block: Block, project: Project) -> None:
    pytest_on_the_reactor(project, str(project.write(named_file(block), block.text)))


def run_plain_test_file(block: Block, project: Project) -> None:
    test_file = project.write(named_file(block), block.text)
    (project.folder / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    no_plugin = python_without(BLOCKED_BY_NO_TWISTED, "pytest", "-q", "-p", "no:cacheprovider", str(test_file))
    result = project.run(no_plugin, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert re.search(r"\d+ passed", result.stdout), result.stdout


def run_file_command(block: Block, project: Project) -> None:
    name = named_file(block)
    project.write(name, block.text)
    line = block.first_line.split(": ", 1)[1]
    assert name in shlex.split(line), f"{line!r} should run {name}"
    rule = rule_for(line)
    assert rule is not None and rule.check is not None, f"no rule in COMMANDS runs {line!r}"
    rule.check(project, line)


def import_file(block: Block, project: Project) -> None:
    name = named_file(block)
    project.write(name, block.text)
    project.run([sys.executable, "-c", f"import {name.removesuffix('.py').replace('/', '.')}"])


@dataclass(frozen=True)
class PythonRule:
    pattern: str
    how: str
    check: Callable[[Block, Project], None] | None  # None: compiled only


PYTHON_RULES = (
    PythonRule(r"# doctest: run( no-twisted)?", "a script; it must exit with status 0", run_script),
    PythonRule(r"# doctest: pytest", "a test module; pytest runs it", run_pytest),
    PythonRule(r"# doctest: serve( no-twisted)?", "a service on $MLLP_PORT", run_service),
    PythonRule(r"# doctest: client( no-twisted)?", "a client of hl7bridge serve", run_client),
    PythonRule(r"# tests/test_\w+\.py \(pytest --reactor=asyncio\)", "pytest runs it", run_test_file),
    PythonRule(
        r"# tests/test_\w+\.py: plain pytest, no plugin needed",
        "pytest runs it, with no plugin and without Twisted, txHL7 or hl7bridge",
        run_plain_test_file,
    ),
    PythonRule(r"# [\w.-]+\.(py|tac): .+", "the command after the colon runs it", run_file_command),
    PythonRule(r"# \w+(/\w+)*\.py", "imported as its module", import_file),
    PythonRule(r"# Before: .*", "compiled only: the code that the blocks after it replace", None),
)


def python_rule_for(block: Block) -> PythonRule | None:
    return next((rule for rule in PYTHON_RULES if re.fullmatch(rule.pattern, block.first_line)), None)


def test_every_python_block_has_a_rule() -> None:
    missing = [block.id for block in BLOCKS if python_rule_for(block) is None]
    assert missing == [], "say how to run these blocks: see PYTHON_RULES"


RUNNABLE = [block for block in BLOCKS if (rule := python_rule_for(block)) is not None and rule.check is not None]


def run_python_block(block: Block, folder: Path) -> None:
    rule = python_rule_for(block)
    assert rule is not None and rule.check is not None
    rule.check(block, project_for(block, folder))


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.id)
def test_runnable_block_runs(block: Block, ran: dict[str, Exception | None]) -> None:
    failure = ran[block.id]
    if failure is not None:
        raise failure


@pytest.fixture(scope="module")
def ran(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exception | None]:
    """The blocks that the session's tests of this module run, run side by side: each one's failure, or None.

    A block's run mostly waits (for processes to start, for services to answer),
    so four at a time take about half the time that one at a time takes.
    """
    runs = {"test_runnable_block_runs": run_python_block, "test_shell_block_runs": run_shell_block}
    chosen: list[tuple[Block, Callable[[Block, Path], None]]] = []
    for item in request.session.items:
        if isinstance(item, pytest.Function) and item.module is sys.modules[__name__] and item.originalname in runs:
            block = item.callspec.params["block"]
            assert isinstance(block, Block)
            chosen.append((block, runs[item.originalname]))

    # Made here, not in the threads: pytest makes its base folder on first use, and that is not thread-safe.
    folders = [tmp_path_factory.mktemp(re.sub(r"\W", "_", block.id)) for block, _ in chosen]

    def outcome(block: Block, run: Callable[[Block, Path], None], folder: Path) -> Exception | None:
        try:
            run(block, folder)
        except Exception as failure:  # raised again by the block's own test
            return failure
        return None

    blocks, runners = zip(*chosen, strict=True) if chosen else ((), ())
    with ThreadPoolExecutor(4) as pool:
        failures = list(pool.map(outcome, blocks, runners, folders))
    return {block.id: failure for block, failure in zip(blocks, failures, strict=True)}


def test_examples_have_the_code_the_guide_says_they_have() -> None:
    """ "`examples/migration/stage3.py` is the `routing.py` above": the same code, docstrings aside."""
    text = (ROOT / "MIGRATION.md").read_text(encoding="utf-8")
    claims = list(re.finditer(r"`examples/migration/(?P<example>[\w.]+)` is the `(?P<file>[\w./]+)` above", text))
    assert len(claims) >= 2
    for claim in claims:
        line = text.count("\n", 0, claim.start()) + 1
        shown = [b for b in BLOCKS if b.path == "MIGRATION.md" and b.line < line and named(b, claim["file"])]
        assert shown, claim.group(0)
        assert code_of(shown[-1].text) == code_of((EXAMPLES / claim["example"]).read_text(encoding="utf-8")), claim[0]


def named(block: Block, name: str) -> bool:
    """Whether the block stands for a file called ``name`` (``routing.py``: ``myinterface/routing.py``)."""
    return Path(stands_for(block) or "").name == name


def code_of(source: str) -> str:
    """The code of a module, its docstring and comments left out."""
    tree = ast.parse(source)
    if ast.get_docstring(tree) is not None:
        tree.body = tree.body[1:]
    return ast.dump(tree)


# What the pages promise to cover


def test_operations_page_names_every_setting_and_option() -> None:
    from hl7bridge.cli import ServeOptions
    from hl7bridge.session import Settings

    text = (ROOT / "docs" / "operations.rst").read_text(encoding="utf-8")
    missing = [field.name for field in dataclasses.fields(Settings) if f"``{field.name}``" not in text]
    entries: list[Any] = [*ServeOptions.optParameters, *ServeOptions.optFlags]
    options = [entry[0] for entry in entries]
    missing += [f"--{name}" for name in options if f"--{name}" not in text]
    assert not missing, f"docs/operations.rst does not mention {missing}"


# Modules that have no page of their own in the API reference, and why.
NOT_IN_API = {
    "hl7bridge.__main__": "runs the command line",
    "hl7bridge.cli": "documented as a command in operations.rst",
    "hl7bridge.migration": "re-exports router and shadow, which are documented",
}


def test_api_reference_has_every_module() -> None:
    text = (ROOT / "docs" / "api.rst").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. automodule:: (\S+)", text, re.MULTILINE))
    modules = set()
    for path in (ROOT / "hl7bridge").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert modules - documented - set(NOT_IN_API) == set()
    assert documented <= modules


def test_sphinx_builds_without_warnings(tmp_path: Path) -> None:
    """What ``make docs`` does, into a folder of the test's own (the test extra has Sphinx and MyST)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    html = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(html)],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The Markdown pages are in the build, MIGRATION.md among them, with its links to its own stages.
    for page in ("migration", "performance", "reliability", "architecture", "changelog"):
        assert (html / f"{page}.html").is_file(), page
    migration = (html / "migration.html").read_text(encoding="utf-8")
    assert 'id="stage-6-drop-twisted"' in migration and 'href="#stage-6-drop-twisted"' in migration
