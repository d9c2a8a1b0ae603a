"""The legacy receiver of the cut-over rehearsal, as written for txHL7."""

from twisted.internet import threads
from txHL7.receiver import AbstractHL7Receiver


class ADTReceiver(AbstractHL7Receiver):
    """AA for a message with a patient id in PID-3, AE without; the work runs in a thread."""

    def handleMessage(self, message_container):
        def work():
            has_id = bool(str(message_container.message.segment("PID")(3)))
            return message_container.ack("AA" if has_id else "AE")

        return threads.deferToThread(work)
