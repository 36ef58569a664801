"""The read API for services: ``GET /recs/{user_key}?platform=P[&k=N][&explain=1]`` on a
worker's web port (``XREC_WEB_PORT``), served from the Redis cache the recommend agent
writes (``recs:<platform>:<user>``, see :mod:`streams.state`).

Every worker with a web port serves it: the page only reads Redis, so any worker answers
the same. ``xrec dev`` opens the port on the recommend worker only. The page shares that
worker's event loop with the recommend agent, whose micro-batches hold the loop for
milliseconds at a time, so a request that arrives during one waits for it; ``xrec serve``
(``python -m streams.agents.api``) serves the same page from a process of its own (bare
aiohttp, nothing else on its loop) where latency matters (bench/recs_api.py measures both;
docker-compose runs it as the ``api`` service).

Responses (JSON):

* 200, the cached record as published on ``xrec.recs.<platform>``, ``items`` cut to ``k``,
  each item's ``why`` dropped unless ``explain=1``, plus ``"fallback": null``;
* 200, a known user (one whose events the worker applied) without recommendations on that
  platform (never used it, or the cache entry expired): the platform's most popular items
  less the ones the user consumed there, ``"scorer": "popular"``, ``"fallback":
  "popular"`` (with ``explain=1`` each item's ``why`` is ``{"kind": "popular",
  "platform": P}``);
* 404 ``{"error": "unknown_user", ...}``: no event of this user key was ever applied;
* 400 ``{"error": "unknown_platform" | "bad_request", ...}``: missing or unknown platform,
  ``k`` not an integer in 1..1000, ``explain`` not 0/1/true/false, an over-long key;
* 503 ``{"error": "unavailable"}``: Redis did not answer (not retried: the caller decides).

Cost: a hit is one Redis GET, then ``json.loads`` / slice / ``json.dumps`` of the cached
record (no pydantic: the record was validated when it was built). A miss costs one more
round trip (membership, the user's consumed items and the popular head, pipelined).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from streams.agents.context import STAGE_BUCKETS, Context
from streams.metrics import Histogram

__all__ = ["install", "web_app", "answer", "RecsReader", "parse_query", "ApiError", "MAX_K",
           "MAX_KEY_LEN"]

log = logging.getLogger("xrec.api")

MAX_K = 1000
MAX_KEY_LEN = 256
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ApiError(Exception):
    """A request the API answers with an error body (not a server fault)."""

    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": error, "message": message, **extra}


def parse_query(user: str, query: Mapping[str, str], platforms: Sequence[str],
                default_k: int) -> tuple[str, int, bool]:
    """``(platform, k, explain)`` from the query string, or :class:`ApiError` (400)."""
    if not user or len(user) > MAX_KEY_LEN:
        raise ApiError(400, "bad_request", f"the user key must be 1 to {MAX_KEY_LEN} "
                       "characters")
    platform = query.get("platform")
    if not platform:
        raise ApiError(400, "bad_request", "the platform query parameter is required",
                       platforms=list(platforms))
    if platform not in platforms:
        raise ApiError(400, "unknown_platform", f"no platform {platform!r} is configured",
                       platform=platform, platforms=list(platforms))
    raw_k = query.get("k")
    if raw_k is None or raw_k == "":
        k = default_k
    else:
        try:
            k = int(raw_k)
        except ValueError:
            k = 0
        if not 1 <= k <= MAX_K:
            raise ApiError(400, "bad_request", f"k must be an integer from 1 to {MAX_K}")
    ex = query.get("explain", "").lower()
    if ex not in _TRUE and ex not in _FALSE:
        raise ApiError(400, "bad_request", "explain must be 0 or 1")
    return platform, k, ex in _TRUE


class RecsReader:
    """What the page does, apart from the web framework (a ``xrec serve`` could reuse it).

    ``redis``: an async client with ``decode_responses=True``; ``prefix``: the deployment's
    Redis prefix."""

    def __init__(self, redis: Any, prefix: str, shards: int = 16,
                 half_life_s: float = 3 * 86400.0) -> None:
        from streams.keys import Keys
        from streams.state import is_cluster

        self.r = redis
        self.p = prefix
        #: Redis Cluster (``redis+cluster://``): the state's tagged names, ``shards`` =
        #: XREC_REDIS_SHARDS (:mod:`streams.keys`)
        self.keys = Keys(prefix, shards) if is_cluster(redis) else None
        self.half_life_s = half_life_s

    async def read(self, user: str, platform: str, k: int, explain: bool
                   ) -> tuple[int, dict[str, Any] | str]:
        """``(status, body)``; a 200 hit's body is already JSON text (no second encode)."""
        key = self.keys.recs(platform, user) if self.keys else f"{self.p}recs:{platform}:{user}"
        raw = await self.r.get(key)
        if raw is not None:
            return 200, _shape(raw, k, explain)
        return await self._fallback(user, platform, k, explain)

    async def _fallback(self, user: str, platform: str, k: int, explain: bool
                        ) -> tuple[int, dict[str, Any]]:
        if self.keys is not None:
            return await self._fallback_cluster(user, platform, k, explain)
        pop_key = f"{self.p}pop:{platform}"
        pipe = self.r.pipeline(transaction=False)
        pipe.sismember(f"{self.p}users", user)
        pipe.zrange(f"{self.p}u:{user}:{platform}:seen", 0, -1)
        pipe.zrevrange(pop_key, 0, k - 1, withscores=True)
        known, seen_l, top = await pipe.execute()
        if not known:
            return 404, {"error": "unknown_user", "user": user, "platform": platform,
                         "message": "no event of this user key was ever applied"}
        return await self._popular_answer(user, platform, k, explain, set(seen_l), top,
                                          pop_key)

    async def _fallback_cluster(self, user: str, platform: str, k: int, explain: bool
                                ) -> tuple[int, dict[str, Any]]:
        """On a cluster: membership and consumed items in the user's shard, the popular
        head summed over the shards."""
        from streams.state import read_merged

        keys = self.keys
        assert keys is not None
        pipe = self.r.pipeline(transaction=False)
        pipe.sismember(keys.users(keys.shard(user)), user)
        pipe.zrange(keys.u(user, platform, "seen"), 0, -1)
        known, seen_l = await pipe.execute()
        if not known:
            return 404, {"error": "unknown_user", "user": user, "platform": platform,
                         "message": "no event of this user key was ever applied"}
        seen = set(seen_l)
        top = (await read_merged(self.r, keys, [platform], [], k + len(seen), 0,
                                 self.half_life_s))[0]
        return await self._popular_answer(user, platform, k, explain, seen, top, None)

    async def _popular_answer(self, user: str, platform: str, k: int, explain: bool,
                              seen: set[str], top: Any, pop_key: str | None
                              ) -> tuple[int, dict[str, Any]]:
        items = [(i, s) for i, s in top if i not in seen]
        if pop_key is not None and len(items) < k and seen and len(top) == k:
            # consumed part of the head: go deeper
            top = await self.r.zrevrange(pop_key, 0, k + len(seen) - 1, withscores=True)
            items = [(i, s) for i, s in top if i not in seen]
        why = {"kind": "popular", "platform": platform}
        out = [{"item": i, "score": float(s), "why": why} if explain else
               {"item": i, "score": float(s)} for i, s in items[:k]]
        return 200, {"user": user, "platform": platform, "items": out, "scorer": "popular",
                     "fallback": "popular"}


