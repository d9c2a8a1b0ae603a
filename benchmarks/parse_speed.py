"""Time ``hl7bridge.parse.parse`` against ``hl7.parse``, in one process, side by side.

    python benchmarks/parse_speed.py                    # the 535-byte ORU and the corpus
    python benchmarks/parse_speed.py --rounds 8 --corpus DIR

Each round times both parsers on the same messages, in A B B A order (then
B A A B), so that a change in the machine's load during a round weighs on
both alike. The figures printed are medians over the rounds of the time per
message, and their ratio. The trees are checked equal before timing
(tests/test_parse.py checks them thoroughly). Absolute times move with the
machine's load; the ratio is the figure to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import hl7

from hl7bridge.parse import parse

HERE = Path(__file__).resolve().parent
ORU = HERE / "messages" / "oru_r01.hl7"
CORPUS = Path(os.environ.get("HL7BRIDGE_CORPUS", HERE.parents[1] / "shared" / "corpus")) / "cdc-trusted-intermediary"


def per_message(parser: Callable[[str], object], messages: list[str], seconds: float) -> float:
    """Microseconds per message, parsing ``messages`` over and over for about ``seconds``."""
    loops = 0
    start = time.perf_counter()
    while True:
        for text in messages:
            parser(text)
        loops += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / (loops * len(messages)) * 1e6


def compare(messages: list[str], rounds: int, seconds: float) -> tuple[float, float]:
    """Median microseconds per message of ``hl7.parse`` and of ``parse``."""
    for text in messages:
        if str(parse(text)) != str(hl7.parse(text)):
            raise SystemExit("the parsers disagree; run tests/test_parse.py")
    times: dict[Callable[[str], object], list[float]] = {hl7.parse: [], parse: []}
    for number in range(rounds):
        first, second = (hl7.parse, parse) if number % 2 == 0 else (parse, hl7.parse)
        for parser in (first, second, second, first):
            times[parser].append(per_message(parser, messages, seconds))
    return statistics.median(times[hl7.parse]), statistics.median(times[parse])


def corpus(folder: Path) -> list[str]:
    """The corpus messages hl7.parse accepts, CR-normalised as the test suite reads them."""
    found = []
    for path in sorted(folder.glob("*.hl7")):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\r").replace("\n", "\r")
        try:
            hl7.parse(text)
        except Exception:  # the corpus has messages python-hl7 rejects; they time nothing
            continue
        found.append(text)
    return found


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--rounds", type=int, default=5, help="rounds, each ABBA (default 5)")
    options.add_argument("--seconds", type=float, default=0.2, help="seconds per timing (default 0.2)")
    options.add_argument(
        "--corpus", type=Path, default=CORPUS, help="a folder of .hl7 files (default: the shared corpus)"
    )
    arguments = options.parse_args()
    sets = [(f"{ORU.name} ({ORU.stat().st_size} bytes)", [ORU.read_bytes().decode("ascii")])]
    if arguments.corpus.is_dir():
        texts = corpus(arguments.corpus)
        average = sum(map(len, texts)) // max(len(texts), 1)
        sets.append((f"corpus ({len(texts)} messages, {average:,} characters on average)", texts))
    print(f"{'messages':<50} {'hl7.parse':>12} {'parse':>12} {'ratio':>7}")
    for name, messages in sets:
        reference, ours = compare(messages, arguments.rounds, arguments.seconds)
        print(f"{name:<50} {reference:>10.1f}us {ours:>10.1f}us {reference / ours:>6.2f}x")


if __name__ == "__main__":
    main()
