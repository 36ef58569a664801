"""Normalize: platform-native bytes in, a unified :class:`Interaction` or a :class:`DeadLetter` out.

Pure and synchronous: the Faust agent, ``xrec eval`` and the tests all call
:meth:`Normalizer.normalize`. It never raises on input; every way an event can be bad
is a dead-letter ``code``:

===================  =======================================================
code                 meaning
===================  =======================================================
too_large            payload over ``XREC_MAX_EVENT_BYTES``
invalid_utf8         payload is not UTF-8
invalid_json         not JSON (NaN / Infinity literals count as invalid)
too_deep             JSON nested deeper than ``XREC_MAX_JSON_DEPTH``
not_an_object        JSON, but not an object
unknown_platform     (ingest topic) ``platform`` missing or not configured
platform_mismatch    (a platform's topic) ``platform`` names another configured platform
schema               a field is missing, of the wrong type or out of range, or the
                     event has more than ``XREC_MAX_EVENT_FIELDS`` fields
time_out_of_range    event time before ``XREC_MIN_EVENT_TIME`` or too far ahead
mapping              the platform's mapping expressions failed on this event
unlabelled           no label rule of the platform matched
===================  =======================================================

Privacy: the raw user id (and shared identity) become an HMAC-SHA256 user key here;
event ids are keyed the same way. Dead-letter excerpts have identity fields redacted.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from streams.expr import Expr, ExprError
from streams.platforms import Platform, PlatformRegistry
from streams.records import DeadLetter, Interaction
from streams.settings import Settings

__all__ = ["Normalizer", "Pseudonymizer", "DEADLETTER_CODES"]

DEADLETTER_CODES = (
    "too_large", "invalid_utf8", "invalid_json", "too_deep", "not_an_object",
    "unknown_platform", "platform_mismatch", "schema", "time_out_of_range", "mapping",
    "unlabelled",
)
REDACTED = "<redacted>"


class Pseudonymizer:
    """HMAC-SHA256(secret, namespace:identity) → hex user key."""

    def __init__(self, secret: bytes, hex_chars: int = 32) -> None:
        self._secret = secret
        self._n = hex_chars

    def key(self, namespace: str, identity: str) -> str:
        # hmac.digest: OpenSSL's one-shot HMAC (the same bytes as hmac.new(...).digest())
        return hmac.digest(self._secret, f"{namespace}:{identity}".encode(),
                           "sha256").hex()[: self._n]

    def user_key(self, platform: Platform, record: dict[str, Any]) -> str:
        shared = platform.identity.shared
        if shared and record.get(shared) not in (None, ""):
            return self.key(platform.identity.namespace, str(record[shared]))
        return self.key(f"platform/{platform.name}", str(record[platform.identity.user]))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth_exceeds(obj: Any, limit: int) -> bool:
    if isinstance(obj, dict) and limit >= 2 and not any(
            isinstance(v, dict | list) for v in obj.values()):
        return False  # flat (every event of the built-in platforms): depth 2 at most
    return _depth_walk(obj, limit)


def _depth_walk(obj: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return False


class Normalizer:
    def __init__(
        self,
        settings: Settings,
        platforms: PlatformRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.s = settings
        self.platforms = platforms
        self.clock = clock
        self.pseudo = Pseudonymizer(settings.secret_bytes(), settings.pseudonym_hex_chars)
        fields = sorted({f for p in platforms.values() for f in p.identity_fields})
        self._all_identity_fields = frozenset(fields)
        #: every declared event field of every platform: other fields' values never reach
        #: a dead letter (an unknown field may hold anything, a raw id included)
        self._known_fields = frozenset(
            f for p in platforms.values() for f in p.event_model.model_fields)

    # ------------------------------------------------------------------ public
    def normalize(
        self,
        raw: bytes | None,
        *,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: float | None,
        platform: str | None,
    ) -> Interaction | DeadLetter:
        """``platform=None`` means the ingest topic: the event names its platform."""
        raw = raw or b""
        src = (topic, partition, offset)
        if len(raw) > self.s.max_event_bytes:
            return self._dead(src, platform, "too_large",
                              f"payload is {len(raw)} bytes; the limit is "
                              f"{self.s.max_event_bytes} (XREC_MAX_EVENT_BYTES)", raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._dead(src, platform, "invalid_utf8", f"not UTF-8: {exc.reason} "
                              f"at byte {exc.start}", raw)
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            return self._dead(src, platform, "too_deep", "JSON nested too deeply", raw)
        except ValueError as exc:
            msg = str(exc) if "not valid JSON" in str(exc) else f"not JSON: {exc}"
            return self._dead(src, platform, "invalid_json", msg[:200], raw)
        if not isinstance(obj, dict):
            return self._dead(src, platform, "not_an_object",
                              f"expected a JSON object, got {type(obj).__name__}", raw)
        if len(obj) > self.s.max_event_fields:
            return self._dead(src, platform, "schema", f"{len(obj)} fields; the limit is "
                              f"{self.s.max_event_fields} (XREC_MAX_EVENT_FIELDS)", raw,
                              {k: "…" for k in list(obj)[:20]})
        if _depth_exceeds(obj, self.s.max_json_depth):
            return self._dead(src, platform, "too_deep", f"JSON nested deeper than "
                              f"{self.s.max_json_depth} (XREC_MAX_JSON_DEPTH)", raw, obj)
        if platform is None:
            name = obj.get("platform")
            if not isinstance(name, str) or name not in self.platforms:
                shown = repr(name)[:40] if name is not None else "no `platform` field"
                # its identity fields are unknown: keep the field names, drop every value
                blind = {k: (v if k == "platform" else "…") for k, v in obj.items()}
                return self._dead(src, None, "unknown_platform",
                                  f"unknown platform {shown}; configured: "
                                  f"{', '.join(sorted(self.platforms))}", raw, blind)
            platform = name
        else:
            name = obj.get("platform")
            if isinstance(name, str) and name != platform and name in self.platforms:
                # an event naming another configured platform on this platform's topic: a
                # producer writing where it should not (a field naming no xrec platform,
                # e.g. a device's "ios", is the platform's own business and passes)
                blind = {k: (v if k == "platform" else "…") for k, v in obj.items()}
                return self._dead(src, platform, "platform_mismatch",
                                  f"the event names platform {name!r} but arrived on "
                                  f"{platform!r}'s topic", raw, blind)
        p = self.platforms[platform]
        try:
            rec = p.event_model.model_validate(obj)
        except ValidationError as exc:
            return self._dead(src, platform, "schema", _describe(exc), raw, obj)
        r = Expr.record(rec.model_dump())  # one conversion for every expression below
        try:
            ev_time = float(p.event.time.eval(r))
            now = self.clock()
            if not math.isfinite(ev_time):
                raise ExprError("event time is not finite")
            if ev_time < self.s.min_event_time or ev_time > now + self.s.max_future_s:
                return self._dead(src, platform, "time_out_of_range",
                                  f"event time {ev_time:.0f} outside [{self.s.min_event_time:.0f},"
                                  f" now + {self.s.max_future_s:.0f}s]", raw, obj)
            event_id = p.event.event_id.eval(r)
            item = p.event.item.eval(r)
            kind = p.event.kind.eval(r)
            for what, v in (("event id", event_id), ("item", item), ("kind", kind)):
                if v is None or v == "":
                    raise ExprError(f"{what} is empty")
            label = weight = None
            for rule in p.event.rules:
                if rule.when is None or rule.when.eval(r):
                    label = rule.label
                    weight = float(rule.weight.eval(r))
                    break
        except (ExprError, TypeError, ValueError) as exc:
            return self._dead(src, platform, "mapping", str(exc)[:200], raw, obj)
        if label is None or weight is None:
            return self._dead(src, platform, "unlabelled", "no label rule matched", raw, obj)
        if not (math.isfinite(weight) and 0.0 <= weight <= 100.0):
            return self._dead(src, platform, "mapping", f"weight {weight!r} outside [0, 100]",
                              raw, obj)
        return Interaction(
            platform=platform,
            user=self.pseudo.user_key(p, r),
            item=str(item),
            kind=str(kind)[:64],
            label=label,
            weight=weight,
            event_time=ev_time,
            event_id=self.pseudo.key(f"event/{platform}", str(event_id))[:24],
            produced_at=(timestamp_ms / 1000.0) if timestamp_ms else self.clock(),
            src_topic=topic,
            src_partition=partition,
            src_offset=offset,
        )

    # ----------------------------------------------------------------- helpers
    def _dead(self, src: tuple[str, int, int], platform: str | None, code: str, message: str,
              raw: bytes, obj: dict[str, Any] | None = None) -> DeadLetter:
        return DeadLetter(
            src_topic=src[0], src_partition=src[1], src_offset=src[2],
            platform=platform if platform in self.platforms else None,
            code=code, message=message, excerpt=self.excerpt(raw, obj), size=len(raw),
            at=self.clock(),
        )

    def excerpt(self, raw: bytes, obj: dict[str, Any] | None = None) -> str:
        """The start of the payload, safe to publish: identity fields' values redacted,
        unknown fields' values dropped. A payload that did not parse (broken JSON, bad
        UTF-8, too large, too deep) keeps only its shape: field names, numbers and
        literals; every string value is dropped, since a broken field name no longer
        says which values are identities."""
        n = self.s.deadletter_excerpt_bytes
        if obj is not None:
            red = {k: (REDACTED if k in self._all_identity_fields else
                       v if k in self._known_fields else "…") for k, v in obj.items()}
            try:
                return json.dumps(red, ensure_ascii=False, default=str)[:n]
            except (ValueError, RecursionError):
                pass
        return _shape(raw[: n * 4].decode("utf-8", "replace"), self._all_identity_fields)[:n]


_TOKEN = re.compile(r"""
    (?P<key>"(?:[^"\\]|\\.)*"(?=\s*:))
  | (?P<str>"(?:[^"\\]|\\.)*"?)
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w-]))
  | (?P<lit>(?:true|false|null)(?![\w-]))
  | (?P<punct>[{}\[\]:,\s]+)
  | (?P<bare>[^{}\[\]:,\s"]+)
""", re.VERBOSE)


def _shape(text: str, identity: frozenset[str]) -> str:
    """Broken JSON reduced to its shape: keys, numbers, literals and punctuation kept;
    a string value becomes "…" (an identity field's: the redaction mark); bare words "…"."""
    out: list[str] = []
    key = ""
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        tok = m.group()
        if kind == "key":
            key = tok[1:-1]
            out.append(tok)
        elif kind == "punct":
            out.append(tok)
        elif key in identity:  # a number can be a raw id too
            out.append(f'"{REDACTED}"')
        elif kind in ("num", "lit"):
            out.append(tok)
        elif kind == "str":
            out.append('"…"')
        else:
            out.append("…")
    return "".join(out)


def _describe(exc: ValidationError) -> str:
    """Field locations and reasons, never the offending values (they may be raw ids)."""
    parts = []
    for e in exc.errors(include_url=False, include_input=False)[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "(record)"
        parts.append(f"{loc}: {e['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
