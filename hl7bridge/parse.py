"""A faster ``hl7.parse``: the same ``hl7.Message`` tree, built with less work.

:func:`parse` gives a tree that cannot be told apart from the one ``hl7.parse``
builds: the same python-hl7 classes at every level, each container with the same
``separator``, ``separators``, ``esc`` and ``factory``, the same children, the
same plain ``str`` leaves, so the same ``str()`` and the same answers from
``segment()``, ``extract_field()``, ``create_ack()`` and the rest. It is faster
because it splits each level in one loop and fills the containers directly,
where ``hl7.parse`` makes a recursive call, a parse-plan object and two
``__init__`` calls per element. Input it has no fast path for (a custom
factory, unusual separators, no MSH first) goes to ``hl7.parse`` itself.

No I/O happens here.
"""

from __future__ import annotations

from typing import Any

import hl7

#: Segments whose second and third fields are MSH-1 and MSH-2 style encoding
#: fields, kept whole rather than split (python-hl7 treats these three alike).
HEADER_SEGMENTS = ("MSH", "BHS", "FHS")

#: MSH-2's characters in their order (component, repetition, escape,
#: subcomponent) with HL7's recommended values, which stand in for any a
#: message leaves out.
DEFAULT_ENCODING = "^~\\&"

# list.__new__ makes an empty instance of a list subclass without running its
# __init__; the attributes __init__ would set are given as a ready dict instead.
_new = list.__new__


def parse(text: str | bytes, encoding: str = "utf-8", factory: Any = hl7.Factory) -> hl7.Message:
    """Parse one HL7 v2 message into the tree ``hl7.parse(text, encoding, factory)`` gives.

    Args:
        text: the message, segments ended by CR; bytes are decoded with
            ``encoding`` first, as ``hl7.parse`` does.
        encoding: the codec for bytes input.
        factory: python-hl7's container factory. Only ``hl7.Factory`` has the fast
            path; another factory's classes may do anything in ``__init__``, so
            ``hl7.parse`` builds their tree.

    Returns:
        The ``hl7.Message``, equal in every class, attribute and element to
        ``hl7.parse``'s.

    Raises:
        hl7.ParseException, IndexError: as ``hl7.parse`` does for the same input
            (such input is handed to it).
    """
    if factory is not hl7.Factory:
        return hl7.parse(text, encoding=encoding, factory=factory)
    if isinstance(text, bytes):
        text = text.decode(encoding)
    if type(text) is not str:
        return hl7.parse(text, encoding=encoding, factory=factory)
    stripped = text.strip()
    found = _separators(stripped)
    if found is None:
        return hl7.parse(text, encoding=encoding, factory=factory)
    return _build(stripped, *found)


def _separators(text: str) -> tuple[str, str] | None:
    """``(separators, escape)`` of a message starting with MSH, as python-hl7 reads them.

    ``separators`` is CR (segments) followed by the field, repetition, component
    and subcomponent separators: the string every python-hl7 container carries.
    None when the fast path cannot promise python-hl7's tree: no MSH first, no
    end to MSH-2, or two levels sharing one separator.
    """
    if text[:3] != "MSH" or len(text) < 4:
        return None
    field = text[3]
    end = text.find(field, 4)
    if end < 0:
        return None
    # MSH-2 holds the component, repetition, escape and subcomponent characters,
    # in that order; characters after the fourth (v2.7's truncation character)
    # play no part in splitting.
    encoding = text[4:end] + DEFAULT_ENCODING[end - 4 :]
    separators = "\r" + field + encoding[1] + encoding[0] + encoding[3]
    if len(set(separators)) != len(separators):
        return None
    return separators, encoding[2]


def _build(text: str, separators: str, escape: str) -> hl7.Message:
    """The tree of ``text`` (already stripped), whose first segment is a well-formed MSH.

    Each level is split only when the text holds its separator or a deeper one,
    and a container then holds containers of the next level; otherwise it holds
    the text as a plain ``str``. That is the shape python-hl7 gives.
    """
    field_sep, repetition_sep, component_sep, subcomponent_sep = (
        separators[1],
        separators[2],
        separators[3],
        separators[4],
    )

    def attributes(level: int) -> dict[str, Any]:
        return {"separator": separators[level], "esc": escape, "separators": separators, "factory": hl7.Factory}

    message_attrs, segment_attrs, field_attrs, repetition_attrs, component_attrs = map(attributes, range(5))
    segment_attrs_copy = segment_attrs.copy
    field_attrs_copy = field_attrs.copy
    repetition_attrs_copy = repetition_attrs.copy
    component_attrs_copy = component_attrs.copy
    segment_cls, field_cls, repetition_cls, component_cls = hl7.Segment, hl7.Field, hl7.Repetition, hl7.Component

    # The five levels are written out one inside the other, alike in shape, rather
    # than as one function called for each element: a Python call per element is
    # most of what makes hl7.parse slow.
    segments = []
    for segment_text in text.split("\r"):
        segment = _new(segment_cls)
        segment.__dict__ = segment_attrs_copy()
        segments.append(segment)
        add_field = segment.append
        if (
            field_sep not in segment_text
            and repetition_sep not in segment_text
            and component_sep not in segment_text
            and subcomponent_sep not in segment_text
        ):
            add_field(segment_text)
            continue
        if segment_text[:3] in HEADER_SEGMENTS:
            # The segment name, its own field separator (MSH-1) and the encoding
            # characters (MSH-2) are fields kept whole. The arithmetic follows
            # python-hl7's to the character, for a header with no second
            # separator too, so that later MSH, BHS and FHS segments come out the
            # same as well.
            own_sep = segment_text[3]
            end = segment_text.find(own_sep, 4)
            for value in (segment_text[:3], own_sep, segment_text[4:end]):
                field = _new(field_cls)
                field.append(value)
                field.__dict__ = field_attrs_copy()
                add_field(field)
            segment_text = segment_text[end + 1 :]
            if not segment_text:
                continue
        if (
            repetition_sep not in segment_text
            and component_sep not in segment_text
            and subcomponent_sep not in segment_text
        ):
            # Most segments: every field a leaf.
            for value in segment_text.split(field_sep):
                field = _new(field_cls)
                field.append(value)
                field.__dict__ = field_attrs_copy()
                add_field(field)
            continue
        for field_text in segment_text.split(field_sep):
            field = _new(field_cls)
            field.__dict__ = field_attrs_copy()
            add_field(field)
            if (
                repetition_sep not in field_text
                and component_sep not in field_text
                and subcomponent_sep not in field_text
            ):
                field.append(field_text)
                continue
            for repetition_text in field_text.split(repetition_sep):
                repetition = _new(repetition_cls)
                repetition.__dict__ = repetition_attrs_copy()
                field.append(repetition)
                if component_sep not in repetition_text and subcomponent_sep not in repetition_text:
                    repetition.append(repetition_text)
                    continue
                for component_text in repetition_text.split(component_sep):
                    component = _new(component_cls)
                    component.__dict__ = component_attrs_copy()
                    repetition.append(component)
                    if subcomponent_sep in component_text:
                        component.extend(component_text.split(subcomponent_sep))
                    else:
                        component.append(component_text)

    message = _new(hl7.Message)
    message.extend(segments)
    message.__dict__ = message_attrs
    return message
