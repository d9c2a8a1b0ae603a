"""The code in the documentation is checked here, so that the guide cannot rot.

Every ```python block of MIGRATION.md, README.md and docs/*.md, and every
``.. code-block:: python`` of docs/*.rst, is compiled, and whatever it imports
from hl7bridge must exist. A block whose first line is a marker comment is
also run, in a subprocess of its own, each step bounded by a 60 s timeout:

``# doctest: run``
    A script; it must exit with status 0. It listens, if at all, on port 0.
``# doctest: pytest``
    A test module; pytest runs it with ``--reactor=asyncio`` (set in a
    ``pytest.ini`` next to it), as a project using ``hl7bridge.testing`` does.
``# doctest: serve``
    A service that listens until stopped. It is started with ``MLLP_PORT=0``,
    must print ``listening on HOST:PORT``, must answer a made-up ADT^A01 with
    AA, and is then stopped with SIGTERM.
``# doctest: client``
    A script run as ``script HOST PORT FOLDER`` against ``hl7bridge serve``
    (the logging receiver), with a folder of two made-up messages; it must exit
    with status 0 and print both ACKs.

``no-twisted`` after the marker (``# doctest: serve no-twisted``) makes
``twisted``, ``txHL7`` and ``hl7bridge`` unimportable in that subprocess.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60

MARKER = re.compile(r"#\s*doctest:\s*(?P<mode>\S+)(?P<flags>[^\n]*)")
MODES = ("run", "pytest", "serve", "client")
FLAGS = ("no-twisted",)
BLOCKED_BY_NO_TWISTED = ("twisted", "txHL7", "hl7bridge")

# A fence or directive whose language looks like Python but is spelled in a way
# the extractors below would not pick up.
PYTHON_LIKE = {"py", "py3", "python3", "pycon", "ipython", "Python"}

MESSAGE = (
    "MSH|^~\\&|DOCSEND|TESTFAC|DOCRECV|TESTFAC|20240101120000||ADT^A01^ADT_A01|{id}|P|2.5\r"
    "PID|1||000000^^^TEST||TESTPATIENT^ALPHA\r"
)


@dataclass(frozen=True)
class Block:
    path: str
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def marker(self) -> tuple[str, tuple[str, ...]] | None:
        first = self.text.lstrip("\n").split("\n", 1)[0]
        found = MARKER.fullmatch(first.strip())
        if found is None:
            return None
        return found.group("mode"), tuple(found.group("flags").split())


def markdown_blocks(path: Path) -> list[Block]:
    """The ```python fences of a Markdown file (indented ones too, as in list items)."""
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
        language = info.split()[0] if info else ""
        if language == "python":
            body = textwrap.dedent("\n".join(lines[number + 1 : end]))
            found.append(Block(path.relative_to(ROOT).as_posix(), number + 2, body))
        number = end + 1
    return found


def rst_blocks(path: Path) -> list[Block]:
    """The ``.. code-block:: python`` directives of a reStructuredText file."""
    found = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines):
        directive = re.fullmatch(r"(?P<indent>[ \t]*)\.\. (code-block|code|sourcecode)::[ \t]*python[ \t]*", line)
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
        found.append(Block(path.relative_to(ROOT).as_posix(), body_start + 1, body))
    return found


def documented_files() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "MIGRATION.md", ROOT / "README.md", *sorted(docs.glob("*.rst")), *sorted(docs.glob("*.md"))]


def all_blocks() -> list[Block]:
    blocks = []
    for path in documented_files():
        blocks += markdown_blocks(path) if path.suffix == ".md" else rst_blocks(path)
    return blocks


BLOCKS = all_blocks()
RUNNABLE = [block for block in BLOCKS if block.marker is not None]


def test_blocks_are_found_where_expected() -> None:
    per_file = {path.relative_to(ROOT).as_posix(): 0 for path in documented_files()}
    for block in BLOCKS:
        per_file[block.path] += 1
    assert per_file["MIGRATION.md"] >= 10, per_file
    assert per_file["README.md"] >= 1, per_file
    for page in ("docs/handlers.rst", "docs/testing.rst", "docs/quickstart.rst"):
        assert per_file[page] >= 1, per_file
    modes = {block.marker[0] for block in RUNNABLE if block.marker}
    assert modes == set(MODES), f"every kind of runnable block should be used at least once: {modes}"


@pytest.mark.parametrize("path", documented_files(), ids=lambda path: path.name)
def test_no_python_block_escapes_the_checks(path: Path) -> None:
    """A block written as ```py or ``.. code-block:: python3`` would not be checked: spell it python."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        languages = re.findall(r"^[ \t]*(?:```+|~~~+)[ \t]*([^\s`]+)", text, re.MULTILINE)
    else:
        languages = re.findall(r"^[ \t]*\.\. (?:code-block|code|sourcecode)::[ \t]*(\S+)", text, re.MULTILINE)
    assert not PYTHON_LIKE & set(languages)


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


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.id)
def test_marker_is_known(block: Block) -> None:
    assert block.marker is not None
    mode, flags = block.marker
    assert mode in MODES, f"unknown mode {mode!r}; one of {MODES}"
    assert set(flags) <= set(FLAGS), f"unknown flags {flags}; known: {FLAGS}"


