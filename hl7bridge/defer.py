"""Deferreds and asyncio futures, converted in one place.

Twisted's own ``ensureDeferred``/``Deferred.fromCoroutine`` drive a coroutine
with Twisted's trampoline, which cannot await asyncio futures ("await wasn't
used with future"). The only safe bridges are ``Deferred.fromFuture`` over a
task the loop runs, and ``Deferred.asFuture``; nothing else in hl7bridge
converts between the two worlds.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


def to_deferred(awaitable: Awaitable[T], loop: asyncio.AbstractEventLoop | None = None) -> Deferred[T]:
    """Run ``awaitable`` (a coroutine or future) on the asyncio loop; return a Deferred of its result."""
    if isinstance(awaitable, Deferred):
        return awaitable
    if asyncio.iscoroutine(awaitable):
        return Deferred.fromFuture((loop or asyncio.get_event_loop()).create_task(awaitable))
    return Deferred.fromFuture(asyncio.ensure_future(awaitable, loop=loop))


def to_future(result: Deferred[T] | Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop) -> asyncio.Future[T]:
    """The asyncio future of a Deferred, or a task running a coroutine, on ``loop``."""
    if isinstance(result, Deferred):
        return result.asFuture(loop)
    return asyncio.ensure_future(result, loop=loop)


async def settle(result: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """The value of a handler's result: a Deferred or awaitable is awaited, a value returned."""
    if isinstance(result, Deferred):
        return await result.asFuture(loop)
    if inspect.isawaitable(result):
        return await result
    return result


def is_pending_result(result: object) -> bool:
    """Whether a handler's result is still to come: a Deferred or an awaitable."""
    return isinstance(result, Deferred) or inspect.isawaitable(result)
