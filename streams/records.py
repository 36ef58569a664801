"""Records that cross topic boundaries downstream of normalize (pydantic v2).

Platform-native records are *not* here: they are built from each platform's config
file by :mod:`streams.platforms`. Everything below carries pseudonymous user keys only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Interaction", "Evidence", "Why", "RecItem", "Recommendations", "DeadLetter", "Forget",
           "CatalogItem", "TrainingExample", "HeadVersion", "QualityWindow", "DriftSignal",
           "DriftReaction", "DriftWindow"]

_FROZEN = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Interaction(BaseModel):
    """One behaviour event, unified across platforms. Key on ``xrec.events.unified``: ``user``."""

    model_config = _FROZEN

    platform: str
    user: str = Field(description="HMAC-SHA256 pseudonym, hex")
    item: str
    kind: str = Field(description="platform action, e.g. view / cart / purchase / watch / play")
    label: Literal[0, 1] = Field(description="1 = positive feedback, 0 = negative")
    weight: float = Field(ge=0, le=100)
    event_time: float = Field(description="when it happened, epoch seconds")
    event_id: str
    produced_at: float = Field(description="when the platform produced it (record timestamp, s)")
    src_topic: str
    src_partition: int
    src_offset: int


class Evidence(BaseModel):
    """An item of the user's own history behind a recommendation."""

    model_config = _FROZEN
    platform: str
    item: str
    share: float = Field(ge=0, le=1, description="its part of the reason (of all the history's "
                         "parts: the named ones sum to at most 1)")


class Why(BaseModel):
    """Why an item was recommended, machine-readable (README, "Why this item").

    ``history``: the model's attention over the user's history × similarity to the item
    (``evidence``: the history items that contributed most, any platform); ``similar``:
    the same for an item outside the platform's popular head (new, or rarely consumed:
    known by its text); ``cooccurrence``: people who had the evidence item (on this
    platform) had this one; ``popular``: nothing personal, what ``platform``'s users like
    (its popularity, or the model's platform-wide prior for a user without positives)."""

    model_config = _FROZEN
    kind: Literal["history", "similar", "cooccurrence", "popular"]
    platform: str | None = Field(None, description="kind popular: where it is popular")
    evidence: list[Evidence] = Field(default_factory=list)


class RecItem(BaseModel):
    model_config = _FROZEN
    item: str
    score: float
    why: Why | None = Field(None, description="reason, for the best XREC_EXPLAIN_TOP items")


class Recommendations(BaseModel):
    """Published on ``xrec.recs.<platform>`` (key: user) and cached in Redis."""

    model_config = _FROZEN

    user: str
    platform: str
    items: list[RecItem]
    scorer: str = Field(description="model / scorer version that ranked the items")
    event_time: float = Field(description="event time of the newest interaction covered")
    produced_at: float = Field(description="produce time of the oldest interaction covered")
    published_at: float
    events: int = Field(description="interactions of this user covered by this refresh")


class DeadLetter(BaseModel):
    """Published on ``xrec.deadletter`` for every event that could not be used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    src_topic: str
    src_partition: int
    src_offset: int
    platform: str | None
    code: str = Field(description="machine-readable reason, e.g. invalid_json, schema")
    message: str = Field(description="what was wrong, for people")
    excerpt: str = Field(description="start of the payload, identity fields redacted")
    size: int
    at: float


class Forget(BaseModel):
    """An erasure (``xrec forget``), on the unified topic keyed by the user key like that
    user's events, so every worker meets it in order with them: the worker that owns the
    partition deletes the user's state, publishes a tombstone on every recommendation topic
    and publishes nothing more for the user from events produced up to ``at``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    forget: str = Field(min_length=1, max_length=128, description="the pseudonymous user key")
    at: float = Field(description="erasure time: the user's events produced up to it are "
                      "skipped wherever they still are")
    id: str = Field("", max_length=64, description="the erasure's id (for the audit trail)")


class CatalogItem(BaseModel):
    """A validated catalog record, stored per platform (text is built from the config template)."""

    model_config = _FROZEN

    platform: str
    item: str
    text: str
    fields: dict[str, str | float | int | bool | None]


class TrainingExample(BaseModel):
    """Published on ``xrec.train.examples`` (key: user) by the recommend agent, one per applied
    positive interaction: the user's cross-platform history *before* it, newest first."""

    model_config = _FROZEN

    user: str
    platform: str
    item: str
    weight: float
    event_time: float
    history: list[tuple[str, str, int, float]] = Field(
        description="(platform, item, label, event time), newest first")
    produced_at: float = Field(description="when the interaction entered the broker")
    emitted_at: float


class HeadVersion(BaseModel):
    """Published on ``xrec.models.heads`` after the weights are in Redis (``heads:blob``)."""

    model_config = _FROZEN

    version: int = Field(description="monotonic; recommenders load a version only once")
    platforms: list[str]
    examples: int = Field(description="examples in the batch that produced this version")
    trained_examples: int = Field(description="examples learned since the model started")
    steps: int
    skipped_nonfinite: int
    loss: float | None
    step_ms: float
    device: str
    bytes: int
    batch_arrived_at: float = Field(description="when the train agent took the batch")
    newest_produced_at: float = Field(description="produce time of the batch's newest event")
    published_at: float


class QualityWindow(BaseModel):
    """Published on ``xrec.metrics.quality``: prequential quality of the served model over a
    window (each positive ranked before the model saw it, against unseen catalog items)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    platform: str = Field(description="a platform, or 'all'")
    cohort: Literal["all", "coldstart"]
    scorer: str
    window_s: float
    n: int
    recall_at_10: float | None
    recall_at_20: float | None
    ndcg_at_10: float | None
    mrr: float | None
    at: float


class DriftSignal(BaseModel):
    """On ``xrec.metrics.drift`` when a detector fires (``kind`` = "signal")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["signal"] = "signal"
    platform: str
    signal: str = Field(description="hit | labels | popularity | centroid")
    detector: str
    value: float = Field(description="the signal's value when it fired")
    reference: float = Field(description="its level before (ADWIN) or the alarm level")
    window: int = Field(description="events the value covers")
    events: int = Field(description="events of the platform this monitor had seen")
    worker: str
    time: float


class DriftReaction(BaseModel):
    """On ``xrec.metrics.drift`` when the train agent reacted to a signal."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["reaction"] = "reaction"
    platform: str
    signal: str
    actions: list[str]
    time: float


class DriftWindow(BaseModel):
    """On ``xrec.metrics.drift`` periodically: each platform's current signal values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["window"] = "window"
    platform: str
    values: dict[str, float]
    events: int
    worker: str
    time: float
