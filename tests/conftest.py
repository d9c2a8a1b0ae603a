"""The suite runs on Twisted's asyncio reactor (see setup.cfg's pytest options)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _hl7bridge_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hl7bridge")
