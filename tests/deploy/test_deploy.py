"""The deployment recipes in deploy/: linted where a linter runs here, and checked to agree with each other.

Docker and Kubernetes cannot run on this machine, so the Dockerfile goes through hadolint, its
health check runs against the real service, and the compose file and manifests are parsed
and their references followed. The systemd unit goes through ``systemd-analyze``. The nginx
config is run for real in ``test_nginx.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from conftest import ROOT, Server
from leitstand import config

DEPLOY = ROOT / "deploy"
# One stop grace for every recipe: a drain waits for at most one fdatasync per request.
STOP_GRACE = 30


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(
            line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
        ),
    )
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.strip().partition(" ") for line in text.splitlines())
        if word
    ]


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def docker_env() -> dict[str, str]:
    pairs = (re.findall(r"(\w+)=(\S+)", args) for args in instruction("ENV"))
    return {key: value for found in pairs for key, value in found}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([hadolint, DEPLOY / "Dockerfile"], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_leitstand_serve_as_a_user_with_a_volume() -> None:
    assert re.fullmatch(r"python:3\.\d+-slim", instruction("FROM")[0])
    user = instruction("USER")[-1]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "the last USER must be a numeric non-root uid:gid"
    assert f"--uid {user.split(':')[0]}" in " ".join(instruction("RUN"))
    env = docker_env()
    assert json.loads(instruction("VOLUME")[0]) == [env["LEITSTAND_DATA_DIR"]]
    assert env["LEITSTAND_TOKEN_FILE"] == "/run/secrets/leitstand_token"
    assert instruction("EXPOSE") == [env["LEITSTAND_PORT"]]
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    cmd = json.loads(instruction("CMD")[0])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd == ["leitstand", "serve"] and cmd[0] in scripts
    for args in instruction("COPY"):
        *sources, _ = args.split()
        assert all((ROOT / source).exists() for source in sources), args


def healthcheck(port: int) -> int:
    """The image's HEALTHCHECK command, run here with this interpreter; its exit status."""
    argv = json.loads(instruction("HEALTHCHECK")[0].split(" CMD ", 1)[1])
    assert argv[0] == "python"
    return subprocess.run(
        [sys.executable, *argv[1:]], env={"LEITSTAND_PORT": str(port)}, check=False, capture_output=True, timeout=10
    ).returncode


def test_dockerfile_healthcheck_tells_a_live_service_from_a_dead_one(server: Server) -> None:
    assert healthcheck(server.port) == 0
    server.stop()
    assert healthcheck(server.port) != 0


def test_compose_references_resolve() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    env = docker_env()
    leitstand, nginx = services["leitstand"], services["nginx"]
    assert (
        DEPLOY / leitstand["build"]["context"] / leitstand["build"]["dockerfile"]
    ).resolve() == DEPLOY / "Dockerfile"
    assert "ports" not in leitstand, "only nginx is published"
    assert leitstand["stop_grace_period"] == f"{STOP_GRACE}s" and leitstand["stop_signal"] == "SIGTERM"
    # Docker mounts secret NAME at /run/secrets/NAME: the path the image reads its token from.
    assert "/run/secrets/" + leitstand["secrets"][0] == env["LEITSTAND_TOKEN_FILE"]
    volume, target = leitstand["volumes"][0].split(":")
    assert volume in compose["volumes"] and target == env["LEITSTAND_DATA_DIR"]
    for service in services.values():
        for secret in service.get("secrets", []):
            assert (DEPLOY / compose["secrets"][secret]["file"]).parent == DEPLOY / "secrets"
    assert nginx["depends_on"]["leitstand"]["condition"] == "service_healthy"
    template, mounted = nginx["volumes"][0].split(":")[:2]
    assert (DEPLOY / template).resolve() == DEPLOY / "nginx" / "leitstand.conf.template"
    assert mounted.startswith("/etc/nginx/templates/") and mounted.endswith(".conf.template")
    variables = set(re.findall(r"\$\{(\w+)\}", (DEPLOY / template).read_text()))
    assert variables == set(nginx["environment"])
    assert nginx["environment"]["NGINX_UPSTREAM"] == f"leitstand:{env['LEITSTAND_PORT']}"
    for name in ("NGINX_TLS_CERT", "NGINX_TLS_KEY"):
        assert nginx["environment"][name].removeprefix("/run/secrets/") in nginx["secrets"]
    assert "secrets/" in (DEPLOY / ".gitignore").read_text().split()


def unit() -> dict[str, list[str]]:
    """The unit's Key=value lines; a key may repeat."""
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "leitstand.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            found.setdefault(key, []).append(value)
    return found


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this venv's leitstand, nothing else changes.
    shipped = (DEPLOY / "systemd" / "leitstand.service").read_text()
    installed = shutil.which("leitstand", path=str(Path(sys.executable).parent))
    assert installed is not None
    copy = tmp_path / "leitstand.service"
    copy.write_text(shipped.replace("ExecStart=/opt/leitstand/bin/leitstand ", f"ExecStart={installed} ", 1))
    assert copy.read_text() != shipped
    result = subprocess.run(["systemd-analyze", "verify", copy], check=False, capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_unit_is_sandboxed() -> None:
    path = DEPLOY / "systemd" / "leitstand.service"
    # systemd's own rating of the sandbox, 0 (locked down) to 10 (none), in tenths.
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", path],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-400:]
    keys = unit()
    assert keys["ExecStart"] == ["/opt/leitstand/bin/leitstand serve"]
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "3",
        "TimeoutStopSec": str(STOP_GRACE),
    }.items():
        assert keys[key] == [value], key
    env = dict(value.split("=", 1) for value in keys["Environment"])
    assert keys["ReadWritePaths"] == [env["LEITSTAND_DATA_DIR"]] == ["/var/lib/" + keys["StateDirectory"][0]]
    # Rotation without a restart: the token file is read in place and SIGHUP re-reads it.
    assert env["LEITSTAND_TOKEN_FILE"] == "/etc/leitstand/tokens" and "LoadCredential" not in keys
    assert keys["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_systemd_env_file_sets_only_known_settings() -> None:
    lines = (DEPLOY / "systemd" / "leitstand.env").read_text().splitlines()
    names = [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]
    known = {setting.env for setting in config.SETTINGS} - {"LEITSTAND_TOKEN", "LEITSTAND_DATA_DIR"}
    assert names and set(names) <= known
    config.Config.from_env(
        {
            "LEITSTAND_TOKEN": "x",
            **dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")),
        }
    )


def test_kubernetes_manifests_fit_together() -> None:
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    docs = {doc["kind"]: doc for doc in (load_yaml(DEPLOY / "k8s" / name) for name in kustomization["resources"])}
    assert set(docs) == {"Deployment", "PersistentVolumeClaim", "Secret", "Service"}
    deployment, pvc, secret, service = (
        docs[kind] for kind in ("Deployment", "PersistentVolumeClaim", "Secret", "Service")
    )
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert pod["terminationGracePeriodSeconds"] == STOP_GRACE
    uid = int(instruction("USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == uid
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"http": int(docker_env()["LEITSTAND_PORT"])} and service["spec"]["ports"][0]["targetPort"] == "http"
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    env = {e["name"]: e["value"] for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts[env["LEITSTAND_DATA_DIR"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    token_dir, token_key = env["LEITSTAND_TOKEN_FILE"].rsplit("/", 1)
    assert mounts[token_dir]["secret"]["secretName"] == secret["metadata"]["name"]
    assert set(secret["stringData"]) == {token_key}
    assert "LEITSTAND_TOKEN" not in env
