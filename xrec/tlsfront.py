"""A TLS + SASL/PLAIN front end for a plaintext Kafka broker (what stunnel does, plus the
SASL handshake), in Python's ``asyncio`` and ``ssl``.

Why it exists: Tansu 0.6, the embedded broker, cannot listen with TLS (``--cert`` with
``--key`` is refused) and its ``--authentication`` offers only SCRAM against users its
memory storage cannot hold (README, Security). ``xrec dev --tls``, the benchmark's TLS
phases and ``tests/test_security.py`` put this front in front of a loopback Tansu that
advertises the front's port, so every client speaks SASL_SSL end to end.

What it does, per client connection: terminate TLS; before authentication answer
``ApiVersions`` by forwarding it, answer ``SaslHandshake`` (v0-v1: PLAIN only) and
``SaslAuthenticate`` (v0-v2) itself against a static user list, drop the connection on
anything else or a wrong password; after authentication pipe the bytes both ways unchanged
(no parsing: the per-byte cost is TLS's and the copy's). Without ``users`` it is TLS only.

Two ways to run it:

* :class:`TLSFront` — in this process, in a thread with its own event loop (tests);
* :func:`start_tls_front` — a child process (``python -m xrec.tlsfront``), tracked and
  stopped by PID like the broker, so its CPU is measured apart and it competes for no GIL
  (``xrec dev --tls``, ``bench/throughput.py --tls``). Passwords reach it in a file (mode
  600), never on its command line; it never logs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import ssl
import struct
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xrec.stack import Service

__all__ = ["TLSFront", "serve", "start_tls_front", "write_users"]

log = logging.getLogger("xrec.tlsfront")

API_SASL_HANDSHAKE, API_SASL_AUTHENTICATE, API_VERSIONS = 17, 36, 18
ERR_UNSUPPORTED_SASL_MECHANISM, ERR_SASL_AUTHENTICATION_FAILED = 33, 58


# ------------------------------------------------------------------ the Kafka bits it reads

def _skip_client_id(body: bytes) -> int:
    """Offset past the request header (api key, version, correlation id, client id)."""
    n = struct.unpack(">h", body[8:10])[0]
    return 10 + max(n, 0)


def _kstr(b: bytes, i: int) -> tuple[str, int]:
    n = struct.unpack(">h", b[i:i + 2])[0]
    return b[i + 2:i + 2 + n].decode(), i + 2 + n


def _uvarint(b: bytes, i: int) -> tuple[int, int]:
    shift = out = 0
    while True:
        x = b[i]
        i += 1
        out |= (x & 0x7F) << shift
        if not x & 0x80:
            return out, i
        shift += 7


def _enc(s: bytes) -> bytes:
    return struct.pack(">h", len(s)) + s


def _auth_bytes(body: bytes, ver: int) -> bytes:
    """The SASL bytes of a SaslAuthenticate request (``authzid\\0user\\0password``)."""
    i = _skip_client_id(body)
    if ver >= 2:  # flexible: header tagged fields, then compact bytes
        _, i = _uvarint(body, i)
        n, i = _uvarint(body, i)
        return body[i:i + n - 1]
    n = struct.unpack(">i", body[i:i + 4])[0]
    return body[i + 4:i + 4 + n]


def _handshake_response(corr: int, mechanism: str) -> bytes:
    err = 0 if mechanism == "PLAIN" else ERR_UNSUPPORTED_SASL_MECHANISM
    out = struct.pack(">ihi", corr, err, 1) + _enc(b"PLAIN")
    return struct.pack(">i", len(out)) + out


def _auth_response(corr: int, ver: int, ok: bool) -> bytes:
    err = 0 if ok else ERR_SASL_AUTHENTICATION_FAILED
    msg = b"" if ok else b"Authentication failed: invalid username or password"
    if ver >= 2:
        m = bytes([len(msg) + 1]) + msg if msg else b"\x00"
        out = struct.pack(">ib", corr, 0) + struct.pack(">h", err) + m + b"\x01" + \
            struct.pack(">q", 0) + b"\x00"
    else:
        out = struct.pack(">ih", corr, err) + (_enc(msg) if msg else struct.pack(">h", -1)) + \
            struct.pack(">i", 0) + (struct.pack(">q", 0) if ver >= 1 else b"")
    return struct.pack(">i", len(out)) + out


def check_plain(users: dict[str, str] | None, auth: bytes) -> str | None:
    """The user name when ``auth`` (SASL PLAIN's ``authzid\\0user\\0password``) matches
    ``users``, else None (constant-time comparison of the password)."""
    parts = auth.split(b"\0")
    if users is None or len(parts) != 3:
        return None
    user = parts[1].decode(errors="replace")
    want = users.get(user)
    ok = want is not None and hmac.compare_digest(want.encode(), parts[2])
    return user if ok else None


# ------------------------------------------------------------------ the server

class _BrokerSide(asyncio.Protocol):
    """The plaintext connection to the broker: bytes straight back to the client."""

    def __init__(self, front: _ClientSide) -> None:
        self.front = front

    def data_received(self, data: bytes) -> None:
        if self.front.client is not None:
            self.front.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.front.client is not None:
            self.front.client.close()

    # flow control: the broker's socket is full → stop reading the client, and back
    def pause_writing(self) -> None:
        if self.front.client is not None:
            self.front.client.pause_reading()

    def resume_writing(self) -> None:
        if self.front.client is not None:
            self.front.client.resume_reading()


class _ClientSide(asyncio.Protocol):
    """One client connection (TLS terminated by asyncio): until authenticated, request by
    request (SASL answered here, ApiVersions forwarded, anything else dropped); then every
    chunk written to the broker as it comes. Transports and callbacks, no coroutine per
    chunk: this is the front's hot path, and its CPU is what ``--tls`` costs beyond TLS."""

    def __init__(self, target: tuple[str, int], users: dict[str, str] | None) -> None:
        self.target, self.users = target, users
        self.authed = users is None
        self.buf = bytearray()  # client bytes not yet parsed (or the broker not yet there)
        self.client: asyncio.Transport | None = None
        self.broker: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            broker, _ = await loop.create_connection(lambda: _BrokerSide(self), *self.target)
        except OSError as exc:
            log.warning("broker at %s:%d unreachable: %s", *self.target, exc)
            if self.client is not None:
                self.client.close()
            return
        if self.closed:
            broker.close()
            return
        self.broker = broker
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.authed and self.broker is not None and not self.buf:
            self.broker.write(data)
            return
        self.buf += data
        self._flush()

    def _flush(self) -> None:
        if self.broker is None or self.client is None:
            return
        while not self.authed:
            if len(self.buf) < 4:
                return
            n = int.from_bytes(self.buf[:4], "big", signed=True)
            if len(self.buf) < 4 + n:
                return
            frame = bytes(self.buf[:4 + n])
            del self.buf[:4 + n]
            body = frame[4:]
            api, ver, corr = struct.unpack(">hhi", body[:8])
            if api == API_SASL_HANDSHAKE:
                self.client.write(_handshake_response(corr,
                                                      _kstr(body, _skip_client_id(body))[0]))
            elif api == API_SASL_AUTHENTICATE:
                user = check_plain(self.users, _auth_bytes(body, ver))
                self.client.write(_auth_response(corr, ver, user is not None))
                if user is None:
                    log.warning("SASL PLAIN authentication failed (connection dropped)")
                    self.buf.clear()
                    self.client.close()  # after the answer is flushed
                    return
                log.debug("SASL PLAIN: %s authenticated", user)
                self.authed = True
            elif api == API_VERSIONS:
                self.broker.write(frame)
            else:  # nothing else before authentication
                log.warning("request %d before SASL authentication: connection dropped", api)
                self.buf.clear()
                self.client.close()
                return
        if self.buf:
            self.broker.write(bytes(self.buf))
            self.buf.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.broker is not None:
            self.broker.close()

    def pause_writing(self) -> None:  # the client is slow to read: stop reading the broker
        if self.broker is not None:
            self.broker.pause_reading()

    def resume_writing(self) -> None:
        if self.broker is not None:
            self.broker.resume_reading()


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(port: int, target: int, cert: Path, key: Path,
                users: dict[str, str] | None = None, host: str = "127.0.0.1",
                target_host: str = "127.0.0.1") -> asyncio.Server:
    """Listen on ``host:port`` with TLS; forward to ``target_host:target``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _ClientSide((target_host, target), users), host,
                                    port, ssl=server_context(cert, key))


class TLSFront:
    """The front in a thread of this process: ``TLSFront(...).start()`` … ``.stop()``.
    ``users``: {name: password} for SASL/PLAIN (None: TLS only, no authentication)."""

    def __init__(self, port: int, target: int, cert: Path, key: Path,
                 users: dict[str, str] | None = None) -> None:
        self.port, self.target, self.cert, self.key, self.users = port, target, cert, key, users
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name="xrec-tlsfront")
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: asyncio.Server | None = None

    def start(self, timeout: float = 10.0) -> TLSFront:
        self.thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the TLS front did not start: {self._error}")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(
                serve(self.port, self.target, self.cert, self.key, self.users))
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        def _close() -> None:
            if self.server is not None:
                self.server.close()
            self.loop.stop()

        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(_close)
            self.thread.join(10)


# ------------------------------------------------------------------ as a child process

def write_users(path: Path, users: dict[str, str]) -> Path:
    """The user list for the child process: JSON, mode 600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(users, f)
    path.chmod(0o600)
    return path


def start_tls_front(workdir: Path, target: int, cert: Path, key: Path,
                    users: dict[str, str] | None = None, port: int | None = None) -> Service:
    """The front as a child process (``tlsfront.log`` in ``workdir``), stopped by PID with
    :meth:`~xrec.stack.Service.stop`; ``url`` is its ``127.0.0.1:port``."""
    from xrec.stack import free_port, start_listening

    port = port or free_port()
    argv = [sys.executable, "-m", "xrec.tlsfront", "--port", str(port), "--target",
            str(target), "--cert", str(cert), "--key", str(key)]
    if users is not None:
        argv += ["--users-file", str(write_users(workdir / "tlsfront-users.json", users))]
    return start_listening("tlsfront", argv, workdir, {**os.environ, "PYTHONUNBUFFERED": "1"},
                           port, "the TLS front")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m xrec.tlsfront", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="TLS port to listen on")
    ap.add_argument("--target", type=int, required=True, help="the plaintext broker's port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--cert", type=Path, required=True)
    ap.add_argument("--key", type=Path, required=True)
    ap.add_argument("--users-file", type=Path, default=None,
                    help="JSON {user: password} (SASL/PLAIN required); none: TLS only")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    users = json.loads(a.users_file.read_text()) if a.users_file else None

    async def run() -> None:
        srv = await serve(a.port, a.target, a.cert, a.key, users, host=a.host)
        log.info("TLS front on %s:%d → 127.0.0.1:%d (%s)", a.host, a.port, a.target,
                 f"SASL PLAIN, {len(users)} user(s)" if users else "TLS only")
        async with srv:
            await srv.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
