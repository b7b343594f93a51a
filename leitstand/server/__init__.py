"""Serving events: the ASGI app that uvicorn runs, its routes and its API description."""
