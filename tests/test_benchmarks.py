"""The benchmark harness stays runnable: every listener answers its load generator.

``make bench`` is run by hand, not in CI, so nothing else would notice a
listener of ``benchmarks/servers.py`` that an API change broke, or a load
generator that no longer builds. Nothing here is timed: a short run of the
real generator against each listener must get AAs only.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run  # noqa: E402  (benchmarks/run.py)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="the load generator needs a C compiler (cc)")


def test_every_listener_answers_the_load_generator(tmp_path: Path) -> None:
    client = run.build_client(run.SOURCE, tmp_path / "mllp_load")
    workload = run.Workload("oru", 2, (run.MESSAGES / "oru_r01.hl7",), "smoke")
    servers = [run.Server(kind, [], tmp_path) for kind in run.LISTENERS]
    try:
        for server in servers:
            assert server.wait_ready(), server.error
        for server in servers:
            row = run.measure(client, [], server, workload, duration=0.3, warmup=0.0)
            assert row.error is None, f"{server.kind}: {row.error}"
            codes = row.raw["ack_codes"]
            assert row.acked > 0 and codes["AA"] >= row.acked and codes["other"] == codes["none"] == 0, server.kind
    finally:
        for server in servers:
            server.stop()
