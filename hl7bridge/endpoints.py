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

import re
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
