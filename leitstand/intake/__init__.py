"""Taking events in: request bodies turned into the exact lines the journal stores, and domain names."""
