"""Content-Encoding without the server: the limit is on the output, to the byte, for gzip and zstd alike."""

from __future__ import annotations

import gzip

import pytest
import zstandard

from leitstand.intake.compression import decompress
from leitstand.intake.events import PayloadError

COMPRESS = {b"gzip": gzip.compress, b"zstd": zstandard.ZstdCompressor().compress}


@pytest.mark.parametrize("encoding", [b"gzip", b"zstd"])
def test_the_limit_is_on_the_output_to_the_byte(encoding: bytes) -> None:
    data = b"x" * 1000
    members = COMPRESS[encoding](data[:400]) + COMPRESS[encoding](data[400:])
    assert decompress(members, encoding, 1000) == data
    assert decompress(members, encoding, 999) is None


@pytest.mark.parametrize("encoding", [b"gzip", b"zstd"])
def test_an_empty_body_is_no_stream(encoding: bytes) -> None:
    with pytest.raises(PayloadError, match=f"invalid {encoding.decode()}"):
        decompress(b"", encoding, 10)


@pytest.mark.parametrize("encoding", [b"gzip", b"zstd"])
def test_a_cut_off_or_foreign_body_is_refused(encoding: bytes) -> None:
    whole = COMPRESS[encoding](b"x" * 1000)
    other = COMPRESS[b"zstd" if encoding == b"gzip" else b"gzip"](b"x")
    for garbled in (whole[:-4], other, whole + b"\0"):
        with pytest.raises(PayloadError, match=f"invalid {encoding.decode()}"):
            decompress(garbled, encoding, 10_000)


def test_a_zstd_window_larger_than_the_decoder_may_keep_is_refused() -> None:
    # Streamed (no size known in advance), a frame keeps its window: 16 MiB, over the 8 MiB allowed.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=24)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    wide = stream.compress(b"x" * 100) + stream.flush()
    assert zstandard.get_frame_parameters(wide).window_size == 16 << 20
    with pytest.raises(PayloadError, match="invalid zstd"):
        decompress(wide, b"zstd", 1 << 20)
    assert decompress(wide, b"zstd", 16 << 20) == b"x" * 100  # a limit that large allows it
