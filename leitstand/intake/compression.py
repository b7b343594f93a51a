"""Content-Encoding: a body as sent, decompressed within the same size limit as a plain one.

A compressed body is given up as soon as its output passes the limit, so a bomb costs no
more memory than a body of the limit's size. gzip (every member, as ``gzip -c a b`` writes
them) is inflated with a cap on the output. zstd (every frame) is read through a bounded
reader; its frames may not ask for a window above ``max(8 MiB, limit)``, the most any
standard level up to 19 uses, so a frame cannot make the decoder reserve more memory than
that. The reader stops silently at a cut-off frame, so a second pass (its output is known to
be within the limit by then) checks that every frame ends.
"""

from __future__ import annotations

import zlib

import zstandard

from leitstand.intake.events import PayloadError

# What ``Content-Encoding`` may say; anything else is 415.
ENCODINGS = (b"identity", b"gzip", b"zstd")
_MIN_WINDOW = 8 << 20


def decompress(body: bytes, encoding: bytes, limit: int) -> bytes | None:
    """``body`` decoded, or None once the output passes ``limit``; :class:`PayloadError` if it is not ``encoding``."""
    if not body and encoding != b"identity":
        raise PayloadError(f"invalid {encoding.decode()}")  # no stream at all, not an empty JSON body
    if encoding == b"gzip":
        try:
            return _gunzip(body, limit)
        except zlib.error:
            raise PayloadError("invalid gzip") from None
    if encoding == b"zstd":
        try:
            return _unzstd(body, limit)
        except zstandard.ZstdError:
            raise PayloadError("invalid zstd") from None
    return body


def _gunzip(data: bytes, limit: int) -> bytes | None:
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            return None
        if not inflater.eof:
            raise zlib.error("truncated gzip stream")
        data = inflater.unused_data
    return bytes(out)


def _unzstd(data: bytes, limit: int) -> bytes | None:
    decompressor = zstandard.ZstdDecompressor(max_window_size=max(_MIN_WINDOW, limit))
    reader = decompressor.stream_reader(data, read_across_frames=True)
    chunks = []
    size = 0
    while chunk := reader.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    while data:
        frame = decompressor.decompressobj()
        frame.decompress(data)
        if not frame.eof:
            raise zstandard.ZstdError("truncated zstd frame")
        data = frame.unused_data
    return b"".join(chunks)
