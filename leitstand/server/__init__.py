"""Serving events: the ASGI app that uvicorn runs, its routes, the read API and its streams, the control-room page and the API description."""
