"""A receiver whose handlers block a thread for a long time, as slow database calls do."""

import time

from twisted.internet import threads

from hl7bridge.receiver import AbstractHL7Receiver

SECONDS = 30


class SleepyReceiver(AbstractHL7Receiver):
    def handleMessage(self, message_container):  # noqa: N802
        def work():
            time.sleep(SECONDS)
            return message_container.ack()

        return threads.deferToThread(work)
