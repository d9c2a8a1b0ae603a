"""The benchmark harness stays runnable, and the page it writes says what it should.

``make bench`` is run by hand, not in CI, so nothing else would notice a
listener of ``benchmarks/servers.py`` that an API change broke, or a load
generator that no longer builds. Nothing here is timed: a short run of the
real generator against each listener must get AAs only. The targets and the
page of ``docs/performance.md`` are checked on made-up results.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run  # noqa: E402  (benchmarks/run.py)


@pytest.mark.skipif(shutil.which("cc") is None, reason="the load generator needs a C compiler (cc)")
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


#: msgs/s of each listener, at 1, 8 and 64 connections; p99 is 1e6 / msgs/s.
RATES = {
    "txhl7-epoll": (2_000, 2_500, 2_600),
    "hl7bridge-serve-legacy": (4_000, 5_500, 5_400),
    "hl7bridge-legacy": (4_000, 6_000, 6_200),
    "hl7bridge-legacy-asyncio": (4_000, 6_400, 6_300),
    "hl7bridge-pid": (5_000, 3_500, 4_000),
    "hl7bridge-serve": (9_000, 40_000, 30_000),
    "hl7bridge-serve-quiet": (10_000, 45_000, 45_000),
    "hl7bridge-asyncio": (11_000, 45_000, 50_000),
    "hl7bridge-twisted": (8_000, 23_000, 30_000),
    "ceiling-asyncio": (13_000, 170_000, 190_000),
    "ceiling-twisted": (10_000, 45_000, 53_000),
    "plain-hl7mllp": (2_000, 2_500, 2_400),
}


def made_up_rows() -> list[run.Row]:
    rows = []
    for listener, rates in RATES.items():
        for connections, rate in zip((1, 8, 64), rates, strict=True):
            rows.append(run.Row(listener, "oru", connections, msgs_per_s=rate, p99_us=1e6 / rate, acked=rate))
    run.add_ratios(rows)
    return rows


def made_up_result(rows: list[run.Row]) -> dict[str, Any]:
    return {
        "finished": "2030-01-02T03:04:05",
        "wall_s": 60.0,
        "machine": {
            "nproc": 2,
            "cpu_model": "a CPU",
            "kernel": "6.1",
            "python": "3.11.7",
            "python_implementation": "CPython",
            "packages": {"hl7bridge": "0.1.0"},
            "hl7bridge_commit": "abc1234",
            "loadavg_at_start": [0.5, 0.5, 0.5],
            "loadavg_at_end": [1.0, 1.0, 1.0],
            "cc": "cc 12",
        },
        "settings": {
            "argv": ["--quick"],
            "duration_s": 1.0,
            "rounds": 1,
            "warmup_s": 0.3,
            "later_warmup_s": 0.25,
            "server_pin": ["taskset", "-c", "0"],
            "client_pin": ["taskset", "-c", "1"],
        },
        "workloads": [{"key": f"oru-{n}", "connections": n, "description": "an ORU", "files": []} for n in (1, 8, 64)],
        "rows": [asdict(row) for row in rows],
        "targets": run.targets(rows),
        "comparison": [],
        "profiles": [],
    }


def check(checks: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [found] = [c for c in checks if c["target"] == name]
    return found


def test_targets_compare_the_rows_the_project_names_where_the_listener_is_busy() -> None:
    checks = run.targets(made_up_rows())
    logging_cost = check(checks, "hl7bridge-serve msgs/s >= 0.85x hl7bridge-serve-quiet")
    assert logging_cost["values"] == pytest.approx({"oru-8": 40 / 45, "oru-64": 30 / 45})
    assert [key for key, value in logging_cost["values"].items() if not run.target_met(logging_cost, value)] == [
        "oru-64"
    ]
    assert check(checks, "hl7bridge-serve msgs/s >= 15x txhl7-epoll")["values"] == pytest.approx(
        {"oru-8": 16.0, "oru-64": 30_000 / 2_600}
    )
    assert check(checks, "hl7bridge-twisted msgs/s >= 0.8x ceiling-twisted")["values"]["oru-8"] == pytest.approx(
        23 / 45
    )
    pid = check(checks, "hl7bridge-pid msgs/s >= 1.5x txhl7-epoll")
    assert run.missed(pid) and [run.target_met(pid, value) for value in pid["values"].values()] == [False, True]
    p99 = check(checks, "hl7bridge-serve p99 < txhl7-epoll p99 (64 conns)")
    assert p99["values"] == pytest.approx({"oru-64": 2_600 / 30_000}) and not run.missed(p99)
    # 1 connection is bound by the round trip: no target is checked there.
    assert all("oru-1" not in c["values"] for c in checks)
    assert not any("20x" in c["target"] for c in checks)


def test_every_target_names_listeners_the_benchmark_runs() -> None:
    for target in run.TARGETS:
        assert {target.listener, target.base} <= set(run.LISTENERS), target
        assert target.why, target


def test_the_page_leads_with_like_for_like_rows_then_the_chart_the_names_and_the_targets() -> None:
    rows = made_up_rows()
    page = run.render_docs(made_up_result(rows), rows, chart_written=True)
    order = ["### At a glance", "(performance.png)", "- `txhl7-epoll`:", "### Targets", "### Method", "### All rows"]
    positions = [page.index(part) for part in order]
    assert positions == sorted(positions), page
    headline = page[page.index("### At a glance") : page.index("(performance.png)")]
    assert "ceiling" not in headline and "plain-hl7mllp" not in headline
    assert re.search(r"\| hl7bridge-serve \| 40,000 \| 16\.0x \| 30,000 \| 11\.5x \| 33\.3 \| 0\.09x \|", headline)
    assert re.search(r"\| hl7bridge-legacy \| 6,000 \| 2\.40x \|", headline)
    missed = page[page.index("Missed on this run:") : page.index("### Method")]
    assert "hl7bridge-twisted msgs/s >= 0.8x ceiling-twisted: ceiling-twisted is a Twisted" in missed
    assert "hl7bridge-legacy msgs/s" not in missed  # met everywhere
    # A page for users: no issue numbers, no paths outside the repository.
    assert not re.search(r"#\d+|\.\./|shared/", page)


def test_the_page_is_rendered_again_from_saved_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = made_up_rows()
    result = made_up_result(rows)
    result["targets"] = []  # saved by an older harness: the targets are checked again
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(result))
    assert run.main(["--render", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(run.BEGIN) and printed.rstrip().endswith(run.END)
    assert "hl7bridge-serve msgs/s >= 0.85x hl7bridge-serve-quiet" in printed

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "performance.md").write_text(
        f"# Performance\n\nWritten by hand.\n\n{run.BEGIN}\nold\n{run.END}\n\nNotes.\n"
    )
    loaded, loaded_rows = run.load_result(saved)
    run.write_docs(loaded, loaded_rows, docs)
    page = (docs / "performance.md").read_text()
    assert page.startswith("# Performance\n\nWritten by hand.\n\n") and page.endswith("\n\nNotes.\n")
    assert "\nold\n" not in page
    pytest.importorskip("matplotlib")
    assert (docs / "performance.png").read_bytes().startswith(b"\x89PNG")
    assert "(performance.png)" in page


def test_the_journal_cost_runs_groups_through_both_backends(postgres_url: str) -> None:
    script = BENCHMARKS / "journal_cost.py"
    argv = ["--json", "--groups", "1,3", "--messages", "12", "--rounds", "1", "--postgresql", postgres_url]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
    # Every message was begun as new and its answer committed: journal_cost checks each outcome.
    assert done.returncode == 0, done.stderr
    costs = [run.journal_cost.Cost(**cost) for cost in json.loads(done.stdout)]
    assert [(cost.backend, cost.group) for cost in costs] == [
        ("sqlite", 1),
        ("sqlite", 3),
        ("postgresql", 1),
        ("postgresql", 3),
    ]
    assert all(cost.group_wall_us > 0 for cost in costs)


def test_the_page_sets_the_journal_cost_against_the_listener_own_work() -> None:
    rows = made_up_rows()
    for row in rows:
        row.server_cpu = 1.0  # 40,000 msgs/s at 8 connections: 25 µs a message; 30,000 at 64: 33.3 µs
    result = made_up_result(rows)
    fields = ("backend", "group", "loop_us", "threads_us", "server_us", "group_wall_us")
    result["journal_cost"] = [
        dict(zip(fields, values, strict=True))
        for values in (
            ("sqlite", 4, 10.0, 50.0, 0.0, 500),
            ("sqlite", 32, 5.0, 10.0, 0.0, 900),
            ("postgresql", 4, 60.0, 0.0, 90.0, 1),
        )
    ]
    page = run.render_docs(result, rows, chart_written=False)
    part = page[page.index("### What the journal costs by itself") : page.index("### Method")]
    assert "| postgresql | 4 | 60 µs | - | 90 µs | 1 µs |" in part
    # 25 / (25 + 50) and 25 / (25 + 60); 33.3 / (33.3 + 10) and 33.3 / (33.3 + 15).
    assert "8 connections: `hl7bridge serve` spends 25 µs" in part and "at most 0.33x" in part and "(0.29x" in part
    assert "64 connections: `hl7bridge serve` spends 33 µs" in part and "at most 0.77x" in part and "(0.69x" in part
    assert "### What the journal costs" not in run.render_docs(made_up_result(rows), rows, chart_written=False)
