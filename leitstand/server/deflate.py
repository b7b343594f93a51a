"""``Content-Encoding: deflate`` for event streams, compressed once for all streams that send the same page.

100 streams that follow a busy domain send every event 100 times. Compressed, that is about a
ninth of the bytes, which the server copies into sockets (on the event loop) and the network
carries. Compressing each stream on its own would cost more CPU than it saves, so a page is
compressed once, by a fresh compressor that knows nothing before it, and ends byte-aligned (a
sync flush): such a *piece* continues any deflate stream. Each response is one zlib stream
(RFC 1950) spliced from pieces: a header, the pieces it is sent, and at its end an empty final
block and the Adler-32 of everything it carried, combined from the pieces' own checksums.
Every decoder reads it as one ordinary stream; none has to know about the pieces.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# zlib's header for a 32 KiB window and the default level (RFC 1950: a multiple of 31).
_HEADER = b"\x78\x9c"
# An empty fixed-Huffman block marked final: the end of the deflate data.
_FINAL_BLOCK = b"\x03\x00"
_ADLER_BASE = 65521
# zlib's default: a page is compressed once for all its streams, so each byte it saves is saved
# once per stream, in the event loop's socket writes and on the network. Events like
# harness.VARIED_EVENT, framed: 27.3 bytes each at level 6 against 34.1 at level 1, for 2.0 µs of
# the read pool (without the GIL) against 0.8 (`bench/read.py pages`).
_LEVEL = 6


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes to send, encoded once for every stream at the same place.

    ``data`` is the text itself for an identity stream, raw deflate for a deflate one; ``plain``
    and ``adler`` are the text's length and Adler-32 (for the deflate stream's trailer).
    """

    data: bytes
    plain: int
    adler: int


def piece(text: bytes, deflate: bool) -> Piece:
    """``text`` as a piece: as it is, or compressed on its own, ending byte-aligned and not final."""
    if not deflate or not text:
        return Piece(text, len(text), 1)
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return Piece(compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH), len(text), zlib.adler32(text))


class Identity:
    """A stream sent as it is."""

    encoding: str | None = None

    def send(self, p: Piece) -> bytes:
        return p.data

    def end(self) -> bytes:
        return b""


class Deflate:
    """One zlib stream spliced from pieces: the header before the first, the trailer at the end."""

    encoding = "deflate"

    def __init__(self) -> None:
        self._adler = 1
        self._started = False

    def send(self, p: Piece) -> bytes:
        self._adler = adler32_combine(self._adler, p.adler, p.plain)
        if self._started:
            return p.data
        self._started = True
        return _HEADER + p.data

    def end(self) -> bytes:
        """The stream's last bytes: after them, a decoder has checked every byte it was sent."""
        return (b"" if self._started else _HEADER) + _FINAL_BLOCK + self._adler.to_bytes(4, "big")


def adler32_combine(first: int, second: int, length: int) -> int:
    """The Adler-32 of two texts one after the other, from theirs and the second's ``length``
    (zlib has this as ``adler32_combine``; Python's zlib module does not offer it)."""
    rem = length % _ADLER_BASE
    low = first & 0xFFFF
    sum1 = (low + (second & 0xFFFF) + _ADLER_BASE - 1) % _ADLER_BASE
    sum2 = (rem * low + (first >> 16) + (second >> 16) + _ADLER_BASE - rem) % _ADLER_BASE
    return sum1 | (sum2 << 16)


def accepts_deflate(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header allows deflate (RFC 9110 12.5.3): listed, or by ``*``,
    with a weight above zero."""
    wildcard = False
    for item in accept_encoding.lower().split(","):
        name, _, params = item.partition(";")
        name = name.strip()
        if name not in ("deflate", "*"):
            continue
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if name == "deflate":
            return weight > 0
        wildcard = weight > 0
    return wildcard
