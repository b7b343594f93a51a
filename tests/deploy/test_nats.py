"""The broker-mode compose recipe: three NATS nodes, two front ends, one archiver, and a NATS config that
the real nats-server accepts."""

from __future__ import annotations

import subprocess

from brokers import NATS_SERVER
from deploy.test_deploy import DEPLOY, docker_env, load_yaml

from leitstand import config


def test_compose_nats_has_a_three_node_cluster_two_front_ends_and_one_archiver() -> None:
    compose = load_yaml(DEPLOY / "compose-nats.yml")
    services = compose["services"]
    nodes = sorted(name for name in services if name.startswith("nats-"))
    assert nodes == ["nats-1", "nats-2", "nats-3"]
    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    for name in nodes:
        node = services[name]
        assert node["command"] == ["-c", "/etc/nats/nats.conf", "--name", name]
        mounted = dict(volume.split(":")[:2] for volume in node["volumes"])
        assert (DEPLOY / "nats" / "nats.conf").samefile(DEPLOY / next(k for k, v in mounted.items() if v.endswith(".conf")))
        assert mounted[name] == "/data" and name in compose["volumes"]
        assert f"nats-route://{name}:6222" in conf
    urls = ",".join(f"nats://{name}:4222" for name in nodes)
    settings = {s.env for s in config.SETTINGS}
    frontends = [services[name] for name in ("frontend-1", "frontend-2")]
    archiver = services["archiver"]
    env = docker_env()
    for service in [*frontends, archiver]:
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert set(service["environment"]) <= settings
        assert service["environment"]["LEITSTAND_NATS_URL"] == urls
        assert service["environment"]["LEITSTAND_NATS_REPLICAS"] == "3"
        assert set(service["depends_on"]) == set(nodes)
        assert service["stop_signal"] == "SIGTERM"
    for frontend in frontends:
        assert "/run/secrets/" + frontend["secrets"][0] == env["LEITSTAND_TOKEN_FILE"]
        assert "volumes" not in frontend, "front ends keep no state"
    assert len({f["ports"][0].split(":")[0] for f in frontends}) == 2
    assert archiver["command"] == ["leitstand", "archive"] and "ports" not in archiver
    assert archiver["healthcheck"] == {"disable": True}
    volume, target = archiver["volumes"][0].split(":")
    assert volume in compose["volumes"] and target == env["LEITSTAND_DATA_DIR"]


def test_nats_conf_is_accepted_by_nats_server() -> None:
    checked = subprocess.run([str(NATS_SERVER), "-c", str(DEPLOY / "nats" / "nats.conf"), "-t"],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    assert "max_payload: 8MB" in (DEPLOY / "nats" / "nats.conf").read_text()
