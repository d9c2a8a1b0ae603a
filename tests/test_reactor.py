"""Reactor installation and the clear errors of the wrong reactor; each case in its own process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_install_gives_an_asyncio_reactor_on_its_own_loop() -> None:
    result = run(
        """
        import asyncio
        from hl7bridge.reactor import install, event_loop
        reactor = install()
        assert install() is reactor
        from twisted.internet import reactor as installed
        assert installed is reactor
        assert event_loop() is reactor._asyncioEventloop
        assert asyncio.get_event_loop_policy().get_event_loop() is event_loop()
        print("ok")
        """
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_install_refuses_when_another_reactor_is_installed() -> None:
    result = run(
        """
        from twisted.internet import reactor
        from hl7bridge.reactor import install
        install()
        """
    )
    assert result.returncode != 0
    assert "WrongReactor" in result.stderr and "is already installed" in result.stderr
    assert "hl7bridge.reactor.install() before anything imports twisted.internet.reactor" in result.stderr


def test_twisted_face_on_the_default_reactor_fails_at_listen_with_a_message() -> None:
    result = run(
        """
        from twisted.internet import reactor
        from hl7bridge.mllp import MLLPFactory
        from hl7bridge.receiver import LoggingReceiver
        reactor.listenTCP(0, MLLPFactory(LoggingReceiver()), interface="127.0.0.1")
        """
    )
    assert result.returncode != 0
    assert "hl7bridge.errors.WrongReactor: hl7bridge needs Twisted's asyncio reactor" in result.stderr


def test_asyncio_face_on_the_default_reactor_fails_with_a_message() -> None:
    result = run(
        """
        import asyncio
        from twisted.internet import reactor
        import hl7bridge
        from hl7bridge.receiver import LoggingReceiver
        async def main():
            await hl7bridge.serve(LoggingReceiver(), "127.0.0.1", 0)
        asyncio.run(asyncio.wait_for(main(), 30))
        """
    )
    assert result.returncode != 0
    assert "hl7bridge.errors.WrongReactor: hl7bridge needs Twisted's asyncio reactor" in result.stderr


def test_twisted_endpoint_on_the_default_reactor_fails_its_deferred_with_a_message() -> None:
    result = run(
        """
        from twisted.internet import endpoints, reactor
        from hl7bridge.mllp import MLLPFactory
        from hl7bridge.receiver import LoggingReceiver
        listening = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        listening.listen(MLLPFactory(LoggingReceiver())).addErrback(
            lambda failure: print(f"{failure.type.__name__}: {failure.getErrorMessage()}")
        )
        """
    )
    assert result.stdout.startswith("WrongReactor: hl7bridge needs Twisted's asyncio reactor"), result.stderr


def test_asyncio_face_refuses_a_reactor_on_another_loop() -> None:
    result = run(
        """
        import asyncio
        import hl7bridge
        from hl7bridge.reactor import install
        from hl7bridge.receiver import LoggingReceiver
        install(asyncio.new_event_loop())
        async def main():
            await hl7bridge.serve(LoggingReceiver(), "127.0.0.1", 0)
        asyncio.run(main())
        """
    )
    assert result.returncode != 0
    assert "installed on another event loop" in result.stderr


def test_asyncio_face_without_any_reactor_serves() -> None:
    result = run(
        """
        import asyncio
        import hl7bridge
        from hl7bridge.receiver import LoggingReceiver
        async def main():
            server = await hl7bridge.serve(LoggingReceiver(), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\\x0bMSH|^~\\\\&|A|B|C|D|2024||ADT^A01|X1|P|2.5\\r\\x1c\\r")
            reply = await reader.readuntil(b"\\x1c\\r")
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()
            print(reply.split(b"\\r")[1].decode())
        asyncio.run(main())
        """
    )
    assert result.stdout.strip() == "MSA|AA|X1", result.stderr


def test_uvloop_install() -> None:
    pytest.importorskip("uvloop")
    result = run(
        """
        from hl7bridge.reactor import install
        reactor = install(uvloop=True)
        print(type(reactor._asyncioEventloop).__module__.split(".")[0])
        """
    )
    assert result.stdout.strip() == "uvloop", result.stderr