def _shape(raw: str, k: int, explain: bool) -> str:
    """The cached record with items cut to ``k``, ``why`` dropped unless ``explain``."""
    rec = json.loads(raw)
    items = rec.get("items") or []
    if len(items) > k:
        items = items[:k]
    if not explain:
        items = [{f: v for f, v in it.items() if f != "why"} if "why" in it else it
                 for it in items]
    rec["items"] = items
    rec["fallback"] = None
    return _dumps(rec)  # type: ignore[no-any-return]


async def answer(reader: RecsReader, user: str, query: Mapping[str, str],
                 platforms: Sequence[str], default_k: int, on_redis_error: Any = None
                 ) -> tuple[int, str]:
    """``(status, JSON text)`` of one request, whichever web server carries it."""
    body: dict[str, Any] | str
    try:
        platform, k, explain = parse_query(user, query, platforms, default_k)
        status, body = await reader.read(user, platform, k, explain)
    except ApiError as exc:
        status, body = exc.status, exc.body
    except (RedisError, OSError) as exc:
        if on_redis_error is not None:
            on_redis_error()
        log.warning("GET /recs: redis unavailable (%s)", type(exc).__name__)
        status, body = 503, {"error": "unavailable", "message": "redis did not answer"}
    return status, body if isinstance(body, str) else _dumps(body)


