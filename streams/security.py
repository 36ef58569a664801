"""Transport security: TLS and authentication for every Kafka and Redis client xrec builds.

One place turns :class:`~streams.settings.Settings` into what each client library wants:

* :func:`faust_credentials` — ``broker_credentials`` for the worker's ``faust.App``;
* :func:`kafka_kwargs` — kafka-python (``KafkaProducer`` / ``KafkaConsumer`` /
  ``KafkaAdminClient``: replay, catalog, tail, report, topic creation, ``xrec dev``);
* :func:`aiokafka_kwargs` — aiokafka clients, should one be built directly;
* :func:`redis_url` / :func:`redis_kwargs` — every Redis client (``rediss://`` with a CA
  file, a client certificate, ACL user and password).

Why pre-flight checks (:func:`check_kafka`, :func:`check_redis`): a wrong password or an
untrusted certificate otherwise shows as a client retrying quietly for 30 s or forever
(kafka-python logs a warning per retry and raises "Unable to bootstrap"; a plaintext client
on a TLS port waits for an answer that never comes). The checks connect once, with a short
timeout, and raise :class:`~streams.errors.StackError` naming the cause ("Kafka
authentication failed for user alice (SASL SCRAM-SHA-256)", "TLS: certificate verify failed
for 127.0.0.1:9093 (CA file /etc/xrec/ca.pem)").

Secrets: passwords are :class:`pydantic.SecretStr` in the settings and only unwrapped into
the keyword arguments handed to a client; :func:`redact_url` is what may be printed of a
URL. Nothing here logs a password, a URL with a password, or a client's kwargs.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from streams.errors import ConfigError, StackError

if TYPE_CHECKING:
    from streams.settings import Settings

__all__ = ["PROTOCOLS", "MECHANISMS", "ssl_context", "kafka_kwargs", "aiokafka_kwargs",
           "faust_credentials", "redis_url", "redis_kwargs", "redact_url", "check_kafka",
           "check_redis", "secrets_of", "redact_logs"]

log = logging.getLogger("xrec.security")

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_REDIS_TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


# ------------------------------------------------------------------------------ Kafka

def _protocol(settings: Settings) -> str:
    p = (settings.kafka_security_protocol or "PLAINTEXT").upper()
    if p not in PROTOCOLS:
        raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={p!r}; choose from {', '.join(PROTOCOLS)}")
    return p


def _uses_tls(settings: Settings) -> bool:
    return _protocol(settings) in ("SSL", "SASL_SSL")


def _uses_sasl(settings: Settings) -> bool:
    return _protocol(settings) in ("SASL_PLAINTEXT", "SASL_SSL")


def _readable(path: str, name: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{name}={path}: cannot read it ({exc.strerror})") from None
    return path


def ssl_context(cafile: str | None = None, certfile: str | None = None,
                keyfile: str | None = None, what: str = "KAFKA") -> ssl.SSLContext:
    """A client TLS context that verifies the server (hostname included) against
    ``cafile`` (else the system's trust store) and presents ``certfile``/``keyfile`` when
    given (mutual TLS)."""
    if cafile:
        _readable(cafile, f"{what}_SSL_CAFILE")
    try:
        ctx = ssl.create_default_context(cafile=cafile or None)
    except ssl.SSLError as exc:
        raise ConfigError(f"{what}_SSL_CAFILE={cafile}: not a PEM CA bundle ({exc})") from None
    if certfile or keyfile:
        if not certfile:
            raise ConfigError(f"{what}_SSL_KEYFILE is set without {what}_SSL_CERTFILE")
        _readable(certfile, f"{what}_SSL_CERTFILE")
        if keyfile:
            _readable(keyfile, f"{what}_SSL_KEYFILE")
        try:
            ctx.load_cert_chain(certfile, keyfile or None)
        except ssl.SSLError as exc:
            raise ConfigError(f"{what}_SSL_CERTFILE / {what}_SSL_KEYFILE: cannot load the "
                              f"client certificate ({exc.reason or exc})") from None
    return ctx


def _kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    return ssl_context(settings.kafka_ssl_cafile, settings.kafka_ssl_certfile,
                       settings.kafka_ssl_keyfile)


def _sasl(settings: Settings) -> tuple[str, str, str]:
    mech = (settings.kafka_sasl_mechanism or "PLAIN").upper()
    if mech not in MECHANISMS:
        raise ConfigError(f"KAFKA_SASL_MECHANISM={mech!r}; choose from {', '.join(MECHANISMS)}")
    user = settings.kafka_sasl_username
    pw = settings.kafka_sasl_password
    if not user or pw is None:
        raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={_protocol(settings)} needs "
                          "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
    return mech, user, pw.get_secret_value()


def kafka_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for kafka-python's clients; ``{}`` for PLAINTEXT (the default),
    so existing call sites behave exactly as before."""
    proto = _protocol(settings)
    if proto == "PLAINTEXT":
        return {}
    kw: dict[str, Any] = {"security_protocol": proto}
    if _uses_tls(settings):
        kw["ssl_context"] = _kafka_ssl_context(settings)
    if _uses_sasl(settings):
        mech, user, pw = _sasl(settings)
        kw.update(sasl_mechanism=mech, sasl_plain_username=user, sasl_plain_password=pw)
    return kw


def aiokafka_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiokafka's clients (same names as kafka-python's; aiokafka
    needs an ``ssl_context``, which :func:`kafka_kwargs` already gives)."""
    return kafka_kwargs(settings)


def faust_credentials(settings: Settings) -> Any:
    """``broker_credentials`` for ``faust.App``: None (PLAINTEXT), ``faust.SSLCredentials``
    or ``faust.SASLCredentials`` (with an SSL context for SASL_SSL)."""
    import faust

    proto = _protocol(settings)
    if proto == "PLAINTEXT":
        return None
    if proto == "SSL":
        return faust.SSLCredentials(_kafka_ssl_context(settings))
    mech, user, pw = _sasl(settings)
    return faust.SASLCredentials(
        username=user, password=pw, mechanism=mech,
        ssl_context=_kafka_ssl_context(settings) if proto == "SASL_SSL" else None)


def _servers(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for hp in filter(None, (b.strip() for b in bootstrap.split(","))):
        hp = hp.split("://", 1)[-1]
        host, _, port = hp.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"KAFKA_BOOTSTRAP_SERVERS: {hp!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is empty")
    return out


def _tls_probe(host: str, port: int, ctx: ssl.SSLContext, timeout: float, cafile: str | None,
               what: str, env: str) -> None:
    """Connect and complete a TLS handshake, or raise StackError saying why not."""
    where = f"{host}:{port}"
    ca = f"CA file {cafile}" if cafile else "the system's trusted CAs"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise StackError(f"cannot reach {what} at {where}: {exc.strerror or exc}") from None
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as exc:
        raise StackError(f"TLS: certificate verify failed for {where} ({ca}): "
                         f"{exc.verify_message}. Point {env}_SSL_CAFILE at the CA that "
                         "signed the server's certificate") from None
    except TimeoutError:
        raise StackError(f"TLS: no TLS handshake from {where} within {timeout:.0f}s: does "
                         f"{what} listen with TLS on this port?") from None
    except ssl.SSLError as exc:
        hint = (f"{what} asked for a client certificate ({env}_SSL_CERTFILE / "
                f"{env}_SSL_KEYFILE)" if "CERTIFICATE_REQUIRED" in str(exc) or
                "alert" in str(exc).lower() and "certificate" in str(exc).lower()
                else f"is it a TLS port of {what}?")
        raise StackError(f"TLS: handshake with {where} failed ({exc.reason or exc}): "
                         f"{hint}") from None
    except OSError as exc:  # reset / closed during the handshake
        raise StackError(f"TLS: {where} closed the connection during the TLS handshake "
                         f"({exc.strerror or exc}): is it a TLS port of {what}?") from None
    finally:
        sock.close()


class _Capture(logging.Handler):
    """Collects the exceptions kafka-python logs while it retries its bootstrap."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.errors += [a for a in args if isinstance(a, BaseException)]
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _quiet_kafka_log() -> Iterator[_Capture]:
    lg = logging.getLogger("kafka")
    cap = _Capture()
    old = lg.propagate, lg.level
    lg.addHandler(cap)
    lg.propagate = False  # its retry warnings would repeat what our one message says
    if lg.getEffectiveLevel() > logging.WARNING:
        lg.setLevel(logging.WARNING)
    try:
        yield cap
    finally:
        lg.removeHandler(cap)
        lg.propagate, lg.level = old[0], old[1]


