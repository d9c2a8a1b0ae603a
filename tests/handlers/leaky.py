"""A receiver whose failures quote patient data, as real ones often do."""

from hl7bridge.receiver import AbstractHL7Receiver


class BedNotFound(Exception):
    pass


class LeakyReceiver(AbstractHL7Receiver):
    def handleMessage(self, message_container):  # noqa: N802
        name = str(message_container.message.segment("PID")(5))
        raise BedNotFound(f"cannot admit patient {name}: bed not found")
