"""docker-compose.yml: no Docker engine here, so parse it and check what matters."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = doc["services"]
    assert set(svc) >= {"kafka", "redis", "worker"}

    k = svc["kafka"]
    assert k["image"].startswith("apache/kafka:")
    env = k["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env  # KRaft, no ZooKeeper
    assert not any("ZOOKEEPER" in key for key in env)
    assert "healthcheck" in k

    r = svc["redis"]
    cmd = " ".join(r["command"])
    assert "--appendonly yes" in cmd
    assert r["healthcheck"]["test"][-1] == "ping"

    w = svc["worker"]
    assert w["depends_on"] == {"kafka": {"condition": "service_healthy"},
                               "redis": {"condition": "service_healthy"}}
    assert w["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert w["environment"]["REDIS_URL"].startswith("redis://redis:6379")
    assert "XREC_PSEUDONYM_SECRET" in w["environment"]
    assert w["healthcheck"]["test"] == ["CMD", "xrec", "health"]
    assert "xrec worker" in " ".join(w["command"])
    assert (ROOT / "Dockerfile").is_file()


def test_compose_runs_the_trainer_apart_in_its_own_group():
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    serve, train = " ".join(svc["worker"]["command"]), " ".join(svc["trainer"]["command"])
    assert "--agents normalize,recommend,catalog" in serve and "train" not in serve
    assert "--agents train" in train
    env = svc["trainer"]["environment"]
    assert env["XREC_APP_ID"] != svc["worker"]["environment"].get("XREC_APP_ID", "xrec")
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092" and "XREC_PSEUDONYM_SECRET" in env
