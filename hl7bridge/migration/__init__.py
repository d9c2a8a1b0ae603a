"""Incremental cut-over: route message types to new handlers, shadow them first.

Built only on the receiver API: a :class:`Router` is itself an
``IHL7Receiver``, so it runs on every face hl7bridge has.
"""

from hl7bridge.migration.router import Route, Router
from hl7bridge.migration.shadow import ShadowReport, compare_acks

__all__ = ["Route", "Router", "ShadowReport", "compare_acks"]
