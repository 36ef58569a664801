"""Read recommendations and item metadata from the Redis cache (what services call)."""

from __future__ import annotations

import json

import redis

from streams.records import Recommendations

__all__ = ["RecsCache"]


class RecsCache:
    def __init__(self, url: str, prefix: str = "xrec:") -> None:
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        self.p = prefix

    def recs(self, platform: str, user: str) -> Recommendations | None:
        raw = self.r.get(f"{self.p}recs:{platform}:{user}")
        return Recommendations.model_validate_json(raw) if raw else None

    def title(self, platform: str, item: str) -> str | None:
        raw = self.r.hget(f"{self.p}item:{platform}:{item}", "text")
        return raw.split(". ")[0] if raw else None

    def item_fields(self, platform: str, item: str) -> dict | None:  # type: ignore[type-arg]
        raw = self.r.hget(f"{self.p}item:{platform}:{item}", "fields")
        return json.loads(raw) if raw else None

    def stats(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(f"{self.p}stats").items()}

    def head_swaps(self, n: int = 1000) -> list[dict]:  # type: ignore[type-arg]
        """Recent head-version swaps by recommenders, newest first."""
        return [json.loads(x) for x in self.r.lrange(f"{self.p}heads:swaps", 0, n - 1)]

    def head_version(self) -> int:
        return int(self.r.get(f"{self.p}heads:version") or 0)

    def users(self) -> int:
        return int(self.r.scard(f"{self.p}users"))

    def close(self) -> None:
        self.r.close()
