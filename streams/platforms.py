"""Platforms declared in config files, turned into pydantic v2 models at load time.

A platform file (YAML) names the native fields of its events and catalog records,
their types and limits, and how a native event maps onto the unified
:class:`~streams.records.Interaction` (expressions, see :mod:`streams.expr`).
The three built-in platforms live in ``streams/platforms/*.yaml``; more are added by
pointing ``XREC_PLATFORMS_PATH`` at further files or folders: no code changes.

Example (abridged ``shop.yaml``)::

    name: shop
    identity: {user: customer_id, shared: account_id}
    event:
      fields:
        event_id: {type: str, max_length: 64}
        customer_id: {type: str}
        account_id: {type: str, required: false}
        sku: {type: str}
        action: {type: enum, values: [view, cart, purchase]}
        ts: {type: timestamp}
      event_id: event_id
      item: sku
      time: ts
      kind: action
      rules:
        - {when: "action == 'purchase'", label: 1, weight: 1.0}
        - {label: 1, weight: 0.25}
    catalog:
      id: sku
      fields: {sku: {type: str}, title: {type: str, max_length: 512}}
      text: "{title}"
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from streams.errors import ConfigError
from streams.expr import Expr

__all__ = ["FieldSpec", "Rule", "Platform", "PlatformRegistry", "load_platforms", "parse_time"]

BUILTIN_DIR = Path(__file__).parent / "platforms"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def parse_time(value: Any) -> float:
    """Epoch seconds from epoch s / ms / µs numbers or an ISO-8601 string."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(value, int | float):
        v = float(value)
    elif isinstance(value, str):
        s = value.strip()
        try:
            v = float(s)
        except ValueError:
            try:
                d = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError("not an epoch number or ISO-8601 time") from None
            if d.tzinfo is None:
                d = d.replace(tzinfo=dt.UTC)
            return d.timestamp()
    else:
        raise ValueError("not an epoch number or ISO-8601 time")
    if not math.isfinite(v):
        raise ValueError("timestamp is not finite")
    if abs(v) > 1e14:  # microseconds
        v /= 1e6
    elif abs(v) > 1e11:  # milliseconds
        v /= 1e3
    return v


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["str", "int", "float", "bool", "timestamp", "enum"]
    required: bool = True
    max_length: int = Field(256, ge=1, le=1_000_000)
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None
    values: list[str] | None = None
    description: str = ""

    @model_validator(mode="after")
    def _enum_values(self) -> FieldSpec:
        if self.type == "enum" and not self.values:
            raise ValueError("an enum field needs a non-empty `values` list")
        return self

    def annotation(self) -> Any:
        num = {k: getattr(self, k) for k in ("ge", "le", "gt", "lt")
               if getattr(self, k) is not None}
        if self.type == "str":
            ann: Any = Annotated[str, Field(min_length=1, max_length=self.max_length)]
        elif self.type == "int":
            ann = Annotated[int, Field(strict=False, **num)]
        elif self.type == "float":
            ann = Annotated[float, Field(allow_inf_nan=False, **num)]
        elif self.type == "bool":
            ann = bool
        elif self.type == "timestamp":
            ann = Annotated[float, BeforeValidator(parse_time)]
        else:
            ann = Literal[tuple(self.values or ())]  # type: ignore[misc]
        return ann if self.required else ann | None


