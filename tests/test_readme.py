"""Every example in README.md runs as written, in order, on a fresh copy of the checkout.

The rule, for whoever adds an example to the README:

- A fenced block tagged ```bash is a shell example, one tagged ```python a Python example.
  Blocks with another tag or none (```, ```mermaid, ```yaml) are text and are not run.
- The examples run in the README's order in ONE bash session (``set -euo pipefail``) in a fresh
  copy of the checkout (the files git knows, no .venv, no data), as a reader types them into one
  terminal: what one block exports or writes, the next one sees. Python blocks run there as
  ``python - <<EOF``, so with the interpreter the examples before them put on the PATH. Every
  command must succeed, and every request the examples make must be answered 2xx: the test
  reads the service's log.
- The line right before a block may mark it:
  ``<!-- example: background -->``: it is started in the background, as in a terminal of its
  own, and the next block runs once the service answers ``GET /health`` (the quickstart's
  ``./scripts/start``, with its real install);
  ``<!-- example: skip (why) -->``: it is not run. Keep these few: only what cannot run here
  (the test suite itself, production paths, a NATS cluster).
- The port 8788 is replaced by a free one in the text of the examples, and LEITSTAND_PORT is
  set to it, so that the examples do not collide with another service on the machine.
  Nothing else is changed: write examples with files they make themselves, paths inside the
  checkout, and the quickstart's token (``.leitstand-dev-token``, ``LEITSTAND_TOKEN_FILE``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, free_port, without_venv_env

_BLOCK = re.compile(r"^(?:<!-- example: (?P<mark>\w+)[^\n]*-->\n)?```(?P<tag>\w*)\n(?P<code>.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class Example:
    line: int
    tag: str
    mark: str | None
    code: str


def examples(text: str) -> list[Example]:
    """The README's fenced blocks, with their marks."""
    found = [Example(text.count("\n", 0, m.start("code")) + 1, m["tag"], m["mark"], m["code"])
             for m in _BLOCK.finditer(text)]
    unknown = {e.mark for e in found} - {None, "background", "skip"}
    assert not unknown, f"unknown marks {unknown}: use background or skip"
    return found


def script(blocks: list[Example], port: int) -> str:
    """One bash script of the examples to run, each announced with its line in the README."""
    parts = ["set -euo pipefail"]
    for block in blocks:
        code = block.code.replace("8788", str(port))
        parts.append(f"echo '--- README.md line {block.line}'")
        if block.tag == "python":
            parts.append(f"python - <<'README_PYTHON'\n{code}README_PYTHON")
        elif block.mark == "background":
            log = f"background-{block.line}.log"
            parts.append(f"( {code.strip()}\n) > {log} 2>&1 &\nbackground=$!")
            parts.append(
                f"until curl -fs -o /dev/null http://localhost:{port}/health; do\n"
                f"    kill -0 $background 2>/dev/null || {{ cat {log}; echo 'the background example ended'; exit 1; }}\n"
                "    sleep 0.2\ndone"
            )
        else:
            parts.append(code)
    return "\n".join(parts) + "\n"


def test_the_examples_are_found_and_few_are_skipped() -> None:
    found = examples((ROOT / "README.md").read_text())
    runnable = [e for e in found if e.tag in ("bash", "python") and e.mark != "skip"]
    assert runnable[0].mark == "background" and "./scripts/start" in runnable[0].code
    assert len(runnable) >= 5 and any(e.tag == "python" for e in runnable)
    assert len([e for e in found if e.mark == "skip"]) <= 4, "keep the skipped examples few"


def test_every_readme_example_runs_as_written(fresh_checkout: Path) -> None:
    blocks = [e for e in examples((fresh_checkout / "README.md").read_text())
              if e.tag in ("bash", "python") and e.mark != "skip"]
    port = free_port()
    (fresh_checkout / "readme-examples.sh").write_text(script(blocks, port))
    proc = subprocess.Popen(["bash", "readme-examples.sh"], cwd=fresh_checkout,
                            env=without_venv_env() | {"LEITSTAND_PORT": str(port)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the service the quickstart started, and anything else left
            except ProcessLookupError:
                break
            proc.wait()
    assert proc.returncode == 0, output
    service = "".join(log.read_text() for log in sorted(fresh_checkout.glob("background-*.log")))
    statuses = re.findall(r" path=(\S+) status=(\d+)", service)
    refused = [(path, status) for path, status in statuses if not status.startswith("2")]
    assert not refused, f"refused requests {refused}:\n{output}\n{service}"
    assert len([path for path, _ in statuses if path.startswith("/ingest/")]) >= 10, service
    # What the examples sent is what was stored: the README's own output line, and the orders.
    assert (fresh_checkout / "data" / "demo.jsonl").read_text().startswith('{"msg":"hello","domain":"demo"}\n')
    assert (fresh_checkout / "data" / "sensors.hall-a.jsonl").read_text().count("\n") == 6


@pytest.mark.parametrize("tag", ["bash", "python"])
def test_a_failing_example_fails_the_run(tmp_path: Path, tag: str) -> None:
    """The harness itself: a command that fails stops the session with its status."""
    failing = "false\n" if tag == "bash" else "raise SystemExit(3)\n"
    (tmp_path / "run.sh").write_text(script([Example(1, tag, None, "echo before\n"), Example(2, tag, None, failing),
                                             Example(3, "bash", None, "echo after\n")], 1))
    done = subprocess.run(["bash", "run.sh"], cwd=tmp_path, capture_output=True, text=True, check=False,
                          env={"PATH": os.environ["PATH"]})
    assert done.returncode != 0 and "after" not in done.stdout
