"""The client: batches under the server's limits, safe retries and an outbox (``Client``, ``AsyncClient``), and ``leitstand send`` on top of it."""

from leitstand.client.client import AsyncClient, Client, Rejected, Result, retry_after, token_from_env

__all__ = ["AsyncClient", "Client", "Rejected", "Result", "retry_after", "token_from_env"]
