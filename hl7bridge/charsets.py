"""HL7 MSH-18 character set names and the Python codecs that read them.

No I/O. HL7 v2 Table 0211 names the character sets a message may declare in
MSH-18; the first repetition is the one the message is written in (HL7 v2.5
section 2.15.9.18). An empty MSH-18 means ASCII in the standard, but senders
that leave it empty write whatever their system uses, so hl7bridge falls back
to its default codec (UTF-8) instead.
"""

from __future__ import annotations

#: HL7 Table 0211 value -> Python codec name.
MSH18_CODECS = {
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR6": "ascii",
    "ISO IR14": "iso2022_jp",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_1",
    "ISO IR100": "iso8859-1",
    "ISO IR192": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
}


def codec_for(msh18: str) -> str | None:
    """The Python codec for an MSH-18 value (its first repetition); None if unknown or empty."""
    return MSH18_CODECS.get(msh18.strip().upper())
