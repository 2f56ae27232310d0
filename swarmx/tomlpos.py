"""Best-effort line numbers for dotted key paths in TOML text.

tomllib returns plain data without positions, yet an error found after parsing (a schema check, a
workflow's graph check) should still say ``file:line``. This scanner recovers the line from the
source text; it never raises, and answers None when it cannot tell. It reads the text once, with
regular expressions rather than a Python loop per character, in time linear in its size; each
lookup then walks the statements once. The workflow parser builds one only to report an error
(step header lines, wanted for every step, come from a single regular-expression pass there).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator

Segment = tuple[str, int | None]
"""A key and, for an array element (``steps[2]``), its index."""

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PATH_PART = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")
_BLANK = re.compile(r"(?:[ \t\r\n]+|#[^\n]*)*")
_SPACES = re.compile(r"[ \t]*")
_SCALAR = r"""(?:"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|[A-Za-z0-9_.:+-]+)"""
_SIMPLE = re.compile(
    rf"([A-Za-z0-9_-]+)[ \t]*=[ \t]*(?:{_SCALAR}|(\[)[ \t]*(?:{_SCALAR}[ \t]*,[ \t]*)*"
    rf"(?:{_SCALAR}[ \t]*)?\])[ \t]*(?:#[^\n]*)?(?=\n|\Z)"
)
"""The commonest statements, ``key = "string"`` (or a number or boolean) and a one-line array
of those: matched in one step."""
_VALUE_STOP = re.compile(r"[\"'#\n\[\]{}]")
"""What matters inside a value: strings, comments, the end of the line, and brackets."""
_STRINGS = {  # each of TOML's four kinds; an unterminated one runs to the end of its line/text
    '"""': re.compile(r'"""(?:[^"\\]+|\\.|"(?!""))*(?:"""\"{0,2})?', re.DOTALL),
    "'''": re.compile(r"'''(?:[^']+|'(?!''))*(?:'''\'{0,2})?"),
    '"': re.compile(r'"(?:[^"\\\n]+|\\.)*"?'),
    "'": re.compile(r"'[^'\n]*'?"),
}


def locate(text: str, path: str) -> int | None:
    """1-based line where ``path`` is set (see `Positions.line`); scans ``text`` afresh, so a
    caller asking about many paths of one text builds a `Positions` once instead."""
    return Positions(text).line(path)


class Positions:
    """The statements of a TOML text, scanned once.

    ``depth`` is the deepest nesting of arrays and inline tables in any value, and
    ``depth_line`` the line where it is first reached.
    """

    def __init__(self, text: str) -> None:
        scanner = _Scanner(text)
        self._statements = list(scanner.statements())
        self.depth = scanner.depth
        self.depth_line = scanner.depth_line

    def line(self, path: str) -> int | None:
        """1-based line where ``path`` is set: ``name``, ``scheduler.listen``, ``steps[2].after``,
        ``steps[0].fan_out.max``, ``node.replicas[1].model``.

        The statement matching most of the path wins, the earliest on a tie: its ``key =`` line
        (an inline table or array value covers everything inside it; the first ``fan_out.max =``
        stands for ``fan_out``), else the nearest enclosing ``[table]`` or ``[[array]]`` header
        (``steps[2].id`` when the 3rd step has no id: its header).
        """
        query = _parse_path(path)
        if query is None:
            return None
        best: int | None = None
        best_len = 0
        for line, stmt in self._statements:
            n = min(len(stmt), len(query))
            if n > best_len and all(
                s_name == q_name and (s_idx is None or q_idx is None or s_idx == q_idx)
                for (s_name, s_idx), (q_name, q_idx) in zip(stmt[:n], query[:n], strict=True)
            ):
                best, best_len = line, n
        return best


def _parse_path(path: str) -> list[Segment] | None:
    segments: list[Segment] = []
    for part in path.split("."):
        m = _PATH_PART.fullmatch(part)
        if m is None:
            return None
        index = re.match(r"\[(\d+)\]", m.group(2))  # nested-array indices lie inside one value
        segments.append((m.group(1), int(index.group(1)) if index else None))
    return segments


class _Scanner:
    """Walks TOML text statement by statement, skipping strings, comments and multi-line values
    so that their contents are never mistaken for keys or headers."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.depth = 0
        self.depth_line = 0

    def _line(self, i: int) -> int:
        return bisect.bisect_left(self.newlines, i) + 1

    def statements(self) -> Iterator[tuple[int, list[Segment]]]:
        """(line, full path) of every table header and every ``key =``, in file order."""
        table: list[Segment] = []
        arrays: dict[tuple[Segment, ...], int] = {}  # array-of-tables path -> its last index
        text = self.text
        while True:
            self.i = _end(_BLANK, text, self.i)
            if self.i >= len(text):
                return
            line = self._line(self.i)
            if text.startswith("[[", self.i):
                self.i += 2
                names = self._key()
                self._skip_line()
                if names:
                    parent = self._resolve(names[:-1], arrays)
                    array = (*parent, (names[-1], None))
                    arrays[array] = arrays.get(array, -1) + 1
                    table = [*parent, (names[-1], arrays[array])]
                    yield line, table
            elif text.startswith("[", self.i):
                self.i += 1
                names = self._key()
                self._skip_line()
                if names:
                    table = self._resolve(names, arrays)
                    yield line, table
            elif simple := _SIMPLE.match(text, self.i):
                self.i = simple.end()
                if simple.group(2) and not self.depth:  # a flat array: nesting 1
                    self.depth, self.depth_line = 1, line
                yield line, [*table, (simple.group(1), None)]
            else:
                names = self._key()
                self._skip_spaces()
                if names and text.startswith("=", self.i):
                    self.i += 1
                    yield line, [*table, *((name, None) for name in names)]
                    self._skip_value()
                else:
                    self._skip_line()

    @staticmethod
    def _resolve(names: list[str], arrays: dict[tuple[Segment, ...], int]) -> list[Segment]:
        """A header's names as a path: a name that is an array of tables means its last element."""
        path: list[Segment] = []
        for name in names:
            path.append((name, arrays.get((*path, (name, None)))))
        return path

    def _key(self) -> list[str]:
        """A dotted key (bare, "basic" or 'literal' parts); empty if none starts here."""
        parts: list[str] = []
        while True:
            self._skip_spaces()
            if self.text.startswith('"', self.i):
                raw = self._string()
                try:
                    parts.append(json.loads(raw))  # TOML's escapes are JSON's, nearly
                except ValueError:
                    parts.append(raw[1:-1])
            elif self.text.startswith("'", self.i):
                parts.append(self._string()[1:-1])
            else:
                m = _BARE_KEY.match(self.text, self.i)
                if m is None:
                    return parts
                parts.append(m.group())
                self.i = m.end()
            self._skip_spaces()
            if not self.text.startswith(".", self.i):
                return parts
            self.i += 1

    def _string(self) -> str:
        """Consume the string literal starting here (any of TOML's four kinds); return its text."""
        text, start = self.text, self.i
        quote = text[start]
        delim = quote * 3 if text.startswith(quote * 3, start) else quote
        self.i = _end(_STRINGS[delim], text, start)
        return text[start : self.i]

    def _skip_value(self) -> None:
        depth = 0
        text = self.text
        while (m := _VALUE_STOP.search(text, self.i)) is not None:
            c = m.group()
            self.i = m.start()
            if c in "\"'":
                self._string()
                continue
            if c == "#":
                self._skip_line()
                continue
            if c == "\n" and depth <= 0:
                return
            if c in "[{":
                depth += 1
                if depth > self.depth:
                    self.depth, self.depth_line = depth, self._line(self.i)
            elif c in "]}":
                depth -= 1
            self.i += 1
        self.i = len(text)

    def _skip_spaces(self) -> None:
        self.i = _end(_SPACES, self.text, self.i)

    def _skip_line(self) -> None:
        end = self.text.find("\n", self.i)
        self.i = len(self.text) if end < 0 else end


def _end(pattern: re.Pattern[str], text: str, i: int) -> int:
    """Where a match of ``pattern`` at ``i`` ends (the patterns here all match the empty
    string, so ``i`` at worst)."""
    m = pattern.match(text, i)
    return i if m is None else m.end()
