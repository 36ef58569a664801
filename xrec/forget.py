"""Erasure of one user (``xrec forget``): state, cached and published recommendations.

What happens, in this order:

1. **Redis, at once.** ``RedisState.forget`` marks the user erased at ``at`` (``erased``: user
   key → time, in the user's shard) and deletes every per-user key of the known layout;
   then a SCAN finds any other key naming the user (an older layout's, a platform removed
   from the registry) and deletes it too. From the mark on, the apply script skips the
   user's events produced up to ``at`` wherever they still are (platform topics not yet
   normalized, the unified topic, a replay of old logs), so nothing of them comes back.
2. **Kafka.** A tombstone (the user key, no value) on every ``xrec.recs.<platform>``, and a
   :class:`streams.records.Forget` record on the unified topic, keyed by the user key like
   the user's events: the worker that owns the partition meets it in order with them and
   does the same again (delete, mark, tombstones) after anything it published for the user
   before, drops the user from its memory and from the batch's training examples. A
   crash before it commits redoes it; repeating an erasure is harmless.

Kept: the mark (a pseudonymous key and a time), for ``XREC_ERASURE_KEEP_S``; aggregates
(popularity, co-occurrence counts, model weights) hold no per-user record. Not reached:
the event logs themselves (platform topics, unified, training examples, dead letters) until
their retention expires; the mark keeps replays of them from rebuilding the user. Events
of the user produced after ``at`` start a fresh state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from streams.normalize import Pseudonymizer
from streams.platforms import PlatformRegistry
from streams.records import Forget
from streams.settings import Settings
from streams.topics import Topics

__all__ = ["user_key", "forget_user"]


def user_key(s: Settings, platforms: PlatformRegistry, *, key: str | None = None,
             raw_id: str | None = None, platform: str | None = None,
             account_id: str | None = None) -> str:
    """The pseudonymous key the normalizer gives this identity (exactly one of ``key``,
    ``raw_id`` with ``platform``, ``account_id``)."""
    given = [x is not None for x in (key, raw_id, account_id)]
    if sum(given) != 1:
        raise ValueError("give exactly one of USER_KEY, --raw-id (with --platform) or "
                         "--account-id")
    if key is not None:
        return key
    pseudo = Pseudonymizer(s.secret_bytes(), s.pseudonym_hex_chars)
    if raw_id is not None:
        if not platform:
            raise ValueError("--raw-id needs --platform (a user id is per platform)")
        return pseudo.key(f"platform/{platforms.require(platform).name}", raw_id)
    spaces = {p.identity.namespace for p in platforms.values() if p.identity.shared
              and (platform is None or p.name == platform)}
    if not spaces:
        raise ValueError("no platform declares a shared identity (identity.shared); "
                         "--account-id has nothing to match")
    if len(spaces) > 1:
        raise ValueError(f"platforms use several shared namespaces {sorted(spaces)}: "
                         "name one with --platform")
    return pseudo.key(spaces.pop(), str(account_id))


async def _redis_part(s: Settings, topics: Topics, user: str, at: float,
                      platforms: Sequence[str]) -> tuple[int, list[str]]:
    from streams.state import RedisState

    st = RedisState.from_settings(s, topics.unified)
    try:
        n = await st.forget(user, at, platforms)
        other = await st.user_keys(user)
        for k in other:  # one by one: on a cluster they may live in different slots
            n += int(await st.r.delete(k))
        return n, await st.user_keys(user)
    finally:
        await st.r.aclose()


def forget_user(s: Settings, platforms: PlatformRegistry, user: str,
                kafka_kwargs: dict[str, Any] | None = None, timeout_s: float = 30.0
                ) -> dict[str, Any]:
    """Erase ``user`` (see the module's text); returns what was done."""
    from kafka import KafkaProducer

    topics = Topics(s)
    names = sorted(platforms)
    at = time.time()
    keys_deleted, left = asyncio.run(_redis_part(s, topics, user, at, names))
    prod = KafkaProducer(bootstrap_servers=s.kafka_bootstrap_servers, acks="all",
                         **(kafka_kwargs or {}))
    try:
        for p in names:
            prod.send(topics.recs(p), key=user.encode(), value=None)
        rec = Forget(forget=user, at=round(at, 3), id=uuid.uuid4().hex)
        prod.send(topics.unified, key=user.encode(), value=rec.model_dump_json().encode())
        prod.flush(timeout=timeout_s)
    finally:
        prod.close(timeout=timeout_s)
    return {"user": user, "erased_at": round(at, 3), "keys_deleted": keys_deleted,
            "keys_left": len(left), "tombstones": len(names), "control_topic": topics.unified,
            "erasure_id": rec.id}
