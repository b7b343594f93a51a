"""The module uvicorn loads: settings are read and checked here, before the port is bound."""

from __future__ import annotations

from leitstand import config
from leitstand.server.app import Leitstand
from leitstand.telemetry import logs


def _load() -> Leitstand:
    try:
        settings = config.load()
        return Leitstand(settings, logs.setup(settings.log_format))
    except config.ConfigError as exc:
        logs.fatal(str(exc))


app = _load()
