"""A custom receiver as txHL7's docs allow: its payloads are no HL7, its container answers them in kind."""

from twisted.internet import defer
from txHL7.receiver import AbstractReceiver, MessageContainer


class PingContainer(MessageContainer):
    def ack(self, ack_code="AA"):
        return f"GOT:{self.raw_message}"


class PingReceiver(AbstractReceiver):
    message_cls = PingContainer

    def handleMessage(self, message_container):
        return defer.succeed(message_container.ack())
