"""Catalog records: platform-native item metadata → :class:`CatalogItem` (or a dead letter).

The item text is built from the platform's ``catalog.text`` template; later the text
encoder turns it into a vector. Catalog records carry no user data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from pydantic import ValidationError

from streams.normalize import _describe
from streams.platforms import Platform
from streams.records import CatalogItem, DeadLetter
from streams.settings import Settings

__all__ = ["parse_catalog_record"]


def parse_catalog_record(
    raw: bytes | None, platform: Platform, settings: Settings, *, topic: str = "",
    partition: int = -1, offset: int = -1, clock: Callable[[], float] = time.time,
) -> CatalogItem | DeadLetter:
    raw = raw or b""

    def dead(code: str, msg: str) -> DeadLetter:
        return DeadLetter(src_topic=topic, src_partition=partition, src_offset=offset,
                          platform=platform.name, code=code, message=msg,
                          excerpt=raw[: settings.deadletter_excerpt_bytes].decode("utf-8",
                                                                                  "replace"),
                          size=len(raw), at=clock())

    if len(raw) > settings.max_event_bytes:
        return dead("too_large", f"catalog record is {len(raw)} bytes; limit "
                    f"{settings.max_event_bytes}")
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(
            ValueError(f"{c} is not valid JSON")))
    except UnicodeDecodeError:
        return dead("invalid_utf8", "catalog record is not UTF-8")
    except RecursionError:
        return dead("too_deep", "JSON nested too deeply")
    except ValueError as exc:
        return dead("invalid_json", f"not JSON: {exc}"[:200])
    if not isinstance(obj, dict):
        return dead("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    try:
        rec = platform.catalog_model.model_validate(obj)
    except ValidationError as exc:
        return dead("schema", _describe(exc))
    fields = rec.model_dump()
    try:
        text = platform.catalog_text(fields)
    except ValueError as exc:
        return dead("mapping", str(exc)[:200])
    return CatalogItem(platform=platform.name, item=str(fields[platform.catalog.id]),
                       text=text, fields=fields)
