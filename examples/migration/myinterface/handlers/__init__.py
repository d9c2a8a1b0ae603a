"""The new handlers: ``async def handle(message)``, python-hl7 and asyncio only."""
