"""Taking events in: request bodies (JSON, NDJSON, OpenTelemetry logs; gzip, zstd) turned into the exact lines the journal stores, and domain names."""
