"""leitstand: an HTTP event-ingest service that appends JSON events to per-domain JSONL files."""

__version__ = "0.1.0"
