"""The ``mtls:`` server endpoint string: TLS that requires a client certificate.

Twisted's ``ssl:`` server endpoint cannot ask for client certificates, so
mutual TLS on ``hl7bridge serve`` and ``twistd hl7bridge`` takes an endpoint
of its own, registered as a Twisted plugin (``twisted/plugins/hl7bridge_plugin.py``)::

    mtls:2575:privateKey=bridge-key.pem:certKey=bridge-cert.pem:caCerts=senders-ca.pem

A sender must show a certificate signed by one of the certificates in
``caCerts`` (a PEM file, one or more certificates); without one, the TLS
handshake fails and no message is read. ``interface`` and ``backlog`` work as
on ``tcp:`` and ``ssl:``. It needs Twisted's TLS dependencies
(``pip install 'twisted[tls]'``).
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    """Parses ``mtls:PORT:privateKey=KEY:certKey=CERT:caCerts=CA[:interface=ADDRESS][:backlog=N]``."""

    prefix = "mtls"

    def parseStreamServer(  # noqa: N802
        self,
        reactor: Any,
        port: str,
        privateKey: str,  # noqa: N803
        caCerts: str,  # noqa: N803
        certKey: str | None = None,  # noqa: N803
        interface: str = "",
        backlog: str = "50",
    ) -> Any:
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ServerEndpoint

        own = ssl.PrivateCertificate.loadPEM(_read(certKey or privateKey) + b"\n" + _read(privateKey))
        authorities = [ssl.Certificate.loadPEM(pem) for pem in _PEM_CERTIFICATE.findall(_read(caCerts))]
        if not authorities:
            raise ValueError(f"caCerts file {caCerts!r} holds no PEM certificate")
        options = ssl.CertificateOptions(
            privateKey=own.privateKey.original,
            certificate=own.original,
            trustRoot=ssl.trustRootFromCertificates(authorities),
        )
        return SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)


# Endpoint strings that hl7bridge listens on itself, with asyncio's own servers.

#: The arguments of each endpoint type, in the order Twisted takes them positionally.
_ARGUMENTS = {
    "tcp": ("port", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain", "dhParameters"),
    "mtls": ("port", "privateKey", "caCerts", "certKey", "interface", "backlog"),
}
#: Arguments that Twisted's endpoints know and hl7bridge's listeners do not: such strings go to Twisted.
_TWISTED_ONLY = frozenset({"sslmethod", "dhParameters"})


@dataclass(frozen=True)
class ListenEndpoint:
    """A server endpoint string (``tcp:``, ``unix:``, ``ssl:``, ``mtls:``) as its parts.

    The fields keep Twisted's meaning and defaults: ``interface`` "" is every
    IPv4 address, ``backlog`` is 50, a unix socket gets ``mode`` 0o666 and,
    with ``lockfile``, a lock file beside it (``PATH.lock``); ``ssl:`` reads
    its key from ``server.pem`` unless ``privateKey`` names another file.
    """

    description: str
    kind: str
    port: int = 0
    interface: str = ""
    backlog: int = 50
    address: str = ""
    mode: int = 0o666
    lockfile: bool = True
    private_key: str = "server.pem"
    cert_key: str | None = None
    extra_cert_chain: str | None = None
    ca_certs: str | None = None

    @property
    def tls(self) -> bool:
        """Whether connections must start with a TLS handshake."""
        return self.kind in ("ssl", "mtls")

    def tls_context(self) -> ssl.SSLContext:
        """The server-side TLS context of an ``ssl:`` or ``mtls:`` endpoint, from its files.

        ``mtls:`` requires a client certificate signed by one of ``caCerts``.

        Raises:
            OSError: a file cannot be read.
            ssl.SSLError: a certificate or key is not valid PEM, or they do not match.
            ValueError: the ``caCerts`` file holds no certificate.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        certificate = self.cert_key or self.private_key
        if self.extra_cert_chain is None:
            context.load_cert_chain(certificate, self.private_key)
        else:
            # load_cert_chain reads the chain from the certificate's file only:
            # give it one with the intermediate certificates after the certificate.
            with tempfile.TemporaryDirectory() as folder:
                chain = os.path.join(folder, "chain.pem")
                with open(chain, "wb") as file:
                    file.write(_read(certificate) + b"\n" + _read(self.extra_cert_chain))
                context.load_cert_chain(chain, self.private_key)
        if self.kind == "mtls":
            assert self.ca_certs is not None
            authorities = _PEM_CERTIFICATE.findall(_read(self.ca_certs))
            if not authorities:
                raise ValueError(f"caCerts file {self.ca_certs!r} holds no PEM certificate")
            context.load_verify_locations(cadata=b"\n".join(authorities).decode("ascii"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _split(description: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint string syntax: parts split on ``:``, ``key=value`` parts, ``\\`` escapes a character."""
    parts: list[list[str]] = [[""]]
    escaped = False
    for char in description:
        if escaped:
            parts[-1][-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append([""])
        elif char == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += char
    positional = [part[0] for part in parts if len(part) == 1]
    keywords = {part[0]: part[1] for part in parts if len(part) == 2}
    if len(keywords) + len(positional) != len(parts):
        raise ValueError(f"{description!r}: an option is given twice")
    return positional, keywords


def _whole(description: str, name: str, text: str, base: int = 10) -> int:
    try:
        return int(text, base)
    except ValueError:
        what = "an octal number" if base == 8 else "a whole number"
        raise ValueError(f"{description!r}: {name} must be {what}, not {text!r}") from None


def parse_listen_endpoint(description: str) -> ListenEndpoint | None:
    """The parts of a ``tcp:``, ``unix:``, ``ssl:`` or ``mtls:`` server endpoint string.

    Returns None for any other endpoint type, or one with an option that only
    Twisted's endpoints know (``sslmethod``, ``dhParameters``), or more
    arguments than the type takes: such a string is for Twisted's endpoints.
    Reads no file.

    Raises:
        ValueError: a number is not a number, or ``mtls:`` lacks ``privateKey`` or ``caCerts``.
    """
    positional, keywords = _split(description)
    kind, arguments = positional[0], positional[1:]
    names = _ARGUMENTS.get(kind)
    if names is None or len(arguments) > len(names) or set(keywords) - set(names) or _TWISTED_ONLY & set(keywords):
        return None
    given = dict(zip(names, arguments, strict=False))
    if set(given) & set(keywords) or _TWISTED_ONLY & set(given):
        return None  # an option both by place and by name (Twisted's error), or one only Twisted knows
    given.update(keywords)
    first = names[0]
    if first not in given:
        raise ValueError(f"{description!r}: {kind}: needs a {first}")
    found: dict[str, Any] = {"description": description, "kind": kind}
    if kind == "unix":
        found["address"] = given["address"]
        if "mode" in given:
            found["mode"] = _whole(description, "mode", given["mode"], 8)
        if "lockfile" in given:
            found["lockfile"] = bool(_whole(description, "lockfile", given["lockfile"]))
    else:
        found["port"] = _whole(description, "port", given["port"])
        found["interface"] = given.get("interface", "")
    if "backlog" in given:
        found["backlog"] = _whole(description, "backlog", given["backlog"])
    if kind == "mtls":
        for required in ("privateKey", "caCerts"):
            if not given.get(required):
                raise ValueError(f"{description!r}: mtls: needs {required}=FILE")
    if "privateKey" in given:
        found["private_key"] = given["privateKey"]
    found["cert_key"] = given.get("certKey")
    found["extra_cert_chain"] = given.get("extraCertChain")
    found["ca_certs"] = given.get("caCerts")
    return ListenEndpoint(**found)
