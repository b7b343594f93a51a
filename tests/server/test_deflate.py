"""Deflated event streams: pieces compressed once, spliced into one zlib stream per response."""

from __future__ import annotations

import random
import zlib

import pytest

from leitstand.server.deflate import Deflate, Identity, accepts_deflate, adler32_combine, piece


def test_adler32_combine_agrees_with_zlib() -> None:
    rng = random.Random(7)
    for _ in range(500):
        first, second = rng.randbytes(rng.randint(0, 3000)), rng.randbytes(rng.choice([0, 1, 65520, 65521, 70000]))
        assert adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second)) == zlib.adler32(first + second)


def test_pieces_spliced_in_any_order_and_number_are_one_whole_zlib_stream() -> None:
    rng = random.Random(11)
    texts = [b"", b": leitstand\nretry: 2000\n\n"] + [
        b"".join(b'id: c%d\ndata: {"n":%d,"pad":"%s"}\n\n' % (n, n, b"x" * rng.randint(0, 300)) for n in range(k))
        for k in (1, 10, 1000)
    ]
    pieces = {text: piece(text, deflate=True) for text in texts}
    for _ in range(100):
        sent = [rng.choice(texts) for _ in range(rng.randint(0, 8))]
        stream = Deflate()
        # Each piece is compressed once and sent as it is by every stream.
        body = [stream.send(pieces[text]) for text in sent] + [stream.end()]
        decoder = zlib.decompressobj()
        # Every body decodes as soon as it arrives: a stream never waits for the next one.
        assert [decoder.decompress(part) for part in body[:-1]] == sent
        assert decoder.decompress(body[-1]) == b""
        assert decoder.eof and not decoder.unused_data
        # Checked once more in one go (zlib checks the header and the Adler-32 trailer).
        assert zlib.decompress(b"".join(body)) == b"".join(sent)


def test_a_piece_is_smaller_than_its_text_and_identity_sends_it_as_it_is() -> None:
    text = b"".join(b'id: c%d\ndata: {"n":%d,"level":"info","msg":"order placed"}\n\n' % (n, n) for n in range(1000))
    assert len(piece(text, deflate=True).data) < len(text) // 5
    # Compressed once for every stream: as small as zlib's default level makes it, not its fastest.
    rng = random.Random(3)
    varied = b"".join(
        b'id: %d\ndata: {"host":"web-%02d","amount":%d,"msg":"%s"}\n\n'
        % (n, rng.randrange(40), rng.randrange(99999), rng.choice([b"order placed", b"cart updated"]))
        for n in range(1000)
    )
    default = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert len(piece(varied, deflate=True).data) <= len(default.compress(varied) + default.flush(zlib.Z_SYNC_FLUSH))
    plain = piece(text, deflate=False)
    assert (Identity().send(plain), Identity().end()) == (text, b"")


@pytest.mark.parametrize(
    ("header", "deflate"),
    [
        ("gzip, deflate, br, zstd", True),  # Chromium
        ("deflate, gzip, br, zstd", True),  # curl --compressed
        ("DEFLATE ; q=0.5", True),
        ("*", True),
        ("gzip, *;q=0.1", True),
        ("", False),
        ("identity", False),
        ("gzip", False),
        ("deflate;q=0", False),
        ("*;q=0", False),
        ("deflate;q=0, *", False),
        ("deflate;q=nonsense", False),
    ],
)
def test_accept_encoding(header: str, deflate: bool) -> None:
    assert accepts_deflate(header) is deflate
