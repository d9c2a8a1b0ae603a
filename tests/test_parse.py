"""hl7bridge.parse.parse against hl7.parse: the same tree, node by node.

python-hl7's containers are lists, so ``==`` would call two trees equal even with
a Field where a Repetition belongs or a wrong separator. :func:`assert_same_tree`
compares class, every instance attribute and every child instead, and the
methods receivers call are checked to answer alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import hl7
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hl7bridge.parse import parse
from tests.support import corpus_messages, message, without_time_and_id

OWN = [
    message("OWN1"),
    # Repetitions, components and subcomponents, empty ones too, and escapes.
    "MSH|^~\\&|APP^1.2.3^ISO|FAC~FAC2|RCV&X|RFAC|20240101||ORU^R01^ORU_R01|ID^9|P^T|2.5.1^^2.16\r"
    "PID|1||123^^^HOSP&1.2&ISO^MR~456^^^OTHER^PI||DOE^JANE^^^^^L|\\F\\\\S\\\\T\\\\R\\\\E\\|\r"
    "OBX|1|ST|||a&&b^^c~~^&|||\r",
    # Other encoding characters, in another order.
    "MSH#*~\\&#A#B#C#D#20240101##ORM*O01#XYZ#D#2.3\rPID#1#a*b~c*d&e#\r",
    # MSH-2 shorter than four characters: the rest take their defaults.
    "MSH|^|A|B|C|D|20240101||ADT^A01|ID1|P|2.5\rPID|1||x~y&z\r",
    "MSH||A|B|C|D|20240101||ADT^A01|ID1|P|2.5\rPID|1||x~y^z&w\r",
    # MSH-2 with v2.7's truncation character.
    "MSH|^~\\&#|A|B|C|D|20240101||ADT^A01|ID1|P|2.7\rPID|1||a#b^c\r",
    # Leading and trailing whitespace, LF and CRLF line ends, empty segments.
    "\r\n  " + message("WS1") + "\n\r\r  ",
    message("LF1").replace("\r", "\n"),
    message("CRLF1").replace("\r", "\r\n"),
    # A second header segment, one without a second separator, a header alone.
    message("TWO") + "MSH|^~\\&|X|Y\rBHS|a\rFHS^x\rMSH|\rMSH\r",
    # A batch: BHS first, so hl7.parse builds it.
    "BHS|^~\\&|A\r" + message("B1") + "BTS|1\r",
    # Trailing separators everywhere.
    "MSH|^~\\&|||||||ADT^A01^|ID2||2.5|\rPID|||^^~^&&^||\r",
    # MSH-1 and MSH-2 only; an MSH-2 that never ends (python-hl7 gives a
    # strange tree for it, which parse must give too).
    "MSH|^~\\&|",
    "MSH|^~\\&",
    "MSH|^~\\&\rPID|1|",
]

#: Input hl7.parse rejects; parse must reject it with the same exception.
REJECTED = ["", "   ", "PID|1", "MSH", "MSH|", "MSH\r|"]


def assert_same_tree(mine: Any, theirs: Any, where: str = "message") -> None:
    """Fail unless the two trees have the same classes, attributes and leaves throughout."""
    assert type(mine) is type(theirs), where
    if isinstance(theirs, str):
        assert mine == theirs, where
        return
    assert vars(mine) == vars(theirs), where
    assert {name: type(value) for name, value in vars(mine).items()} == {
        name: type(value) for name, value in vars(theirs).items()
    }, where
    assert len(mine) == len(theirs), where
    for index, (child, other) in enumerate(zip(mine, theirs, strict=True)):
        assert_same_tree(child, other, f"{where}[{index}]")


def containers(tree: Any) -> Iterator[Any]:
    if not isinstance(tree, str):
        yield tree
        for child in tree:
            yield from containers(child)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """``("value", result)``, or ``("raised", exception class)``: to compare two calls."""
    try:
        return "value", call()
    except Exception as error:
        return "raised", type(error)


def check(text: str) -> None:
    """parse(text) is hl7.parse(text) in every respect receivers can see."""
    expected = outcome(lambda: hl7.parse(text))
    if expected[0] == "raised":
        with pytest.raises(expected[1]):
            parse(text)
        return
    theirs = expected[1]
    mine = parse(text)
    assert_same_tree(mine, theirs)
    # No container or attribute dict shared between two places in the tree:
    # changing one element must leave the others alone, as with hl7.parse.
    nodes = list(containers(mine))
    assert len({id(node) for node in nodes}) == len(nodes)
    assert len({id(vars(node)) for node in nodes}) == len(nodes)
    assert outcome(lambda: str(mine)) == outcome(lambda: str(theirs))
    check_accessors(mine, theirs)


def check_accessors(mine: hl7.Message, theirs: hl7.Message) -> None:
    """The lookups receivers use answer alike on both trees."""
    names = {str(segment[0]) for segment in theirs if not isinstance(segment[0], str)}
    for name in [*sorted(name for name in names if len(name) == 3), "ZZZ"]:
        assert outcome(lambda name=name: theirs.segments(name)) == outcome(lambda name=name: mine.segments(name))
        for key in (f"{name}.F3", f"{name}.F3.R1.C2", f"{name}.F3.R2.C1.S2", f"{name}.F1"):
            assert outcome(lambda key=key: theirs[key]) == outcome(lambda key=key: mine[key]), key
        assert outcome(lambda name=name: theirs.segment(name)(3)) == outcome(lambda name=name: mine.segment(name)(3))
        assert outcome(lambda name=name: theirs.extract_field(name, 1, 4, 1, 2)) == outcome(
            lambda name=name: mine.extract_field(name, 1, 4, 1, 2)
        )
    assert ack_of(mine) == ack_of(theirs)


def ack_of(tree: hl7.Message) -> tuple[str, Any]:
    result = outcome(lambda: str(tree.create_ack("AE", message_id="FIXED")))
    return (result[0], without_time_and_id(result[1])) if result[0] == "value" else result


@pytest.mark.parametrize("text", OWN)
def test_same_tree_as_python_hl7_on_own_messages(text: str) -> None:
    check(text)


def test_same_tree_as_python_hl7_on_every_corpus_message() -> None:
    messages = corpus_messages()
    for name, text in messages:
        try:
            check(text)
        except AssertionError as failure:
            raise AssertionError(f"{name}: {failure}") from None
    assert len(messages) > 80


@pytest.mark.parametrize("text", REJECTED)
def test_rejects_what_python_hl7_rejects(text: str) -> None:
    with pytest.raises(Exception) as theirs:
        hl7.parse(text)
    with pytest.raises(theirs.type):
        parse(text)


def test_bytes_are_decoded_with_the_encoding_given() -> None:
    text = message("BYTES", body="PID|1||7||MÜLLER^JOSÉ\r")
    assert_same_tree(parse(text.encode("latin-1"), encoding="latin-1"), hl7.parse(text))
    assert_same_tree(parse(text.encode()), hl7.parse(text.encode()))


def test_a_custom_factory_gets_python_hl7_tree() -> None:
    class Field(hl7.Field):
        pass

    class Factory(hl7.Factory):
        create_field = Field

    text = message("FACTORY")
    tree = parse(text, factory=Factory)
    assert_same_tree(tree, hl7.parse(text, factory=Factory))
    assert type(tree[0][3]) is Field


@pytest.mark.parametrize("encoding", ["^~\\^", "|~\\&", "^^\\&", "^~\\\r"])
def test_shared_separators_get_python_hl7_answer(encoding: str) -> None:
    # Two levels with one separator: no fast path, hl7.parse's own answer
    # (sometimes an AssertionError from inside it).
    check(f"MSH|{encoding}|A|B\rPID|1||a^b~c&d|e\r")


# Hypothesis: messages built from random separators, segments, fields,
# repetitions, components and subcomponents, and messages of random text.

STANDARD = "|^~\\&"
ODD = "|^~\\&#*!$%@:;/.,-_+=?{}[]()<>'\"`0aZ \t\x1c\n"


@st.composite
def encoding_characters(draw: st.DrawFn) -> str:
    """MSH-1 then MSH-2: mostly the standard five, sometimes any others, even clashing."""
    if draw(st.booleans()):
        chars = STANDARD
    else:
        chars = "".join(draw(st.lists(st.sampled_from(ODD), min_size=5, max_size=5)))
    extra = draw(st.sampled_from(["", "", "#", "##"]))
    return chars[0] + chars[1 : draw(st.integers(0, 4)) + 1 if draw(st.booleans()) else 5] + extra


@st.composite
def messages(draw: st.DrawFn) -> str:
    encoding = draw(encoding_characters())
    field = encoding[0]
    component, repetition, escape, subcomponent = (encoding[1:] + "^~\\&"[len(encoding) - 1 :])[:4]
    words = st.text(st.sampled_from("AZaz09 .-"), max_size=4) | st.sampled_from(
        [
            f"{escape}F{escape}",
            f"{escape}S{escape}",
            f"{escape}X0D0A{escape}",
            f"{escape}.br{escape}",
            escape,
            "",
        ]
    )
    subcomponents = st.lists(words, min_size=1, max_size=3).map(subcomponent.join)
    components = st.lists(subcomponents, min_size=1, max_size=3).map(component.join)
    repetitions = st.lists(components, min_size=1, max_size=3).map(repetition.join)
    fields = st.lists(repetitions, max_size=6).map(lambda values: "".join(field + value for value in values))
    names = st.sampled_from(["PID", "OBX", "ORC", "ZZ1", "MSH", "BHS", "FHS", "EVN", "", "P"])
    segments = st.lists(st.tuples(names, fields).map("".join), max_size=5)
    header = "MSH" + encoding + draw(fields)
    line_end = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    body = line_end.join([header, *draw(segments)])
    return draw(st.sampled_from(["", " ", "\r\n"])) + body + draw(st.sampled_from(["", line_end, line_end * 2]))


RAW = st.builds(
    lambda middle, rest: "MSH" + middle + rest,
    st.text(st.sampled_from("|^~\\&#"), min_size=1, max_size=6),
    st.text(st.sampled_from("|^~\\&#ABC \r\n"), max_size=60),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
@example("MSH|^~\\&|A\rMSH^~|x\rBHS|\rFHS|a|b\r")
def test_same_tree_as_python_hl7_on_generated_messages(text: str) -> None:
    check(text)


@settings(max_examples=400, deadline=None)
@given(RAW)
def test_same_tree_as_python_hl7_on_random_text(text: str) -> None:
    check(text)
