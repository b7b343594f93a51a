"""The command line: ``leitstand serve``, the operator commands and ``leitstand send``.

Every flag of ``serve`` mirrors a ``LEITSTAND_*`` variable; a flag given wins over the
environment and is handed to the worker processes through it. The operator commands find
the data dir the same way (``--data-dir`` or ``LEITSTAND_DATA_DIR``). This module only
parses and prints; exit codes: 0 all well, 1 problems found, 2 the command could not run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import orjson

from leitstand import __version__, config
from leitstand.cli import backup, configcheck, stats, tail, verify
from leitstand.intake import domains
from leitstand.storage import datadir, journal
from leitstand.storage.datadir import Kind
from leitstand.telemetry import logs, metrics

# The token has no flag: a flag shows up in `ps` for every user on the machine.
_FLAGGED = [s for s in config.SETTINGS if s.env != "LEITSTAND_TOKEN"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leitstand", description="HTTP event ingest into append-only JSONL files.")
    parser.add_argument("--version", action="version", version=f"leitstand {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = _command(commands, "serve", "run the HTTP service under uvicorn, with the settings of LEITSTAND_*",
                     "LEITSTAND_TOKEN_FILE=/etc/leitstand/tokens leitstand serve --port 8788 --workers 2")
    for setting in _FLAGGED:
        serve.add_argument(
            setting.flag,
            dest=setting.env,
            metavar=setting.env.removeprefix("LEITSTAND_"),
            help=f"{setting.meaning} (env {setting.env}, default {setting.default})",
        )
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-dir", type=Path, help="the data dir (default: LEITSTAND_DATA_DIR, else ./data)")
    check = _command(commands, "verify", "check that every journal file holds whole JSON lines of its domain; "
                     "exit 1 on problems", "leitstand verify --data-dir /var/lib/leitstand", data)
    check.add_argument("--repair", action="store_true", help="set torn tails aside, as the server does at start")
    save = _command(commands, "backup", "copy the journal files to DEST, online and incrementally",
                    "leitstand backup /backup/leitstand", data)
    save.add_argument("dest", type=Path, metavar="DEST")
    load = _command(commands, "restore", "copy a backup into an empty data dir, then verify it",
                    "leitstand restore /backup/leitstand --data-dir /var/lib/leitstand-restore", data)
    load.add_argument("source", type=Path, metavar="SRC")
    count = _command(commands, "stats", "events, bytes, first and last event time per domain; a table on a "
                     "terminal, tab-separated columns in a pipe, --json for programs", "leitstand stats --json", data)
    count.add_argument("--json", action="store_true", help="one JSON array of objects, for programs")
    follow = _command(commands, "tail", "print the last whole lines of a domain's file, and with -f what is appended",
                      "leitstand tail app.orders -n 20 -f", data)
    follow.add_argument("domain", metavar="DOMAIN")
    follow.add_argument("-n", type=int, default=10, metavar="N", help="how many lines (default 10)")
    follow.add_argument("-f", action="store_true", help="keep printing lines as they are appended")
    _command(commands, "check-config", "show the effective settings, where each came from, and the problems "
             "they would cause; exit 1 on problems", "leitstand check-config --data-dir /var/lib/leitstand", data)
    _command(commands, "archive", "broker mode: copy the messages of NATS JetStream into the data dir; needs "
             "LEITSTAND_NATS_URL, the NATS servers the front ends publish to",
             "LEITSTAND_NATS_URL=nats://n1:4222 leitstand archive --data-dir /var/lib/leitstand", data)
    seal = _command(commands, "rotate", "seal domains' live files into segments now, while the service runs "
                    "(every domain unless named)", "leitstand rotate app.orders --data-dir /var/lib/leitstand", data)
    seal.add_argument("domains", nargs="*", metavar="DOMAIN", help="the domains to seal (default: every one)")
    _send_parser(commands)
    return parser


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    what: str,
    example: str,
    *parents: argparse.ArgumentParser,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A command whose --help says what it does (``what``, also its line in ``leitstand --help``, or the longer
    ``description``) and shows an example, as written."""
    text = description or what[:1].upper() + what[1:] + "."
    return commands.add_parser(name, parents=list(parents), help=what, description=textwrap.fill(text, 79),
                               epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def _send_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    push = _command(
        commands,
        "send",
        "send JSON events from files or stdin to the service, in batches, with retries that never store an event "
        "twice",
        "jq -c '.items[]' dump.json | leitstand send app.orders --outbox /var/spool/leitstand/app",
        description="Send events (JSONL, JSON arrays, or JSON values one after another, as jq prints them) "
        "in batches, with retries that never store an event twice. Exit 0: all stored; 1: some rejected "
        "(listed on stderr, the rest delivered), or the service refuses every request (one line); 2: service "
        "unreachable, events not delivered (with --outbox: kept there for the next run).",
    )
    push.add_argument("domain", metavar="DOMAIN")
    push.add_argument("files", nargs="*", metavar="FILE", help="files to read (default, or '-': stdin)")
    push.add_argument("--url", help="the service (default: LEITSTAND_URL, else http://localhost:8788)")
    push.add_argument(
        "--token",
        help="the token; visible in `ps` to every user of the machine, so prefer the environment: "
        "LEITSTAND_TOKEN (of several, comma-separated, the first is used), else LEITSTAND_TOKEN_FILE "
        "(the first token in it that may write to DOMAIN)",
    )
    push.add_argument("--outbox", type=Path, metavar="DIR", help="keep events in DIR until the service has them")
    push.add_argument("--tail", type=int, metavar="N", help="send only the last N events")
    push.add_argument("--dry-run", action="store_true", help="read, batch and count; send nothing")
    push.add_argument("--gzip", action="store_true", help="compress each request")
    push.add_argument("--max-events", type=int, default=10000, metavar="N",
                      help="events per request (default 10000, the server's default limit)")
    push.add_argument("--max-bytes", type=int, default=1 << 20, metavar="N",
                      help="bytes per request (default 1048576, the server's default limit)")
    push.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds per network operation")
    push.add_argument("--deadline", type=float, default=30.0, metavar="S",
                      help="seconds to retry a request before the service counts as unreachable (default 30)")


def serve(args: argparse.Namespace) -> None:
    for setting in _FLAGGED:
        value = getattr(args, setting.env)
        if value is not None:
            os.environ[setting.env] = value
    try:
        settings = config.load()
        metrics.share_between_workers(settings)
    except config.ConfigError as exc:
        logs.fatal(str(exc))
    logs.setup(settings.log_format)
    import uvicorn

    if settings.workers > 1:
        _pass_sighup_to_workers()
    uvicorn.run(
        "leitstand.server.asgi:app",
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


def _pass_sighup_to_workers() -> None:
    """On SIGHUP uvicorn's supervisor replaces every worker, and connections in flight can be
    reset. leitstand's workers reload their token file in place, so it hands them the signal.
    """
    from uvicorn.supervisors.multiprocess import Multiprocess

    def handle_hup(supervisor: Multiprocess) -> None:
        for worker in supervisor.processes:
            if worker.pid is not None:
                os.kill(worker.pid, signal.SIGHUP)

    Multiprocess.handle_hup = handle_hup  # type: ignore[method-assign,assignment]


def archive(args: argparse.Namespace) -> None:
    if args.data_dir is not None:
        os.environ["LEITSTAND_DATA_DIR"] = str(args.data_dir)
    try:
        settings = config.load(need_token=False)
    except config.ConfigError as exc:
        logs.fatal(str(exc))
    if not settings.nats_urls:
        logs.fatal("LEITSTAND_NATS_URL is not set: point it at the NATS servers the front ends publish to")
    logs.setup(settings.log_format)
    from leitstand.broker import archiver

    try:
        archiver.run(settings)
    except archiver.ArchiveError as exc:
        logs.fatal(str(exc))
    except OSError as exc:
        logs.fatal(f"data dir not usable: {journal.reason(exc)}")


def _data_dir(args: argparse.Namespace) -> Path:
    given: Path | None = args.data_dir
    return given or Path(config.raw_value(os.environ, "LEITSTAND_DATA_DIR"))


def _fail(message: str) -> NoReturn:
    print(f"leitstand: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _verify(args: argparse.Namespace) -> int:
    directory = _data_dir(args)
    if args.repair:
        for name, nbytes in sorted(journal.repair(directory).items()):
            print(f"repaired  {name}: {nbytes} bytes that were not a whole request set aside")
    return _print_verify(directory)


def _print_verify(directory: Path) -> int:
    reports = verify.verify(directory)
    problems = notes = 0
    for report in reports:
        if report.kind is Kind.PROBE:
            print(f"ignored   {report.name}: probe file of the server (harmless; a crash can leave one)")
        elif report.kind in (Kind.JOURNAL, Kind.SEGMENT) and not report.problems:
            print(f"ok        {report.name}: {report.lines} lines")
        for problem in report.problems:
            print(f"PROBLEM   {report.name}: {problem}")
        if report.hidden:
            print(f"PROBLEM   {report.name}: and {report.hidden} more")
        for note in report.notes:
            print(f"note      {report.name}: {note}")
        problems += len(report.problems) + report.hidden
        notes += len(report.notes)
    print(f"verify: {len(reports)} files, {problems} problems, {notes} notes")
    return 1 if problems else 0


def _backup(args: argparse.Namespace) -> int:
    run = backup.prepare(_data_dir(args), args.dest)
    with _progress("backup", total=run.total) as advance:
        summary = run.run(advance)
    for name in summary.rewritten:
        print(f"copied whole: {name} (sealed, truncated or rewritten since the last backup, or missing in DEST)")
    print(f"backup: {summary.files} files, {summary.copied} bytes copied, {summary.skipped} bytes skipped, "
          f"{summary.seconds:.2f} s")
    return 0


@contextmanager
def _progress(name: str, total: float | None = 100.0, counted: str | None = None) -> Iterator[Callable[[int], None]]:
    """What to advance: a transient rich bar on a terminal (with ``counted``, a spinner and a count
    instead), a no-op when the output is piped, so that it stays plain text."""
    if not sys.stdout.isatty():
        yield lambda n: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn

    columns = (SpinnerColumn(), TextColumn(f"{{task.completed}} {counted}")) if counted else ()
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(name, total=total)
        yield lambda n: bar.advance(task, n)


def _restore(args: argparse.Namespace) -> int:
    target = _data_dir(args)
    done = backup.restore(args.source, target)
    print(f"restore: {done.files} files, {done.bytes} bytes")
    for name in done.mismatched:
        print(f"PROBLEM   {name}: differs from the backup manifest (size or sha256)")
    return max(_print_verify(target), 1 if done.mismatched else 0)


def _rotate(args: argparse.Namespace) -> int:
    directory = _data_dir(args)
    if not directory.is_dir():
        _fail(f"data dir {directory} is not a directory: pass --data-dir or set LEITSTAND_DATA_DIR")
    names = []
    for raw in args.domains:
        domain = domains.normalize(raw)
        if domain is None:
            _fail(f"invalid domain {raw!r}: use lowercase letters, digits and '-', in labels separated by dots")
        names.append(domains.file_name(domain))
    try:
        settings = config.Config.from_env(need_token=False)
    except config.ConfigError as exc:
        _fail(str(exc))
    from leitstand.broker import archiver

    with archiver.idle(directory) as free:
        if not free:
            _fail("leitstand archive is writing this data dir: it seals by LEITSTAND_ROTATE_BYTES and "
                  "LEITSTAND_ROTATE_INTERVAL itself; rotate when it is stopped")
        sealed = journal.seal(directory, names or datadir.journal_names(directory), fsync=settings.fsync,
                              key_window=settings.idempotency_window, max_keys=settings.idempotency_max_keys)
    for name, segment in sealed.items():
        print(f"sealed    {name} -> {segment}" if segment else f"empty     {name}: nothing to seal")
    print(f"rotate: {sum(1 for s in sealed.values() if s)} sealed, {sum(1 for s in sealed.values() if not s)} empty")
    return 0


def _stats(args: argparse.Namespace) -> int:
    found = stats.stats(_data_dir(args))
    rows = [{"domain": s.domain, "file": s.file, "events": s.events, "bytes": s.bytes, "segments": s.segments,
             "first": _utc(s.first), "last": _utc(s.last)} for s in found]
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    columns = ("domain", "events", "bytes", "segments", "first", "last")
    cells = [["-" if row[key] is None else str(row[key]) for key in columns] for row in rows]
    if not sys.stdout.isatty():
        # For cut, awk and sort: a box table is cut to 80 columns in a pipe, its times with it.
        print("\n".join("\t".join(line) for line in [list(columns), *cells]))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for line in cells:
        table.add_row(*line)
    Console().print(table)
    return 0


def _utc(when: float | None) -> str | None:
    return None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _tail(args: argparse.Namespace) -> int:
    domain = domains.normalize(args.domain)
    if domain is None:
        _fail(f"invalid domain {args.domain!r}: use lowercase letters, digits and '-', in labels separated by dots")
    directory, name = _data_dir(args), domains.file_name(domain)
    out = sys.stdout.buffer
    try:
        text, cursor = tail.last(directory, name, args.n)
    except FileNotFoundError:
        if not args.f:
            _fail(f"no events for {domain} in the data dir yet")
        text, cursor = b"", None
    out.write(text)
    out.flush()
    if args.f:
        try:
            for lines in tail.follow(directory, name, cursor):
                out.write(lines)
                out.flush()
        except KeyboardInterrupt:
            pass  # Ctrl+C is how -f is meant to end.
    return 0


def _send(args: argparse.Namespace) -> int:
    # Imported here: httpx is not needed by the server's own commands.
    from leitstand.access import auth
    from leitstand.client import client, outbox, send

    try:
        token = args.token or client.token_from_env(args.domain) or ""
    except auth.TokenFileError as exc:
        _fail(f"LEITSTAND_TOKEN_FILE is not usable: {exc}")
    if not token and not args.dry_run:
        _fail("no token: export LEITSTAND_TOKEN_FILE=<file of tokens> or LEITSTAND_TOKEN=<token> "
              "(or give --token, which other users can see in ps)")
    if args.tail is not None and args.tail < 0 or args.max_events < 1 or args.max_bytes < 2:
        _fail("--tail must be 0 or more, --max-events 1 or more, --max-bytes 2 or more")
    for name in args.files:
        if name != "-" and not os.access(name, os.R_OK):
            _fail(f"cannot read {name}: {'no such file' if not os.path.exists(name) else 'permission denied'}")
    url = args.url or os.environ.get("LEITSTAND_URL", "").strip() or "http://localhost:8788"
    options = send.Options(url, token, args.outbox, args.tail, args.dry_run, args.gzip, args.max_events,
                           args.max_bytes, args.timeout, args.deadline)

    def problem(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        with _progress("send", total=None, counted="events read") as advance:
            done = send.run(args.domain, args.files, options, problem, advance)
    except outbox.OutboxError as exc:
        _fail(str(exc))
    except client.Rejected as exc:
        print(f"send: rejected ({exc}): the service refuses every request like this one, so nothing more was sent; "
              "check the token, its scope, the domain and the service's limits", file=sys.stderr)
        return 1
    handled = done.read if args.dry_run else done.stored
    rate = f", {handled / done.seconds:.0f} events/s" if done.seconds > 0 else ""
    if args.dry_run:
        print(f"send: dry run, {done.read} events read, {done.batches} requests, {done.rejected} rejected{rate}")
        return 1 if done.rejected else 0
    print(f"send: {done.stored} stored, {done.rejected} rejected, {done.pending} not delivered, "
          f"{done.seconds:.1f} s{rate}")
    if done.pending:
        where = "they stay in the outbox; run again to deliver them" if args.outbox else (
            "run again, or use --outbox DIR to keep them")
        print(f"send: service unreachable ({done.unavailable}): {done.pending} events not delivered; {where}",
              file=sys.stderr)
        return 2
    return 1 if done.rejected else 0


def _check_config(args: argparse.Namespace) -> int:
    flags = {} if args.data_dir is None else {"LEITSTAND_DATA_DIR": str(args.data_dir)}
    checkup = configcheck.check(os.environ, flags)
    width = max(len(s.env) for s in checkup.settings)
    for shown in checkup.settings:
        print(f"{shown.env:<{width}}  {shown.value}  ({shown.source})")
    for problem in checkup.problems:
        print(f"PROBLEM  {problem}")
    for note in checkup.notes:
        print(f"note     {note}")
    print(f"check-config: {len(checkup.problems)} problems, {len(checkup.notes)} notes")
    return 1 if checkup.problems else 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "verify": _verify,
    "backup": _backup,
    "restore": _restore,
    "stats": _stats,
    "rotate": _rotate,
    "tail": _tail,
    "check-config": _check_config,
    "send": _send,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes no positionals after an option has interrupted them: `send DOMAIN --tail 5 FILE`.
    if args.command == "send" and not any(arg.startswith("-") and arg != "-" for arg in extra):
        args.files += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        serve(args)
        return
    if args.command == "archive":
        archive(args)
        return
    try:
        code = _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        code = 130  # 128 + SIGINT, as a shell reports it
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say, and nothing to flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except backup.BackupError as exc:
        _fail(str(exc))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{(exc.strerror or str(exc)).lower()}{where}")
    raise SystemExit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
