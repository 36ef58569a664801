"""Redis key names of the state, for a single Redis (today's names) or a Redis Cluster.

Single mode (``REDIS_URL=redis://…`` or ``unix://…``): every name is ``<prefix><name>``,
exactly as documented in :mod:`streams.state`; one Lua call may touch any key.

Cluster mode (``REDIS_URL=redis+cluster://host:port[,host:port…]``): one Lua call may only
touch keys of one hash slot. Users are spread over ``XREC_REDIS_SHARDS`` tag-shards: user
``u`` belongs to shard ``crc32(u) % S`` and every key of the user *and of its shard*
carries the hash tag ``{sNN}`` right after the prefix::

    <prefix>{sNN}:u:<user>:…          the user's keys (same suffixes as single mode)
    <prefix>{sNN}:wm:<epoch>:<topic>:<q>  watermark of the shard's events of partition q
    <prefix>{sNN}:users | stats | pop:<p> | popmeta:<p> | co:<p>:<item>
                                      the shard's share of the global aggregates
    <prefix>{sNN}:recs:<p>:<user>     cached recommendations (the user's shard)
    <prefix>{dl}:dlwm:<epoch>, <prefix>{dl}:stats   dead-letter watermark + its counters

So the apply script is called once per shard with ``<prefix>{sNN}:`` as its prefix: the
script is unchanged, every key it computes starts with the prefix and lands in the slot of
``{sNN}``. Readers sum the shards' aggregates (:meth:`RedisState._popular` etc.). Keys that
only one command touches at a time (catalog items, vectors, the ``stats`` hash that other
agents count into) keep their single-mode names and spread over the cluster by name.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

__all__ = ["Keys", "DL_TAG"]

DL_TAG = "{dl}"


class Keys:
    """Key names: ``shards == 0`` → single mode (today's names), else cluster mode."""

    __slots__ = ("p", "shards", "_sp")

    def __init__(self, prefix: str, shards: int = 0) -> None:
        self.p = prefix
        self.shards = shards
        #: each shard's key prefix (what the Lua scripts get as ``p``)
        self._sp = [f"{prefix}{{s{s:02d}}}:" for s in range(shards)] if shards else [prefix]

    @property
    def cluster(self) -> bool:
        return self.shards > 0

    def k(self, *parts: object) -> str:
        """An untagged name (single mode's name in both modes)."""
        return self.p + ":".join(str(x) for x in parts)

    # ----------------------------------------------------------------- shards
    def shard(self, user: str) -> int:
        """The user's shard (always 0 in single mode)."""
        if not self.shards:
            return 0
        return zlib.crc32(user.encode()) % self.shards

    def all_shards(self) -> range:
        return range(max(self.shards, 1))

    def sp(self, shard: int) -> str:
        """The key prefix of a shard (single mode: the prefix)."""
        return self._sp[shard]

    def sk(self, shard: int, *parts: object) -> str:
        """A name inside a shard: ``<prefix>{sNN}:<parts>`` (single: ``<prefix><parts>``)."""
        return self._sp[shard] + ":".join(str(x) for x in parts)

    def by_shard(self, users: Iterable[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for u in users:
            out.setdefault(self.shard(u), []).append(u)
        return out

    # ------------------------------------------------------------- user keys
    def u(self, user: str, *parts: object) -> str:
        """``u:<user>:<parts>`` in the user's shard."""
        return self.sk(self.shard(user), "u", user, *parts)

    def recs(self, platform: str, user: str) -> str:
        return self.sk(self.shard(user), "recs", platform, user)

    def users(self, shard: int) -> str:
        return self.sk(shard, "users")

    def wm(self, shard: int, epoch: str, topic: str, q: int) -> str:
        return self.sk(shard, "wm", epoch, topic, q)

    # --------------------------------------------------- global (per shard)
    def pop(self, shard: int, platform: str) -> str:
        return self.sk(shard, "pop", platform)

    def popmeta(self, shard: int, platform: str) -> str:
        return self.sk(shard, "popmeta", platform)

    def co(self, shard: int, platform: str, item: str) -> str:
        return self.sk(shard, "co", platform, item)

    def stats(self, shard: int) -> str:
        """The stats hash the apply script counts into (single: ``stats``)."""
        return self.sk(shard, "stats")

    # ------------------------------------------------------------ dead letters
    def dlwm(self, epoch: str) -> str:
        return self.p + (f"{DL_TAG}:" if self.shards else "") + f"dlwm:{epoch}"

    def dlstats(self) -> str:
        return self.p + (f"{DL_TAG}:" if self.shards else "") + "stats"

    def stats_keys(self) -> list[str]:
        """Every hash :meth:`RedisState.stats` sums (single mode: just ``stats``)."""
        if not self.shards:
            return [self.k("stats")]
        return [self.k("stats"), self.dlstats(), *(self.stats(s) for s in self.all_shards())]
