"""The verdicts bench/run.py writes into docs/benchmarks.md: the memory soak's."""

from __future__ import annotations

import sys

from conftest import ROOT

# The benchmark scripts import each other by name; only for this import, so that none of their
# names (run, send, broker) shadows another module of the suite.
sys.path.insert(0, str(ROOT / "bench"))
try:
    from run import Soak
finally:
    sys.path.remove(str(ROOT / "bench"))


def _soak(rss: list[float]) -> Soak:
    return Soak(
        seconds=5.0 * len(rss),
        load=None,
        samples=[(5.0 * (n + 1), m) for n, m in enumerate(rss)],  # type: ignore[arg-type]
        acked=0,
        lines=0,
    )


def test_an_rss_that_saws_over_a_flat_floor_is_flat() -> None:
    # The soak of 2026-12-05 01:52 UTC (once a minute, each level held for its minute): its
    # floor stayed at 218 MiB while the RSS climbed to 239 and fell back, ending on a climb.
    levels = [165.9, 227.3, 218.3, 218.3, 234.2, 238.8, 239.5, 229.0, 218.3, 218.3]
    soak = _soak([m for m in levels for _ in range(12)] + [234.2] * 6)
    assert soak.growth_mib == 0.0
    assert soak.flat


def test_a_steady_leak_is_growing() -> None:
    leak = _soak([166.0] * 10 + [218.0 + 0.1 * n for n in range(120)])  # 12 MiB over 10 minutes
    assert leak.growth_mib > 0.02 * 218.0
    assert not leak.flat
    assert _soak([166.0] * 10 + [218.0] * 120).flat
