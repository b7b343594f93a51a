"""Events from files as producers write them: JSONL, JSON arrays, or JSON values one after
another, compact or pretty-printed (what ``jq`` prints).

An event is passed on as the text that was read, not parsed and encoded again, so that the
service judges exactly what the producer wrote (duplicate keys, big numbers). A value that
spans lines is joined into one: outside strings a line break is only whitespace, and inside
them JSON allows none. Memory is bounded by the largest value, not by the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import orjson

_DECODER = json.JSONDecoder()
_SPACE = " \t\r\n"
_SPACE_IN_ARRAY = _SPACE + ","
# More than any request may hold: a value still open after this much text is given up on.
_MAX_VALUE = 4 << 20


@dataclass(frozen=True)
class Invalid:
    """A stretch of input that is no event; ``where`` is ``name:line`` or ``name:first-last``."""

    where: str
    reason: str


def values(lines: Iterable[bytes], name: str) -> Iterator[bytes | Invalid]:
    """Each event of ``lines`` as one line of JSON (without its newline), in order."""
    splitter = _Splitter(name)
    number = 0
    for number, line in enumerate(lines, 1):
        if splitter.idle:
            stripped = line.strip()
            if not stripped:
                continue
            # The common case, one object per line, without a detour through str.
            if stripped[:1] == b"{" and _is_object(stripped):
                yield stripped
                continue
        try:
            text = line.decode()
        except UnicodeDecodeError:
            text = "\x00\n"  # not UTF-8: reported as invalid json, like any other bad line
        yield from splitter.feed(text, number)
    yield from splitter.end(number)


def _is_object(text: bytes) -> bool:
    try:
        return type(orjson.loads(text)) is dict
    except orjson.JSONDecodeError:
        return False


class _Splitter:
    """Values that span lines, or share one: the text not yet consumed, and where it starts."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = ""
        self.line = 0  # number of the line self.text starts on
        self.in_array = False
        self.bad: tuple[int, int] | None = None  # lines skipped since an error, not yet reported

    @property
    def idle(self) -> bool:
        return not self.text.strip() and not self.in_array and self.bad is None

    def feed(self, text: str, number: int) -> Iterator[bytes | Invalid]:
        if not self.text:
            self.line = number
        self.text += text
        # Only a line that ends in a bracket can complete a value: parsing less often keeps a
        # value of many lines from being parsed again on each line.
        if len(self.text) > _MAX_VALUE or text.rstrip().endswith(("}", "]")):
            yield from self._drain(final=len(self.text) > _MAX_VALUE)

    def end(self, number: int) -> Iterator[bytes | Invalid]:
        yield from self._drain(final=True)
        if self.in_array:
            self.bad = (self.bad[0] if self.bad else number, number)
        yield from self._report()

    def _drain(self, final: bool) -> Iterator[bytes | Invalid]:
        text, pos = self.text, 0
        while True:
            start, pos = pos, _skip_space(text, pos, _SPACE_IN_ARRAY if self.in_array else _SPACE)
            if pos == len(text):
                break
            if text[pos] == "[" and not self.in_array and self.bad is None:
                self.in_array, pos = True, pos + 1
                continue
            if text[pos] == "]" and self.in_array:
                self.in_array, pos = False, pos + 1
                continue
            try:
                value, end = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                if exc.pos >= len(text.rstrip()) and not final:
                    pos = start  # a value that goes on in the next line; keep where its line starts
                    break
                value, end = None, -1
            # After an error, only an object that starts a line counts as the next event.
            if end > 0 and (self.bad is None or type(value) is dict and (pos == 0 or text[pos - 1] == "\n")):
                yield from self._report()
                if type(value) is dict:
                    yield text[pos:end].replace("\n", " ").replace("\r", " ").encode()
                else:
                    yield Invalid(self._at(self._line_of(text, pos)), "invalid payload")
                pos = end
                continue
            # Not a value: skip the rest of its line, and report what was skipped as one stretch.
            newline = text.find("\n", pos)
            end = len(text) if newline < 0 else newline + 1
            line = self._line_of(text, pos)
            self.bad = (self.bad[0] if self.bad else line, line)
            self.in_array = False
            pos = end
        self.line = self._line_of(text, pos)
        self.text = text[pos:]

    def _line_of(self, text: str, pos: int) -> int:
        return self.line + text.count("\n", 0, pos)

    def _at(self, first: int, last: int | None = None) -> str:
        return f"{self.name}:{first}" if last is None or last == first else f"{self.name}:{first}-{last}"

    def _report(self) -> Iterator[Invalid]:
        if self.bad is not None:
            yield Invalid(self._at(*self.bad), "invalid json")
            self.bad = None


def _skip_space(text: str, pos: int, space: str) -> int:
    while pos < len(text) and text[pos] in space:
        pos += 1
    return pos