def _kafka_cause(errors: list[BaseException], settings: Settings, bootstrap: str,
                 timeout: float) -> str:
    import kafka.errors as ke

    proto = _protocol(settings)
    errors = [e for e in errors if type(e).__name__ != "KafkaTimeoutError"]  # "Unable to
    names = [type(e).__name__ for e in errors]                             # bootstrap"
    text = "; ".join(dict.fromkeys(str(e) for e in errors))[:300]
    if _uses_sasl(settings):
        mech, user, _ = _sasl(settings)
        if any(isinstance(e, ke.UnsupportedSaslMechanismError) for e in errors) or \
                "not enabled" in text or "NoSharedMechanism" in text:
            return (f"Kafka authentication failed: the broker at {bootstrap} does not offer "
                    f"SASL {mech} ({text}); set KAFKA_SASL_MECHANISM to one it offers")
        if any(isinstance(e, (ke.SaslAuthenticationFailedError, KeyError))
               for e in errors) or "uthenticat" in text:
            # KeyError('v'): kafka-python's SCRAM client on a server-final message that
            # carries an error instead of the server signature (unknown user / bad password)
            return (f"Kafka authentication failed for user {user} (SASL {mech}) at "
                    f"{bootstrap}: wrong user name or password? (KAFKA_SASL_USERNAME, "
                    "KAFKA_SASL_PASSWORD)")
        if any(isinstance(e, ke.KafkaConnectionError) for e in errors):
            return (f"Kafka authentication failed for user {user} (SASL {mech}) at "
                    f"{bootstrap}: the broker closed the connection during authentication "
                    "(wrong password, or a mechanism it does not offer)")
    sasl_hint = (f"does it require authentication (KAFKA_SECURITY_PROTOCOL="
                 f"SASL_{'SSL' if proto == 'SSL' else 'PLAINTEXT'})?")
    if errors and not _uses_sasl(settings) and \
            all(isinstance(e, ke.KafkaConnectionError) for e in errors):
        return (f"the Kafka broker at {bootstrap} closed the connection ({proto}: {text}): "
                f"{sasl_hint}")
    if errors:
        return f"cannot connect to the Kafka broker at {bootstrap} ({proto}): {text}"
    if proto in ("PLAINTEXT", "SSL"):
        return (f"no answer from the Kafka broker at {bootstrap} within {timeout:.0f}s "
                f"({proto}): {sasl_hint[:-1]} or TLS (SSL)?")
    return (f"no answer from the Kafka broker at {bootstrap} within {timeout:.0f}s ({proto}: "
            f"{', '.join(names) or 'no error reported'})")


