"""Install and find Twisted's asyncio reactor; nothing else knows these details.

hl7bridge runs every connection as an asyncio task. Twisted code in receivers
(Deferreds, ``deferToThread``, ``callLater``) needs a Twisted reactor, and the
only one that shares a loop with asyncio is
``twisted.internet.asyncioreactor.AsyncioSelectorReactor``. It must be installed
before anything imports ``twisted.internet.reactor``, which otherwise installs
the platform default (epoll) and can never be replaced in that process.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from hl7bridge.errors import MissingExtra, WrongReactor

_HOW_TO_FIX = (
    "call hl7bridge.reactor.install() before anything imports twisted.internet.reactor, "
    "run twistd with --reactor asyncio, or pytest with --reactor asyncio"
)


def _installed() -> object | None:
    return sys.modules.get("twisted.internet.reactor")


def new_event_loop(uvloop: bool = False) -> asyncio.AbstractEventLoop:
    """A new asyncio loop; a uvloop one if asked (needs the ``uvloop`` extra)."""
    if not uvloop:
        return asyncio.new_event_loop()
    try:
        import uvloop as _uvloop
    except ImportError as exc:
        raise MissingExtra("uvloop=True", "uvloop") from exc
    return _uvloop.new_event_loop()


def install(loop: asyncio.AbstractEventLoop | None = None, *, uvloop: bool = False) -> Any:
    """Create a loop, make it current, and install Twisted's asyncio reactor on it.

    Args:
        loop: the loop to run on; a new one (see ``uvloop``) by default.
        uvloop: make the new loop a uvloop loop.

    Returns:
        The installed reactor. Calling again returns it, if it is an asyncio
        reactor on the same loop.

    Raises:
        WrongReactor: another reactor, or an asyncio reactor on another loop, is
            already installed.
    """
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    existing = _installed()
    if existing is not None:
        if not isinstance(existing, AsyncioSelectorReactor):
            raise WrongReactor(f"{type(existing).__name__} is already installed; {_HOW_TO_FIX}")
        if loop is not None and existing._asyncioEventloop is not loop:
            raise WrongReactor("an asyncio reactor is already installed on another event loop")
        return existing
    if loop is None:
        loop = new_event_loop(uvloop)
    asyncio.set_event_loop(loop)
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    return _installed()


def event_loop() -> asyncio.AbstractEventLoop:
    """The asyncio loop of the installed Twisted reactor.

    Raises:
        WrongReactor: no reactor is installed, or it is not the asyncio reactor.
    """
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    reactor = _installed()
    if reactor is None:
        raise WrongReactor(f"no Twisted reactor is installed; {_HOW_TO_FIX}")
    if not isinstance(reactor, AsyncioSelectorReactor):
        raise WrongReactor(
            f"hl7bridge needs Twisted's asyncio reactor, but {type(reactor).__name__} is installed; {_HOW_TO_FIX}"
        )
    loop: asyncio.AbstractEventLoop = reactor._asyncioEventloop
    return loop


def check_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Refuse to serve on ``loop`` when an installed reactor runs on another loop.

    With no reactor installed, asyncio-only use is fine. With one installed,
    Deferreds from receivers fire on the reactor's loop, so it must be ``loop``.
    """
    if _installed() is None:
        return
    if event_loop() is not loop:
        raise WrongReactor(
            "the asyncio reactor is installed on another event loop than the one serving; "
            "start serving from the loop the reactor runs (hl7bridge.reactor.install(loop))"
        )
