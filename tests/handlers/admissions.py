"""A new-style handler as a team writes it after the cut-over: python-hl7 and asyncio only."""

import asyncio

import hl7

SEEN: list[str] = []


async def handle(message: hl7.Message) -> hl7.Message:
    await asyncio.sleep(0)  # stands for an asyncpg or aiohttp call
    SEEN.append(str(message.segment("MSH")(10)))
    if not str(message.segment("PID")(3)):
        return message.create_ack("AE")
    return message.create_ack("AA")
