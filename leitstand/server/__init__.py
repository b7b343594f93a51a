"""Serving events: the ASGI app that uvicorn runs, its routes, its API description, and a quick stop."""
