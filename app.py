"""``uvicorn app:app`` from the checkout, as the operations manual says."""

from leitstand.server.asgi import app

__all__ = ["app"]
