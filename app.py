"""``uvicorn app:app`` from the checkout, as the operations manual says."""

from leitstand.asgi import app

__all__ = ["app"]
