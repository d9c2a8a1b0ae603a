"""A receiver as a txHL7 shop wrote it: imports only txHL7.receiver, decodes cp1252.

It checks the patient name came through the codec intact and answers AA, or AE
if it did not; hl7bridge must serve it unchanged. It answers with the ACK text
itself, which txHL7 allowed as well as a Deferred of it.
"""

from txHL7.receiver import AbstractHL7Receiver

EXPECTED_SURNAME = "M\u00fcller-L\u00fcdenscheidt"


class Cp1252Receiver(AbstractHL7Receiver):
    def getCodec(self):
        return "cp1252"

    def handleMessage(self, message_container):
        surname = str(message_container.message.segment("PID")(5)(1)(1))
        code = "AA" if surname == EXPECTED_SURNAME else "AE"
        return message_container.ack(code)