def check_kafka(settings: Settings, timeout_s: float = 5.0) -> None:
    """Pre-flight: reach the broker, complete TLS (when configured) and authenticate,
    within ``timeout_s`` per step; raises :class:`StackError` naming the cause. Cheap
    (one connection, one metadata request): call it where a command or worker starts."""
    bootstrap = settings.kafka_bootstrap_servers
    if not bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set (or run `xrec dev`)")
    kw = kafka_kwargs(settings)  # validates the settings (ConfigError) before connecting
    last: StackError | None = None
    for host, port in _servers(bootstrap):  # one that answers is enough, as for the clients
        try:
            if _uses_tls(settings):
                _tls_probe(host, port, kw["ssl_context"], timeout_s,
                           settings.kafka_ssl_cafile, "the Kafka broker", "KAFKA")
            else:
                with socket.create_connection((host, port), timeout=timeout_s):
                    pass
            last = None
            break
        except StackError as exc:
            last = exc
        except OSError as exc:
            last = StackError(f"cannot reach the Kafka broker at {host}:{port}: "
                              f"{exc.strerror or exc}")
    if last is not None:
        raise last
    from kafka import KafkaAdminClient

    t0 = time.monotonic()
    with _quiet_kafka_log() as cap:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="xrec-preflight",
                                     request_timeout_ms=int(timeout_s * 1000),
                                     bootstrap_timeout_ms=int(timeout_s * 1000), **kw)
        except Exception as exc:  # noqa: BLE001 - mapped to one clear message below
            errors = [*cap.errors, exc] if not type(exc).__name__ == "KafkaTimeoutError" \
                else cap.errors
            raise StackError(_kafka_cause(errors, settings, bootstrap, timeout_s)) from None
        with contextlib.suppress(Exception):
            admin.close()
    log.debug("Kafka pre-flight %s ok in %.2fs", _protocol(settings), time.monotonic() - t0)


