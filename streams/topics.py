"""Topic names. One place; everything else asks here."""

from __future__ import annotations

from collections.abc import Iterable

from streams.settings import Settings

__all__ = ["Topics"]


class Topics:
    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.topic_prefix

    def events(self, platform: str) -> str:
        return f"{self.prefix}events.{platform}"

    def catalog(self, platform: str) -> str:
        return f"{self.prefix}catalog.{platform}"

    def recs(self, platform: str) -> str:
        return f"{self.prefix}recs.{platform}"

    @property
    def ingest(self) -> str:
        """Mixed-platform events that name their platform in a ``platform`` field."""
        return f"{self.prefix}events.ingest"

    @property
    def unified(self) -> str:
        return f"{self.prefix}events.unified"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}deadletter"

    @property
    def train_examples(self) -> str:
        return f"{self.prefix}train.examples"

    @property
    def heads(self) -> str:
        return f"{self.prefix}models.heads"

    @property
    def drift(self) -> str:
        return f"{self.prefix}metrics.drift"

    @property
    def quality(self) -> str:
        return f"{self.prefix}metrics.quality"

    def partitions(self, name: str, default: int) -> int:
        """Low-volume topics get one partition: every partition costs the broker on each fetch."""
        low = name == self.ingest or name.startswith(f"{self.prefix}catalog.") or name in (
            self.heads, self.drift, self.quality, self.deadletter)
        return 1 if low else default

    def plan(self, platforms: Iterable[str], default: int) -> dict[str, int]:
        """Every topic xrec uses, with its partition count."""
        return {n: self.partitions(n, default) for n in self.all(platforms)}

    def all(self, platforms: Iterable[str]) -> list[str]:
        names = [self.ingest, self.unified, self.deadletter, self.train_examples, self.heads,
                 self.drift, self.quality]
        for p in platforms:
            names += [self.events(p), self.catalog(p), self.recs(p)]
        return names
