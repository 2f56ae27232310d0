"""bench/RESULTS.md, where each bench keeps its section between its own markers."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(section: str, begin: str, end: str, before: str | None = None) -> None:
    """Put ``section`` (its markers included) where ``begin`` ... ``end`` stand; the first time,
    before the line ``before`` (else at the end)."""
    text = RESULTS.read_text()
    if begin in text:
        head, _, rest = text.partition(begin)
        text = head + section + "\n\n" + rest.partition(end)[2].lstrip("\n")
    else:
        head, sep, rest = text.partition(before) if before else (text, "", "")
        text = head + section + "\n" + sep + rest if sep else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
