"""The command line: ``leitstand serve``, ``archive`` and ``send``, and the operator commands on the data dir (verify, backup and restore, stats, tail, check-config)."""

from leitstand.cli.main import main

__all__ = ["main"]