# Running the blocks


def environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(extra)
    return env


BOOTSTRAP = """
import runpy, sys
for name in sys.argv[2].split(",") if sys.argv[2] else ():
    sys.modules[name] = None  # importing it now fails
script = sys.argv[1]
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def python_without(blocked: tuple[str, ...], script: Path, *args: str) -> list[str]:
    """The command that runs ``script`` as __main__ with the ``blocked`` modules unimportable."""
    return [sys.executable, "-c", BOOTSTRAP, str(script), ",".join(blocked), *args]


def command(block: Block, script: Path, *args: str) -> list[str]:
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
                break
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"{pattern!r} not printed in time; printed so far:\n{''.join(self.seen)}")

    def rest(self) -> str:
        """Everything printed, once the process has ended; the stream is closed then."""
        while True:
            try:
                line = self._queue.get(timeout=10)
            except queue.Empty:
                break
            if line is None:
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


def run_script(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.text, encoding="utf-8")
    result = subprocess.run(
        command(block, script), cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


# The kit is a pytest11 entry point of the installed hl7bridge. A virtualenv
# whose hl7bridge metadata predates that entry point (an editable install not
# redone since) lacks it; register the plugin then, as the entry point would.
KIT_CONFTEST = """
import hl7bridge.testing


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("hl7bridge"):
        config.pluginmanager.register(hl7bridge.testing, "hl7bridge")
"""


def run_pytest(block: Block, tmp_path: Path) -> None:
    (tmp_path / "test_snippet.py").write_text(block.text, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --reactor=asyncio -p no:cacheprovider\n")
    (tmp_path / "conftest.py").write_text(KIT_CONFTEST, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "test_snippet.py"],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout}\n{result.stderr}"
    assert re.search(r"\d+ passed", result.stdout), result.stdout


def run_service(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "service.py"
    script.write_text(block.text, encoding="utf-8")
    process = subprocess.Popen(
        command(block, script),
        cwd=tmp_path,
        env=environment(MLLP_HOST="127.0.0.1", MLLP_PORT="0"),
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


def run_client(block: Block, tmp_path: Path) -> None:
    folder = tmp_path / "messages"
    folder.mkdir()
    for number in (1, 2):
        # Files as people keep them: one message each, segments on lines of their own.
        text = MESSAGE.format(id=f"DOCCLIENT{number}").replace("\r", "\n")
        (folder / f"adt-{number}.hl7").write_text(text, encoding="utf-8")
    server = subprocess.Popen(
        [sys.executable, "-m", "hl7bridge", "serve", "--endpoint", "tcp:0:interface=127.0.0.1"],
        cwd=tmp_path,
        env=environment(),
        stderr=subprocess.PIPE,
        text=True,
    )
    log = Lines(server.stderr)
    try:
        port = log.wait_for(r"serving \S+ on 127\.0\.0\.1:(\d+)").group(1)
        script = tmp_path / "client.py"
        script.write_text(block.text, encoding="utf-8")
        result = subprocess.run(
            command(block, script, "127.0.0.1", port, str(folder)),
            cwd=tmp_path,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        stop(server)
        log.rest()
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout}\n{result.stderr}"
    for number in (1, 2):
        assert f"MSA|AA|DOCCLIENT{number}" in result.stdout, result.stdout


RUNNERS = {"run": run_script, "pytest": run_pytest, "serve": run_service, "client": run_client}


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.id)
def test_runnable_block_runs(block: Block, tmp_path: Path) -> None:
    assert block.marker is not None
    RUNNERS[block.marker[0]](block, tmp_path)


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
