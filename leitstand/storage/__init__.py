"""Keeping events: the journal's append-only files, durable writes, idempotency key logs, and the data dir as seen from outside the server."""
