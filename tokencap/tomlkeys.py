"""Line numbers of the keys in a TOML document, which `tomllib` does not report.

`key_lines` maps every key path to the line that defines it, so a validation error can name
the line. A path is a tuple of keys, with an integer index for each element of an array or an
array of tables: `[tasks.fix-login]` defines `("tasks", "fix-login")`, and the second
`[[x]]` defines `("x", 1)`. The scanner trusts the syntax, so parse the text with `tomllib`
first: on invalid TOML its result is undefined.
"""

from __future__ import annotations

import bisect
import tomllib

KeyPath = tuple[str | int, ...]

_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# A scalar value (number, boolean, date or time) ends at one of these characters.
_SCALAR_END = frozenset(",]}#\r\n")


def key_lines(text: str) -> dict[KeyPath, int]:
    """Return the 1-based line on which each key path of `text` is first defined."""
    return _Scanner(text).scan()


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[KeyPath, int] = {}
        self._newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        # Number of elements seen so far for each array of tables, keyed by its resolved path.
        self._array_tables: dict[KeyPath, int] = {}

    def scan(self) -> dict[KeyPath, int]:
        table: KeyPath = ()
        while True:
            self._skip_blank_lines()
            if self.pos >= len(self.text):
                return self.lines
            line = self._line()
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                keys = self._dotted_key()
                self.pos += 2  # ]]
                path = self._resolve_header(keys)
                index = self._array_tables.get(path, 0)
                self._array_tables[path] = index + 1
                table = (*path, index)
                self._record_prefixes(table, line)
            elif self.text[self.pos] == "[":
                self.pos += 1
                keys = self._dotted_key()
                self.pos += 1  # ]
                table = self._resolve_header(keys)
                self._record_prefixes(table, line)
            else:
                self._key_value(table)

    # --- Keys ---------------------------------------------------------------------------------

    def _resolve_header(self, keys: tuple[str, ...]) -> KeyPath:
        # A header below an array of tables refers to that array's latest element.
        path: KeyPath = ()
        for key in keys:
            if path in self._array_tables:
                path = (*path, self._array_tables[path] - 1)
            path = (*path, key)
        return path

    def _dotted_key(self) -> tuple[str, ...]:
        keys = []
        while True:
            self._skip_spaces()
            keys.append(self._simple_key())
            self._skip_spaces()
            if self._peek() != ".":
                return tuple(keys)
            self.pos += 1

    def _simple_key(self) -> str:
        start = self.pos
        quote = self._peek()
        if quote == '"':
            self._skip_basic_string()
            # Decoding escapes exactly as tomllib does is easiest with tomllib itself.
            return tomllib.loads("k = " + self.text[start : self.pos])["k"]
        if quote == "'":
            end = self.text.index("'", start + 1)
            self.pos = end + 1
            return self.text[start + 1 : end]
        while self.pos < len(self.text) and self.text[self.pos] in _BARE_KEY_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def _key_value(self, prefix: KeyPath) -> None:
        line = self._line()
        path = (*prefix, *self._dotted_key())
        self._record_prefixes(path, line)
        self._skip_spaces()
        self.pos += 1  # =
        self._value(path)

    def _record_prefixes(self, path: KeyPath, line: int) -> None:
        # Tables created implicitly, such as "tasks" by [tasks.fix-login], take the line
        # of their first mention.
        for end in range(1, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    # --- Values -------------------------------------------------------------------------------

    def _value(self, path: KeyPath) -> None:
        self._skip_spaces()
        char = self._peek()
        if char == '"':
            self._skip_basic_string()
        elif char == "'":
            self._skip_literal_string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            while self.pos < len(self.text) and self.text[self.pos] not in _SCALAR_END:
                self.pos += 1

    def _array(self, path: KeyPath) -> None:
        self.pos += 1  # [
        index = 0
        while True:
            self._skip_blank_lines()
            if self._peek() == "]":
                self.pos += 1
                return
            self._record_prefixes((*path, index), self._line())
            self._value((*path, index))
            index += 1
            self._skip_blank_lines()
            if self._peek() == ",":
                self.pos += 1

    def _inline_table(self, path: KeyPath) -> None:
        self.pos += 1  # {
        while True:
            self._skip_spaces()
            if self._peek() == "}":
                self.pos += 1
                return
            self._key_value(path)
            self._skip_spaces()
            if self._peek() == ",":
                self.pos += 1

    def _skip_basic_string(self) -> None:
        if self.text.startswith('"""', self.pos):
            self._skip_multiline('"""', escapes=True)
            return
        self.pos += 1
        while self.text[self.pos] != '"':
            self.pos += 2 if self.text[self.pos] == "\\" else 1
        self.pos += 1

    def _skip_literal_string(self) -> None:
        if self.text.startswith("'''", self.pos):
            self._skip_multiline("'''", escapes=False)
            return
        self.pos = self.text.index("'", self.pos + 1) + 1

    def _skip_multiline(self, delimiter: str, escapes: bool) -> None:
        self.pos += 3
        while not self.text.startswith(delimiter, self.pos):
            self.pos += 2 if escapes and self.text[self.pos] == "\\" else 1
        self.pos += 3
        # Up to two quotes right before the closing delimiter belong to the string.
        for _ in range(2):
            if self._peek() == delimiter[0]:
                self.pos += 1

    # --- Whitespace and positions -------------------------------------------------------------

    def _skip_spaces(self) -> None:
        while self._peek() in (" ", "\t"):
            self.pos += 1

    def _skip_blank_lines(self) -> None:
        """Skip whitespace, line breaks and comments."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r\n":
                self.pos += 1
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _line(self) -> int:
        return bisect.bisect_left(self._newlines, self.pos) + 1