def install(ctx: Context) -> None:
    """Register ``GET /recs/{user_key}`` on the worker's web server (when it has one)."""
    app = ctx.app
    reader = RecsReader(ctx.redis, ctx.settings.redis_prefix, ctx.settings.redis_shards,
                        ctx.settings.popularity_half_life_s)
    platforms = tuple(ctx.platforms)
    default_k = ctx.settings.rec_k
    latency = Histogram("xrec_api_request_ms", "GET /recs handling time in the worker "
                        "(Redis included), by status code", STAGE_BUCKETS, ["code"])
    ctx.metrics.registry.add(latency)
    redis_errors = ctx.metrics.redis_errors

    @app.page("/recs/{user_key}")
    async def recs_page(web: Any, request: Any, user_key: str) -> Any:
        """A user's cached recommendations (module docstring: the contract)."""
        t0 = time.perf_counter()
        status, text = await answer(reader, user_key, request.query, platforms, default_k,
                                    redis_errors.inc)
        latency.observe((time.perf_counter() - t0) * 1000.0, str(status))
        return web.text(text, content_type="application/json", status=status)


def web_app(redis: Any, prefix: str, platforms: Sequence[str], default_k: int,
            shards: int = 16, half_life_s: float = 3 * 86400.0) -> Any:
    """The same page on a bare aiohttp application, apart from any worker: its event loop
    runs nothing else (``python -m streams.agents.api``; bench/recs_api.py ``--serve
    standalone``)."""
    from aiohttp import web

    reader = RecsReader(redis, prefix, shards, half_life_s)
    plats = tuple(platforms)

    async def recs(request: web.Request) -> web.Response:
        status, text = await answer(reader, request.match_info["user_key"], request.query,
                                    plats, default_k)
        return web.Response(text=text, status=status, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    application = web.Application()
    application.router.add_get("/recs/{user_key}", recs)
    application.router.add_get("/healthz", healthz)
    return application


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m streams.agents.api [--port N] [--bind A]``: the read API alone, for the
    environment's Redis (``REDIS_URL``, ``XREC_REDIS_PREFIX``, ``XREC_PLATFORMS_PATH``)."""
    import argparse

    from aiohttp import web

    from streams.platforms import load_platforms
    from streams.settings import Settings
    from streams.state import redis_from_url

    ap = argparse.ArgumentParser(description="GET /recs/{user_key} from the Redis cache")
    ap.add_argument("--port", type=int, default=6067)
    ap.add_argument("--bind", default="127.0.0.1")
    a = ap.parse_args(argv)
    s = Settings()
    if not s.redis_url:
        raise SystemExit("REDIS_URL is not set")
    from streams.security import redis_url  # REDIS_SSL_*, REDIS_USERNAME / _PASSWORD

    r = redis_from_url(redis_url(s) or "", s.redis_timeout_s)
    app = web_app(r, s.redis_prefix, list(load_platforms(s.platforms_path)), s.rec_k,
                  s.redis_shards, s.popularity_half_life_s)
    web.run_app(app, host=a.bind, port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
