"""Broker mode: front ends publish accepted requests to NATS JetStream, and the archiver writes them into the data dir exactly once."""
