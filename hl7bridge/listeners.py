"""Endpoint strings served by asyncio's own servers: how ``hl7bridge serve`` and ``twistd hl7bridge`` listen.

A :class:`Listener` takes a ``tcp:``, ``unix:``, ``ssl:`` or ``mtls:``
endpoint string (:func:`hl7bridge.endpoints.parse_listen_endpoint`), binds its
socket at once (so a port in use, or a privileged port under twistd, fails
where it used to) and then serves it with ``loop.create_server`` or
``loop.create_unix_server`` and ``hl7.mllp``'s stream protocol, reader and
writer, as :func:`hl7bridge.serve` does: every connection goes to
:meth:`Engine.connected <hl7bridge.session.Engine.connected>`. Twisted's
transport is not involved, which saves its cost per message; receivers still
get everything Twisted gives them, since the reactor runs on the same loop.

TLS (``ssl:``, ``mtls:``): each accepted connection must finish its
handshake within ``tls_handshake_timeout`` seconds, and only then is it a
connection of the engine (and counted against ``max_connections``). A
handshake that fails or times out is logged at INFO, with the peer and the
reason, and counted in the engine's metrics as a peer problem
(:data:`TLS_REFUSED`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
import sys
from typing import Any

from hl7.mllp import HL7StreamProtocol, HL7StreamReader
from twisted.python.lockfile import FilesystemLock

from hl7bridge.endpoints import ListenEndpoint, parse_listen_endpoint
from hl7bridge.session import Engine, peer_name

log = logging.getLogger("hl7bridge.listeners")

#: Whether ``ssl:`` and ``mtls:`` are served with asyncio's TLS. Before Python 3.11
#: (whose TLS layer was rewritten), asyncio's TLS transport fails in ``start_tls``
#: and in ``pause_reading`` once the connection under it is gone, so Twisted's TLS
#: serves those endpoints there, without the handshake timeout.
ASYNCIO_TLS = sys.version_info >= (3, 11)

#: Seconds a TLS client has to finish its handshake.
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 30.0

#: The kind of peer problem counted (``hl7bridge_problems_total{kind=...}``) for each refused handshake.
TLS_REFUSED = "TLS handshake refused"

# OpenSSL's reasons for a server-side handshake failure, as a reader of the log understands them.
_NO_CERTIFICATE = {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"}


def refusal_reason(exc: BaseException, timeout: float | None) -> str | None:
    """Why a TLS handshake failed, in words for the log; None if the peer just went away.

    It names the kind of failure only (OpenSSL's reason, the certificate
    check's verdict), never what a certificate holds.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        if reason in _NO_CERTIFICATE:
            return f"no client certificate ({reason})"
        if reason in _NOT_TLS:
            return f"not TLS ({reason})"
        return reason
    if isinstance(exc, ConnectionAbortedError):
        # asyncio aborts a handshake that takes longer than ssl_handshake_timeout this way.
        return f"no TLS handshake within {timeout}s"
    return None


class _Handshaking(asyncio.Protocol):
    """A TLS connection until its handshake is done, when a stream protocol takes over.

    What arrives between the end of the handshake and the take-over (the
    first message may come in the same packet as the handshake's last
    bytes) is kept and passed on.
    """

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.early: list[bytes] = []
        self.eof = False
        self.lost: tuple[BaseException | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not a byte for this protocol: the handshake's bytes are for start_tls().
        transport.pause_reading()  # type: ignore[attr-defined]
        self.listener._handshake(self, transport)

    def data_received(self, data: bytes) -> None:
        self.early.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = (exc,)


class Listener:
    """One endpoint string served by asyncio's own server on ``loop``, for ``engine``.

    Args:
        endpoint: what to listen on (:func:`~hl7bridge.endpoints.parse_listen_endpoint`).
        engine: the engine that serves every connection (one engine may have several listeners).
        loop: the loop to serve on: the installed reactor's.
        tls_handshake_timeout: seconds a TLS client has to finish its handshake.
    """

    def __init__(
        self,
        endpoint: ListenEndpoint,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self.engine = engine
        self.loop = loop
        self.tls_handshake_timeout = tls_handshake_timeout
        self.server: asyncio.AbstractServer | None = None
        self._socket: socket.socket | None = None
        self._context: ssl.SSLContext | None = None
        self._lock: FilesystemLock | None = None
        self._handshakes: dict[asyncio.Task[None], asyncio.BaseTransport] = {}

    def bind(self) -> None:
        """Read the TLS files, bind the socket and listen: connections wait until :meth:`start`.

        Raises:
            OSError: the address is in use or not allowed, or a file cannot be read.
            ssl.SSLError, ValueError: a TLS file is not what it should be.
        """
        endpoint = self.endpoint
        if endpoint.tls:
            self._context = endpoint.tls_context()
        if endpoint.kind == "unix":
            self._socket = self._bind_unix()
        else:
            family = socket.AF_INET6 if ":" in endpoint.interface else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                # As Twisted's TCP ports do: a restart may bind while old connections linger in TIME_WAIT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((endpoint.interface, endpoint.port))
                sock.listen(endpoint.backlog)
            except BaseException:
                sock.close()
                raise
            self._socket = sock
        self._socket.setblocking(False)

    def _bind_unix(self) -> socket.socket:
        path = self.endpoint.address
        if self.endpoint.lockfile:
            # Twisted's rule: the lock says whether another process serves this path;
            # if none does, a socket file left behind by one that died is removed.
            self._lock = FilesystemLock(path + ".lock")
            if not self._lock.lock():
                self._lock = None
                raise OSError(f"{path} is in use: cannot acquire the lock {path}.lock")
            if not self._lock.clean and _is_socket(path):
                os.remove(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, self.endpoint.mode)
            sock.listen(self.endpoint.backlog)
        except BaseException:
            sock.close()
            self._unlock()
            raise
        return sock

    @property
    def where(self) -> str:
        """Where it listens: ``HOST:PORT``, or the unix socket's path."""
        assert self._socket is not None, "bind() first"
        name = self._socket.getsockname()
        return peer_name(name) if isinstance(name, tuple) else str(name)

    async def start(self) -> None:
        """Start accepting connections (after :meth:`bind`)."""
        assert self._socket is not None, "bind() first"
        factory: Any = self._handshaking if self._context is not None else self._stream_protocol
        if self.endpoint.kind == "unix":
            self.server = await self.loop.create_unix_server(factory, sock=self._socket)
        else:
            self.server = await self.loop.create_server(factory, sock=self._socket)

    def close(self) -> None:
        """Stop accepting; handshakes under way are abandoned, the unix socket file removed.

        Connections already served are the engine's to drain (``Engine.close``).
        """
        if self.server is not None:
            self.server.close()
        elif self._socket is not None:
            self._socket.close()
        for task, transport in list(self._handshakes.items()):
            task.cancel()
            transport.abort()  # type: ignore[attr-defined]
        if self.endpoint.kind == "unix" and self._socket is not None:
            with contextlib.suppress(OSError):
                if _is_socket(self.endpoint.address):
                    os.remove(self.endpoint.address)
        self._socket = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.unlock()
            self._lock = None

    # Connections

    def _stream_protocol(self) -> HL7StreamProtocol:
        reader = HL7StreamReader(loop=self.loop)
        return HL7StreamProtocol(reader, self.engine.connected, loop=self.loop)

    def _handshaking(self) -> _Handshaking:
        return _Handshaking(self)

    def _handshake(self, protocol: _Handshaking, transport: asyncio.BaseTransport) -> None:
        task = self.loop.create_task(self._secure(protocol, transport))
        self._handshakes[task] = transport
        task.add_done_callback(self._handshakes.pop)

    async def _secure(self, handshaking: _Handshaking, transport: asyncio.BaseTransport) -> None:
        """The TLS handshake of one connection; then its stream protocol serves it."""
        assert self._context is not None
        peer = peer_name(transport.get_extra_info("peername"))
        try:
            secured = await self.loop.start_tls(
                transport,
                handshaking,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self.tls_handshake_timeout,
            )
        except Exception as exc:
            transport.close()
            reason = refusal_reason(exc, self.tls_handshake_timeout)
            if reason is None:
                log.debug("%s: connection closed during the TLS handshake: %s", peer, exc)
                return
            log.info("%s: TLS handshake refused: %s", peer, reason)
            if self.engine.metrics is not None:
                self.engine.metrics.problem(TLS_REFUSED)
            return
        assert secured is not None
        stream = self._stream_protocol()
        secured.set_protocol(stream)
        stream.connection_made(secured)
        if handshaking.early:
            stream.data_received(b"".join(handshaking.early))
        if handshaking.eof:
            stream.eof_received()
        if handshaking.lost is not None:
            stream.connection_lost(handshaking.lost[0])


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def listener_for(
    description: str,
    engine: Engine,
    loop: asyncio.AbstractEventLoop,
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
) -> Listener | None:
    """A :class:`Listener` for ``description``, not yet bound; None if Twisted's endpoints must serve it.

    Raises:
        ValueError: the string is one of the types hl7bridge listens on, but malformed.
    """
    endpoint = parse_listen_endpoint(description)
    if endpoint is None or (endpoint.tls and not ASYNCIO_TLS):
        return None
    return Listener(endpoint, engine, loop, tls_handshake_timeout)