class Rule(BaseModel):
    """First rule whose ``when`` holds decides label and weight; no ``when`` = always."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    when: Expr | None = None
    label: Literal[0, 1]
    weight: Expr = Field(default_factory=lambda: Expr("1.0"))

    @field_validator("when", "weight", mode="before")
    @classmethod
    def _compile(cls, v: Any) -> Any:
        return v if v is None or isinstance(v, Expr) else Expr(v)


class EventSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    fields: dict[str, FieldSpec]
    event_id: Expr
    item: Expr
    time: Expr
    kind: Expr
    rules: list[Rule] = Field(min_length=1)

    @field_validator("event_id", "item", "time", "kind", mode="before")
    @classmethod
    def _compile(cls, v: Any) -> Any:
        return v if isinstance(v, Expr) else Expr(v)


class CatalogSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    fields: dict[str, FieldSpec]
    text: str = Field(description="str.format template over catalog fields; missing → ''")


class IdentitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(description="platform-local user id field")
    shared: str | None = Field(None, description="field holding an identity shared by platforms")
    namespace: str = Field("account", description="namespace of the shared identity")


class DriftSpec(BaseModel):
    """What the trainer does when drift is detected on this platform (models/drift.py)."""

    model_config = ConfigDict(extra="forbid")

    reactions: bool = Field(True, description="off switch for this platform's reactions")
    lr_factor: float = Field(3.0, ge=1.0, le=100.0, description="learning rate × this ...")
    boost_examples: int = Field(3000, ge=0, description="... for this many examples")
    forget_replay: bool = Field(True, description="drop replayed examples of the old regime")
    reanchor_ema: bool = Field(True, description="restart the anti-forgetting EMA from now")
    reset_optimizer: bool = False
    history_horizon_s: float = Field(86400.0, ge=0, description="after a hit-rate drop, the "
                                     "model reads only what users did since, this long")
    signals: list[Literal["hit", "labels", "popularity", "centroid"]] = Field(
        default_factory=lambda: ["hit", "popularity", "centroid"],
        description="signals that trigger the reactions (labels: off by default)")
    horizon_signals: list[Literal["hit", "labels", "popularity", "centroid"]] = Field(
        default_factory=lambda: ["hit"])
    weight_signals: list[Literal["hit", "labels", "popularity", "centroid"]] = Field(
        default_factory=lambda: ["popularity", "centroid"])

    def reaction_config(self, on: bool = True):  # type: ignore[no-untyped-def]
        from models.drift import ReactionConfig

        return ReactionConfig(
            enabled=self.reactions and on, lr_factor=self.lr_factor,
            boost_examples=self.boost_examples, forget_replay=self.forget_replay,
            reanchor_ema=self.reanchor_ema, reset_optimizer=self.reset_optimizer,
            history_horizon_s=self.history_horizon_s, signals=tuple(self.signals),
            horizon_signals=tuple(self.horizon_signals),
            weight_signals=tuple(self.weight_signals))


class Platform(BaseModel):
    """One platform, validated from its config file, with its generated record models."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    description: str = ""
    identity: IdentitySpec
    event: EventSpec
    catalog: CatalogSpec
    drift: DriftSpec = Field(default_factory=DriftSpec)
    source: str = Field("", description="file it was loaded from")

    event_model: Any = None
    catalog_model: Any = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or v == "ingest" or v == "unified":
            raise ValueError(
                "platform names are lower-case [a-z][a-z0-9_]{0,31}, not ingest/unified")
        return v

    @model_validator(mode="after")
    def _build(self) -> Platform:
        f = self.event.fields
        for role, fld in (("identity.user", self.identity.user), ("identity.shared",
                                                                   self.identity.shared)):
            if fld is not None and fld not in f:
                raise ValueError(f"{role} names field {fld!r}, which event.fields does not declare")
        if f[self.identity.user].required is False:
            raise ValueError(f"the user field {self.identity.user!r} must be required")
        exprs = [self.event.event_id, self.event.item, self.event.time, self.event.kind]
        exprs += [e for r in self.event.rules for e in (r.when, r.weight) if e is not None]
        for e in exprs:
            unknown = e.names - set(f)
            if unknown:
                raise ValueError(
                    f"expression {e.source!r} uses undeclared fields {sorted(unknown)}")
        if self.catalog.id not in self.catalog.fields:
            raise ValueError(f"catalog.id {self.catalog.id!r} is not among catalog.fields")
        cfg = ConfigDict(extra="ignore", allow_inf_nan=False, coerce_numbers_to_str=True)
        title = self.name.title().replace("_", "")
        self.event_model = create_model(  # type: ignore[call-overload]
            f"{title}Event", __config__=cfg,
            **{k: (s.annotation(), ... if s.required else None) for k, s in f.items()},
        )
        self.catalog_model = create_model(  # type: ignore[call-overload]
            f"{title}CatalogRecord", __config__=cfg,
            **{k: (s.annotation(), ... if s.required else None)
               for k, s in self.catalog.fields.items()},
        )
        return self

    @property
    def identity_fields(self) -> tuple[str, ...]:
        return tuple(x for x in (self.identity.user, self.identity.shared) if x)

    def catalog_text(self, record: Mapping[str, Any]) -> str:
        safe = {k: ("" if v is None else v) for k, v in record.items()}
        try:
            text = self.catalog.text.format_map(_Missing(safe))
        except (ValueError, IndexError, AttributeError) as exc:
            raise ValueError(f"catalog text template failed: {exc}") from None
        # collapse the separators that empty fields leave behind
        text = re.sub(r"(\s*[.,;|·-]\s*){2,}", ". ", text)
        return re.sub(r"\s+", " ", text).strip(" .,;|·-")


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return ""


class PlatformRegistry(Mapping[str, Platform]):
    def __init__(self, platforms: Iterable[Platform]) -> None:
        self._p: dict[str, Platform] = {}
        for p in platforms:
            self._p[p.name] = p  # later files override built-ins of the same name

    def __getitem__(self, name: str) -> Platform:
        return self._p[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._p)

    def __len__(self) -> int:
        return len(self._p)

    def require(self, name: str) -> Platform:
        try:
            return self._p[name]
        except KeyError:
            raise ConfigError(
                f"unknown platform {name!r}; configured: {', '.join(sorted(self._p))}. "
                "Add a platform file and point XREC_PLATFORMS_PATH at it."
            ) from None


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
    if path.is_file():
        return [path]
    raise ConfigError(f"platform config path {str(path)!r} does not exist")


def load_platform_file(path: Path) -> Platform:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read platform file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"platform file {path} must hold a mapping")
    try:
        return Platform(**data, source=str(path))
    except ValidationError as exc:
        raise ConfigError(f"platform file {path} is invalid:\n{exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"platform file {path}: {exc}") from None


def load_platforms(extra: str | Iterable[str | Path] = "") -> PlatformRegistry:
    """Built-in platforms plus those in ``extra`` (':'-separated files/folders)."""
    paths: list[Path] = [BUILTIN_DIR]
    if isinstance(extra, str):
        paths += [Path(p) for p in extra.split(":") if p.strip()]
    else:
        paths += [Path(p) for p in extra]
    files = [f for p in paths for f in _files(p)]
    return PlatformRegistry(load_platform_file(f) for f in files)
