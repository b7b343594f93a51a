"""The command line: ``leitstand serve`` and friends.

Every flag mirrors a ``LEITSTAND_*`` variable; a flag given wins over the environment and
is handed to the worker processes through it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from leitstand import __version__, config, logs

# The token has no flag: a flag shows up in `ps` for every user on the machine.
_FLAGGED = [s for s in config.SETTINGS if s.env != "LEITSTAND_TOKEN"]


def _flag(setting: config.Setting) -> str:
    return "--" + setting.env.removeprefix("LEITSTAND_").lower().replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leitstand", description="HTTP event ingest into append-only JSONL files.")
    parser.add_argument("--version", action="version", version=f"leitstand {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP service", description="Run the HTTP service under uvicorn.")
    for setting in _FLAGGED:
        serve.add_argument(
            _flag(setting),
            dest=setting.env,
            metavar=setting.env.removeprefix("LEITSTAND_"),
            help=f"{setting.meaning} (env {setting.env}, default {setting.default})",
        )
    return parser


def serve(args: argparse.Namespace) -> None:
    for setting in _FLAGGED:
        value = getattr(args, setting.env)
        if value is not None:
            os.environ[setting.env] = value
    try:
        settings = config.load()
    except config.ConfigError as exc:
        logs.fatal(str(exc))
    logs.setup(settings.log_format)
    import uvicorn

    uvicorn.run(
        "leitstand.asgi:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        # Whose X-Forwarded-For counts is LEITSTAND_TRUSTED_PROXIES' business alone.
        proxy_headers=False,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main(sys.argv[1:])
