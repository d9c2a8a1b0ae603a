"""The interface's receiver as it was written for txHL7 (stages 0 to 4 serve it).

One receiver answers everything the interface gets, as a txHL7 listener has one
receiver: admissions (ADT^A01) need a patient id, and are checked in a thread
because the lookup they stand for blocks; orders are accepted; results need at
least one OBX; any other type is rejected.
"""

from twisted.internet import threads
from txHL7.receiver import AbstractHL7Receiver

from myinterface.messages import acknowledge, has_results, message_type, patient_id

ORDERS = ("ORM", "OML")


class AdmissionsReceiver(AbstractHL7Receiver):
    def handleMessage(self, message_container):
        message = message_container.message
        code, trigger = message_type(message)
        if (code, trigger) == ("ADT", "A01"):
            return threads.deferToThread(self.admit, message)
        if code in ORDERS:
            return str(acknowledge(message, "AA"))
        if code == "ORU":
            return str(acknowledge(message, "AA") if has_results(message) else acknowledge(message, "AE", "no results"))
        return str(acknowledge(message, "AR", "message type not accepted"))

    def admit(self, message):
        """Blocking work (a database lookup in the real service): it runs in Twisted's thread pool."""
        if not patient_id(message):
            return str(acknowledge(message, "AE", "patient id missing"))
        return str(acknowledge(message, "AA"))