# ------------------------------------------------------------------------------ Redis

def redis_url(settings: Settings) -> str | None:
    """``REDIS_URL`` with the TLS and ACL settings folded in, so every Redis client built
    from it (redis-py's ``from_url``, sync or asyncio, and :func:`streams.state.
    redis_from_url` for clusters) gets them: ``REDIS_SSL_*`` become the query parameters
    redis-py reads (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs=
    required``) on ``rediss://`` URLs; ``REDIS_USERNAME`` / ``REDIS_PASSWORD`` fill the
    URL's user part when it has none (a user and password written in the URL win). The
    result holds the password: print it only through :func:`redact_url`."""
    url = settings.redis_url
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    pw = settings.redis_password.get_secret_value() if settings.redis_password else ""
    if "@" not in netloc and (pw or settings.redis_username):
        cred = quote(settings.redis_username or "", safe="")
        netloc = f"{cred}{':' + quote(pw, safe='') if pw else ''}@{netloc}"
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if parts.scheme.startswith("rediss"):
        for key, val in (("ssl_ca_certs", settings.redis_ssl_cafile),
                         ("ssl_certfile", settings.redis_ssl_certfile),
                         ("ssl_keyfile", settings.redis_ssl_keyfile)):
            if val:
                query.setdefault(key, _readable(val, "REDIS_" + key.upper()
                                                .replace("SSL_CA_CERTS", "SSL_CAFILE")))
        query.setdefault("ssl_cert_reqs", "required")
    elif settings.redis_ssl_cafile or settings.redis_ssl_certfile:
        raise ConfigError("REDIS_SSL_CAFILE / REDIS_SSL_CERTFILE are set but REDIS_URL is not "
                          "a rediss:// URL: write rediss:// to use TLS")
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def redis_kwargs(url: str) -> dict[str, Any]:
    """The TLS keyword arguments a ``rediss://`` or ``rediss+cluster://`` URL's query asks
    for (see :func:`redis_url`), for clients that do not read the query themselves
    (``RedisCluster(startup_nodes=...)``)."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("rediss"):
        return {}
    q = dict(parse_qsl(parts.query))
    kw: dict[str, Any] = {k: q[k] for k in _REDIS_TLS_QUERY if q.get(k)}
    kw.setdefault("ssl_cert_reqs", "required")
    return kw


def redact_url(url: str | None) -> str:
    """``url`` with the password (and the query) replaced: safe to print and log."""
    if not url:
        return ""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        user, sep, _ = cred.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


def _redis_target(url: str) -> tuple[str, dict[str, Any]]:
    """A plain redis(s):// URL for the first node and its TLS kwargs (clusters: the check
    pings the first seed node with the same credentials)."""
    from streams.state import is_cluster_url

    if not is_cluster_url(url):
        return url, {}
    scheme, rest = url.split("://", 1)
    netloc, _, tail = rest.partition("/")
    cred, _, hosts = netloc.rpartition("@")
    first = hosts.split(",")[0]
    query = tail.partition("?")[2] or rest.partition("?")[2]
    single = f"{scheme.split('+')[0]}://{cred + '@' if cred else ''}{first}/0"
    return single + (f"?{query}" if query else ""), {}


def check_redis(url: str, timeout_s: float = 5.0) -> None:
    """Pre-flight: PING Redis at ``url`` (as :func:`redis_url` gave it) within
    ``timeout_s``; raises :class:`StackError` naming the cause (unreachable, TLS, auth)."""
    import redis as redis_sync

    target, extra = _redis_target(url)
    parts = urlsplit(target)
    where = f"{parts.hostname}:{parts.port or 6379}" if parts.scheme != "unix" else parts.path
    user = unquote(parts.username) if parts.username else "default"
    tls = parts.scheme == "rediss"
    ca = dict(parse_qsl(parts.query)).get("ssl_ca_certs")
    ca_txt = f"CA file {ca}" if ca else "the system's trusted CAs"
    r = redis_sync.Redis.from_url(target, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s, retry_on_timeout=False,
                                  **extra)
    try:
        r.ping()
    except redis_sync.exceptions.AuthenticationError as exc:
        # no password given: "NOAUTH ..." or, Redis 7, "HELLO must be called with the
        # client already authenticated"
        if not parts.password and any(w in str(exc) for w in ("NOAUTH", "required",
                                                                "already authenticated")):
            raise StackError(f"Redis at {where} requires a password: set REDIS_PASSWORD (and "
                             "REDIS_USERNAME for an ACL user) or put them in REDIS_URL"
                             ) from None
        raise StackError(f"Redis authentication failed for user {user} at {where}: wrong user "
                         "name or password? (REDIS_USERNAME / REDIS_PASSWORD, or "
                         "rediss://user:password@host:port/0)") from None
    except redis_sync.exceptions.ResponseError as exc:
        msg = str(exc)
        if "NOAUTH" in msg or "Authentication required" in msg:
            raise StackError(f"Redis at {where} requires a password: set REDIS_PASSWORD (and "
                             "REDIS_USERNAME for an ACL user) or put them in REDIS_URL"
                             ) from None
        if "NOPERM" in msg:
            raise StackError(f"Redis user {user} at {where} may not run PING: give the ACL "
                             "user the commands xrec needs (README, Security)") from None
        raise StackError(f"Redis at {where} refused PING: {msg}") from None
    except redis_sync.exceptions.TimeoutError:
        hint = ("does it listen with TLS on this port?" if tls else
                "is it a TLS port (then use rediss://)?")
        raise StackError(f"no answer from Redis at {where} within {timeout_s:.0f}s: {hint}"
                         ) from None
    except redis_sync.exceptions.ConnectionError as exc:
        msg = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in msg or "certificate verify failed" in msg:
            reason = msg.split("certificate verify failed:", 1)[-1].split("(")[0].strip()
            raise StackError(f"TLS: certificate verify failed for {where} ({ca_txt}): "
                             f"{reason or msg}. Point REDIS_SSL_CAFILE at the CA that signed "
                             "the server's certificate") from None
        if tls and any(w in msg.lower() for w in ("ssl", "closed by server", "reset", "eof")):
            raise StackError(f"TLS: handshake with Redis at {where} failed ({msg}): is it "
                             "a TLS port (tls-port), and does it want a client certificate "
                             "(REDIS_SSL_CERTFILE / REDIS_SSL_KEYFILE)?") from None
        if not tls and ("Connection reset" in msg or "closed by server" in msg):
            raise StackError(f"Redis at {where} closed the connection: is it a TLS port "
                             "(then use rediss://)?") from None
        raise StackError(f"cannot reach Redis at {where}: {msg}") from None
    finally:
        r.close()


_SECRETS: set[str] = set()


def redact_logs(settings: Settings) -> None:
    """Keep the secrets in ``settings`` out of every log record of this process, whatever
    logger or handler: kafka-python at DEBUG prints its configuration (passwords included)
    and the bytes of each request (SASL/PLAIN's included). Records are scrubbed where they
    are made (``logging.setLogRecordFactory``), so handlers added later (Faust's) are
    covered too; only records that are emitted pay for it."""
    new = {v for v in secrets_of(settings) if len(v) >= 4} - _SECRETS
    if not new:
        return
    forms = set()
    for v in new:  # as written, as repr() escapes it, as a URL carries it
        forms |= {v, repr(v)[1:-1], repr(v.encode())[2:-1], quote(v, safe="")}
    first = not _SECRETS
    _SECRETS.update(forms)
    if not first:
        return
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = make(*args, **kwargs)
        try:
            text = rec.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the handler's problem
            return rec
        if any(v in text for v in _SECRETS):
            for v in sorted(_SECRETS, key=len, reverse=True):
                text = text.replace(v, "***")
            rec.msg, rec.args = text, None
        return rec

    logging.setLogRecordFactory(factory)


def secrets_of(settings: Settings) -> list[str]:
    """The secret values in ``settings`` (for tests and log filters that must not see them)."""
    out = []
    for v in (settings.kafka_sasl_password, settings.redis_password):
        if v is not None and v.get_secret_value():
            out.append(v.get_secret_value())
    pw = urlsplit(settings.redis_url or "").password
    if pw:
        out.append(unquote(pw))
    return out
