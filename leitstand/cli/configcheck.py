"""check-config: the settings the service would run with, and what would keep it from running well.

It changes nothing but what the server's own start-up probe does (a file written, synced
and removed in the data dir), and it never creates the data dir.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from leitstand import config
from leitstand.cli import verify
from leitstand.storage import datadir, journal
from leitstand.storage.datadir import Kind

REDACTED = "<redacted>"


@dataclass(frozen=True)
class Shown:
    env: str
    value: str
    source: str


@dataclass
class Checkup:
    settings: list[Shown] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # What needs a look but keeps nothing from running well (a crash's leftovers).
    notes: list[str] = field(default_factory=list)


def check(environ: Mapping[str, str], flags: Mapping[str, str] | None = None) -> Checkup:
    """``flags``: settings given on the command line, by variable name; they win over ``environ``."""
    flags = flags or {}
    checkup = Checkup([_shown(s, environ, flags) for s in config.SETTINGS])
    environ = {**environ, **flags}
    settings = _settings(environ, checkup.problems)
    data_dir = Path(config.raw_value(environ, "LEITSTAND_DATA_DIR"))
    checkup.problems += _data_dir_problems(data_dir, settings)
    if data_dir.is_dir():
        checkup.notes += [f"{entry.name} in the data dir: {verify.SET_ASIDE}: look at it, then delete it or move it away"
                          for entry in datadir.scan(data_dir) if entry.kind is Kind.TORN]
    return checkup


def _shown(setting: config.Setting, environ: Mapping[str, str], flags: Mapping[str, str]) -> Shown:
    """The value and where it came from: ``flag --name``, ``env``, ``file`` (the tokens of
    LEITSTAND_TOKEN_FILE) or ``default``."""
    flag = setting.env in flags
    raw = (flags[setting.env] if flag else environ.get(setting.env, "")).strip()
    source = f"flag {setting.flag}" if flag else "env" if raw else "default"
    if setting.env == "LEITSTAND_TOKEN":
        # The tokens in force: this variable's, and those of LEITSTAND_TOKEN_FILE.
        token_file = environ.get("LEITSTAND_TOKEN_FILE", "").strip()
        sources = [name for name, given in (("env", raw), ("file", token_file)) if given]
        return Shown(setting.env, REDACTED if sources else "(not set)", " and ".join(sources) or "default")
    if "TOKEN" in setting.env:
        return Shown(setting.env, REDACTED if raw else "(not set)", source)
    if setting.env == "LEITSTAND_NATS_URL":
        # nats://user:password@host: the credentials are as secret as a token.
        raw = re.sub(r"//[^/@,]*@", f"//{REDACTED}@", raw)
    return Shown(setting.env, raw or setting.default, source)


def _settings(environ: Mapping[str, str], problems: list[str]) -> config.Config | None:
    """The parsed settings; a missing token is reported, and the rest still checked with a stand-in."""
    for env in (environ, {**environ, "LEITSTAND_TOKEN": "stand-in"}):
        try:
            settings = config.Config.from_env(env)
        except config.ConfigError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
            continue
        try:
            config.check_files(settings)
        except config.ConfigError as exc:
            problems.append(str(exc))
        return settings
    return None


def _data_dir_problems(data_dir: Path, settings: config.Config | None) -> list[str]:
    if not data_dir.exists():
        parent = next(p for p in data_dir.absolute().parents if p.exists())
        if not os.access(parent, os.W_OK | os.X_OK):
            return [f"LEITSTAND_DATA_DIR {data_dir} does not exist and cannot be created: {parent} is not writable"]
        return _free_space_problems(parent, settings)
    try:
        journal.probe(data_dir)
    except OSError as exc:
        return [f"LEITSTAND_DATA_DIR {data_dir} is not usable: {journal.reason(exc)}"]
    problems = _free_space_problems(data_dir, settings)
    if os.stat(data_dir).st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"data dir {data_dir} is writable by group or others: chmod go-w it")
    for entry in datadir.scan(data_dir):
        problems += _entry_problems(data_dir, entry)
    return problems


def _free_space_problems(directory: Path, settings: config.Config | None) -> list[str]:
    if settings is None:
        return []
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < settings.ready_min_free:
        limit = settings.ready_min_free
        return [f"only {free} bytes free in the data dir, below LEITSTAND_READY_MIN_FREE ({limit}): free space"]
    return []


def _entry_problems(data_dir: Path, entry: datadir.Entry) -> list[str]:
    if entry.kind is Kind.STRAY:
        return [f"stray file {entry.name} in the data dir: move it out"]
    if entry.kind in (Kind.TORN, Kind.PROBE):
        return []
    path = data_dir / entry.name
    if not os.access(path, os.R_OK | os.W_OK):
        return [f"{entry.name} is not readable and writable by this user: fix its owner or mode"]
    if os.lstat(path).st_mode & stat.S_IWOTH:
        return [f"{entry.name} is writable by others: chmod o-w it"]
    return []
