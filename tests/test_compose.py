"""docker-compose.yml: no Docker engine here, so parse it and check what matters."""

import json
import re
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


# ------------------------------------------------------------ Prometheus and Grafana

def _services():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _mounts(svc):
    """host path (relative to the repository) → container path, of the bind mounts"""
    out = {}
    for v in svc.get("volumes", []):
        host, _, rest = v.partition(":")
        if host.startswith("./"):
            out[host[2:]] = rest.split(":")[0]
    return out


def test_prometheus_scrapes_every_worker_on_its_web_port():
    svc = _services()
    prom = svc["prometheus"]
    assert prom["image"].startswith("prom/prometheus:")
    config = _mounts(prom)["deploy/prometheus/prometheus.yml"]
    assert f"--config.file={config}" in prom["command"]
    doc = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {}
    for job in doc["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                targets[name] = sd["port"]
    for name in ("worker", "trainer"):  # each serves /metrics on XREC_WEB_PORT
        env = svc[name]["environment"]
        assert env["XREC_WEB_BIND"] == "0.0.0.0"
        assert targets[name] == int(env["XREC_WEB_PORT"]) > 0
    assert set(targets) <= set(svc)


def test_grafana_provisions_the_datasource_and_the_dashboard():
    svc = _services()
    graf = svc["grafana"]
    assert graf["image"].startswith("grafana/grafana:")
    mounts = _mounts(graf)
    prov, dash_dir = mounts["deploy/grafana/provisioning"], mounts["deploy/grafana/dashboards"]
    assert prov == "/etc/grafana/provisioning"
    ds_files = list((ROOT / "deploy/grafana/provisioning/datasources").glob("*.yml"))
    (ds,) = [d for f in ds_files for d in yaml.safe_load(f.read_text())["datasources"]]
    assert ds["type"] == "prometheus"
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host in svc and f"127.0.0.1:{port}:{port}" in svc[host]["ports"]
    (provider,) = yaml.safe_load(next(
        (ROOT / "deploy/grafana/provisioning/dashboards").glob("*.yml")).read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dash_dir
    dash = json.loads((ROOT / "deploy/grafana/dashboards/xrec.json").read_text())
    assert graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == \
        f"{dash_dir}/xrec.json"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == ds["uid"]
        assert all(t["datasource"]["uid"] == ds["uid"] for t in p["targets"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def _exported():
    """Series names a worker exports, from its own registry: name → metric type."""
    from prometheus_client.parser import text_string_to_metric_families

    from streams.agents.context import WorkerMetrics

    out = {}
    for fam in text_string_to_metric_families(WorkerMetrics().registry.render()):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("_sum", "_count", "")}.get(fam.type, ("",))
        for s in suffixes:
            out[fam.name + s] = fam.type
    return out


def test_the_dashboard_only_queries_what_the_worker_exports():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/xrec.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    exported = _exported()
    used = set()
    for e in exprs:
        names = set(re.findall(r"\b(?:xrec|process)_[a-z0-9_]+", e))
        assert names, e
        assert names <= set(exported), (e, names - set(exported))
        used |= names
        for fn, name in re.findall(r"\b(rate|increase|histogram_quantile)\(.*?\b"
                                   r"((?:xrec|process)_[a-z0-9_]+)", e):
            # over counters and histogram series only; quantiles from the buckets
            assert exported[name] in ("counter", "histogram"), (fn, name)
            if fn == "histogram_quantile":
                assert name.endswith("_bucket"), e
    # the report's views: quality, drift, latency, heads, dead letters, throughput
    for name in ("xrec_quality_recall_at_10", "xrec_quality_ndcg_at_10",
                 "xrec_drift_signals_total", "xrec_drift_value",
                 "xrec_event_to_recs_latency_ms_bucket", "xrec_head_version",
                 "xrec_head_version_published", "xrec_head_used_after_seconds_bucket",
                 "xrec_head_event_to_publish_seconds_bucket", "xrec_train_loss",
                 "xrec_deadlettered_total", "xrec_events_in_total",
                 "xrec_recommendations_total"):
        assert name in used, name


def test_compose_serves_the_read_api_apart():
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    api = svc["api"]
    assert api["command"][:2] == ["xrec", "serve"] and "0.0.0.0" in api["command"]
    port = api["command"][api["command"].index("--port") + 1]
    assert any(str(p).endswith(f":{port}:{port}") for p in api["ports"])
    assert api["environment"]["REDIS_URL"] == svc["worker"]["environment"]["REDIS_URL"]
    assert f":{port}/healthz" in " ".join(api["healthcheck"]["test"])


def test_the_worker_scales_in_one_group_over_enough_partitions():
    """`docker compose up --scale worker=3` works by construction: the replicas carry no
    fixed name or host port (they would clash), share one consumer group, and the topics
    get at least as many partitions as workers (a worker beyond that gets none)."""
    svc = _services()
    w = svc["worker"]
    assert "container_name" not in w and "hostname" not in w
    # host ports: none fixed ("8080:80" or "127.0.0.1:8080:80"); container-only is fine
    assert all(str(p).count(":") == 0 for p in w.get("ports", []))
    env = w["environment"]
    assert env.get("XREC_APP_ID", "xrec") == "xrec"  # every replica in the one group
    # at least, and a multiple of, the README's example scale: Faust's sticky assignor gives
    # a worker at most ceil(partitions / workers), so 4 over 3 workers can be 2 / 2 / 0
    assert int(env["XREC_PARTITIONS"]) >= 3 and int(env["XREC_PARTITIONS"]) % 3 == 0
    # `xrec topics` (the worker's command) creates the topics with XREC_PARTITIONS
    assert " ".join(w["command"]).count("xrec topics") == 1
    from streams.settings import Settings

    assert Settings(partitions=env["XREC_PARTITIONS"]).partitions == int(env["XREC_PARTITIONS"])
    # every service reads the same count (the anchor): no worker sees fewer partitions
    for name in ("trainer", "api"):
        assert svc[name]["environment"]["XREC_PARTITIONS"] == env["XREC_PARTITIONS"]
    # Prometheus finds each replica by DNS, not by a fixed target
    doc = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    names = {n for job in doc["scrape_configs"] for sd in job.get("dns_sd_configs", [])
             for n in sd["names"]}
    assert "worker" in names
