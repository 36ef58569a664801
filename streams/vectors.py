"""Item vectors in Redis, namespaced by encoder id, and the per-platform in-memory index.

Redis (binary values)::

    vec:<encoder id>:<platform>      hash  item → float16 little-endian bytes (dim × 2 bytes)
    vecver:<encoder id>:<platform>   int   bumped on every write; workers reload when it moves

A model or backend change gives a new encoder id, so vectors of two spaces never mix.
Items whose text is unusable (no letters or digits) get no vector: they are flagged
``notext`` on ``item:<platform>:<item>`` and are reachable only through popularity and
co-occurrence (and, later, learned id embeddings), never through text similarity.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import redis

from models.index import ItemIndex
from streams.state import is_cluster, redis_from_url

__all__ = ["VectorStore", "usable_text", "pack", "unpack", "load_index_sync"]

_WORD = re.compile(r"\w", re.UNICODE)


def usable_text(text: str) -> bool:
    return len(_WORD.findall(text or "")) >= 2


def pack(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<f2").tobytes()


def unpack(b: bytes, dim: int) -> np.ndarray:
    return np.frombuffer(b, dtype="<f2", count=dim).astype(np.float32)


class VectorStore:
    def __init__(self, url: str, prefix: str, encoder_id: str, dim: int,
                 timeout_s: float | None = None) -> None:
        self.r = redis_from_url(url, timeout_s, decode=False)
        self.p = prefix
        self.encoder_id = encoder_id
        self.dim = dim
        self.index: dict[str, ItemIndex] = {}
        self._ver: dict[str, int] = {}

    def key(self, platform: str) -> str:
        if is_cluster(self.r):  # vec and vecver of a platform in one slot (MULTI in put)
            return f"{self.p}vec:{{{self.encoder_id}:{platform}}}"
        return f"{self.p}vec:{self.encoder_id}:{platform}"

    def ver_key(self, platform: str) -> str:
        if is_cluster(self.r):
            return f"{self.p}vecver:{{{self.encoder_id}:{platform}}}"
        return f"{self.p}vecver:{self.encoder_id}:{platform}"

    async def missing(self, platform: str, items: Sequence[str]) -> list[bool]:
        if not items:
            return []
        res = await self.r.hmget(self.key(platform), list(items))
        return [v is None for v in res]

    async def put(self, platform: str, items: Sequence[str], vecs: np.ndarray) -> None:
        if not len(items):
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key(platform), mapping={i: pack(v) for i, v in zip(items, vecs,
                                                                          strict=True)})
        pipe.incr(self.ver_key(platform))
        await pipe.execute()
        self.index.setdefault(platform, ItemIndex(self.dim)).upsert(
            list(items), np.stack([unpack(pack(v), self.dim) for v in vecs]))

    async def refresh(self, platforms: Sequence[str]) -> int:
        """Reload the platforms whose version moved; returns how many were reloaded."""
        keys = [self.ver_key(p) for p in platforms]
        vers = await (self.r.mget_nonatomic(keys) if is_cluster(self.r) else self.r.mget(keys))
        n = 0
        for p, v in zip(platforms, vers, strict=True):
            ver = int(v or 0)
            if ver != self._ver.get(p):
                raw = await self.r.hgetall(self.key(p))
                self.index[p] = _index(raw, self.dim)
                self._ver[p] = ver
                n += 1
        return n


def _index(raw: dict[bytes, bytes], dim: int) -> ItemIndex:
    idx = ItemIndex(dim)
    if raw:
        ids = [k.decode() for k in raw]
        idx.upsert(ids, np.stack([unpack(v, dim) for v in raw.values()]))
    return idx


def load_index_sync(url: str, prefix: str, encoder_id: str, platform: str, dim: int
                    ) -> ItemIndex:
    r = redis.Redis.from_url(url, decode_responses=False)
    try:
        return _index(r.hgetall(f"{prefix}vec:{encoder_id}:{platform}"), dim)
    finally:
        r.close()
