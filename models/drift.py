"""Drift: per-platform signals, river detectors on them, and the reactions they trigger.

Signals, per platform, from the stream the recommender already sees:

==============  =======================================  ===============================
signal          value per step                           detector (why)
==============  =======================================  ===============================
``hit``         1 if a new positive ranked in the top    ADWIN (delta 1e-4): a Bernoulli
                10 before the model learned it (the      stream whose mean drops when tastes
                prequential stream), else 0              move; ADWIN adapts its window and
                                                         bounds false alarms by delta
``labels``      1 if the event is a positive, else 0     ADWIN (delta 1e-4): same shape,
                                                         either direction
``popularity``  Jensen-Shannon divergence between the    self-calibrated threshold (see
                item distribution of the last            below): a distance to a reference
                ``window`` positives and the reference   is not a mean to test
``centroid``    cosine distance between the mean text    idem
                vector of the last ``window`` positives
                and the reference's
==============  =======================================  ===============================

The two distance signals are compared with their own noise: while the reference window
fills, the monitor measures the distance between consecutive windows of the same,
drift-free traffic (windows disjoint from the reference, over ``calibration_checks``
checks) and sets the alarm above the largest of them by ``k`` × their spread (plus a floor),
``persist`` checks in a row. This
self-calibration is what keeps false alarms near zero on streams whose natural JS level
depends on catalog size and traffic. (river's PageHinkley on the raw distance series was
tried first: its default thresholds fire on the slow rise of JS as a window fills.)

When a detector fires, the monitor emits a :class:`Signal`, and (reactions on) the
platform's reference is refreshed once the new regime has filled a window, so one change
gives one alarm, not a stream of them.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DriftConfig", "Signal", "DriftMonitor", "PlatformMonitor", "js_divergence",
           "ReactionConfig", "Reactions"]


@dataclass
class DriftConfig:
    window: int = 300  # positives per platform in a distribution / centroid window
    check_every: int = 50  # events between distance checks
    k: float = 3.0  # alarm above the largest in-regime distance + k × their spread
    k_centroid: float = 5.0  # the centroid distance wanders more (a few heavy items move it)
    floor_js: float = 0.03
    floor_centroid: float = 0.02
    adwin_delta: float = 1e-4  # labels: either direction, so strict
    hit_delta: float = 2e-3  # hit: river's default; drops only, so false alarms stay rare
    adwin_clock: int = 32
    min_events: int = 2000  # per platform before any alarm (the reference must exist)
    cooldown: int = 2000  # events after an alarm before the same signal may fire again
    calibration_checks: int = 10  # disjoint-window distances measured before alarms
    persist: int = 3  # checks in a row above the level before a distance signal fires
    signals: tuple[str, ...] = ("hit", "labels", "popularity", "centroid")


@dataclass
class Signal:
    platform: str
    signal: str
    detector: str
    value: float
    reference: float
    window: int
    event_index: int  # per-platform event count when it fired
    stream_index: int  # global event count when it fired
    time: float


def js_divergence(p: Counter[str], q: Counter[str]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two count distributions."""
    np_, nq = sum(p.values()), sum(q.values())
    if not np_ or not nq:
        return 0.0
    keys = set(p) | set(q)
    a = np.array([p.get(k, 0) / np_ for k in keys])
    b = np.array([q.get(k, 0) / nq for k in keys])
    m = 0.5 * (a + b)
    with np.errstate(divide="ignore", invalid="ignore"):
        ka = np.where(a > 0, a * np.log2(a / m), 0.0).sum()
        kb = np.where(b > 0, b * np.log2(b / m), 0.0).sum()
    return float(0.5 * (ka + kb))


def _adwin(delta: float, clock: int) -> Any:
    from river import drift

    return drift.ADWIN(delta=delta, clock=clock)


@dataclass
class _Distance:
    """A distance-to-reference signal with a self-calibrated alarm level."""

    floor: float
    k: float
    noise: list[float] = field(default_factory=list)
    last_fire: int = -(10**9)
    above: int = 0  # consecutive checks above the level

    @property
    def level(self) -> float:
        """The largest in-regime distance plus ``k`` times the spread of those distances.

        Additive, not a multiple: both distances are biased upward by sampling (a sparse
        300-item window is far from its own regime's distribution: JS ≈ 0.3 with 360 items),
        so what separates a change from noise is the spread above that bias."""
        if not self.noise:
            return self.floor
        hi, lo = float(np.max(self.noise)), float(np.min(self.noise))
        return max(hi + self.k * (hi - lo), self.floor)


class PlatformMonitor:
    def __init__(self, platform: str, cfg: DriftConfig) -> None:
        self.p, self.cfg = platform, cfg
        self.n = 0
        self.det: dict[str, Any] = {
            s: _adwin(cfg.hit_delta if s == "hit" else cfg.adwin_delta, cfg.adwin_clock)
            for s in ("hit", "labels") if s in cfg.signals}
        self.last_fire: dict[str, int] = {}
        self.items: deque[str] = deque(maxlen=cfg.window)
        self.vecs: deque[np.ndarray] = deque(maxlen=cfg.window)
        # the windows' running counts and vector sum (a check reads them, not the windows:
        # stacking 300 vectors every 50 events was ~4% of the recommend agent's batch)
        self.counts: Counter[str] = Counter()
        self.vsum: np.ndarray | None = None
        self.vadds = 0  # vectors added since vsum was last summed afresh
        self.ref_items: Counter[str] | None = None
        self.ref_centroid: np.ndarray | None = None
        self.dist = {"popularity": _Distance(cfg.floor_js, cfg.k),
                     "centroid": _Distance(cfg.floor_centroid, cfg.k_centroid)}
        self.pending_refresh: int | None = None  # refresh the reference at this count
        self.values: dict[str, float] = {}
        self.pos = 0  # positives seen (windows are made of positives)
        self.ref_pos = 0  # positives seen when the reference was taken

    # ---------------------------------------------------------------- inputs
    def observe(self, item: str, label: int, vec: np.ndarray | None, hit: int | None,
                stream_index: int, now: float) -> list[Signal]:
        cfg = self.cfg
        self.n += 1
        out: list[Signal] = []
        if "labels" in self.det:
            out += self._adwin_update("labels", float(label), stream_index, now)
        if hit is not None and "hit" in self.det:
            out += self._adwin_update("hit", float(hit), stream_index, now)
        if label:
            self.pos += 1
            items, counts = self.items, self.counts
            if len(items) == items.maxlen:
                old = items[0]
                if counts[old] <= 1:
                    del counts[old]
                else:
                    counts[old] -= 1
            items.append(item)
            counts[item] += 1
            if vec is not None:
                self._add_vec(vec)
        if self.n % cfg.check_every == 0:
            out += self._distances(stream_index, now)
        return out

    def _adwin_update(self, name: str, x: float, stream_index: int, now: float
                      ) -> list[Signal]:
        d = self.det[name]
        before = d.estimation if d.width else x
        d.update(x)
        self.values[name] = float(d.estimation)
        if not d.drift_detected or self.n < self.cfg.min_events:
            return []
        if name == "hit" and d.estimation >= before:
            return []  # the model got better (it is learning): not a drift to react to
        if self.n - self.last_fire.get(name, -(10**9)) < self.cfg.cooldown:
            return []
        self.last_fire[name] = self.n
        self._schedule_refresh()
        return [Signal(self.p, name, "ADWIN", float(d.estimation), float(before), int(d.width),
                       self.n, stream_index, now)]

    def _add_vec(self, vec: np.ndarray) -> None:
        vecs = self.vecs
        v = np.asarray(vec, dtype=np.float64)
        if self.vsum is None or self.vsum.shape != v.shape or \
                self.vadds >= 8 * (vecs.maxlen or 1):
            vecs.append(vec)
            # summed afresh now and then, so rounding does not accumulate
            self.vsum = np.sum(np.stack(list(vecs)), axis=0, dtype=np.float64)
            self.vadds = 0
            return
        if len(vecs) == vecs.maxlen:
            self.vsum -= vecs[0]
        vecs.append(vec)
        self.vsum += v
        self.vadds += 1

    def _window_stats(self) -> tuple[Counter[str], np.ndarray | None]:
        cen = None
        if self.vecs and self.vsum is not None:
            m = self.vsum / len(self.vecs)
            nrm = float(np.linalg.norm(m))
            cen = m / nrm if nrm > 0 else None
        return self.counts, cen  # live: copy what must stay (the reference)

    def _distances(self, stream_index: int, now: float) -> list[Signal]:
        cfg = self.cfg
        if len(self.items) < cfg.window:
            return []
        cur_items, cur_cen = self._window_stats()
        if (self.pending_refresh is not None and self.n >= self.pending_refresh) or \
                self.ref_items is None:
            self.ref_items, self.ref_centroid = Counter(cur_items), cur_cen
            self.ref_pos = self.pos
            self.pending_refresh = None
            for d in self.dist.values():
                d.noise = []
            return []
        if self.pos < self.ref_pos + cfg.window:
            return []  # the window still overlaps the reference: distances mean nothing
        out = []
        vals = {"popularity": js_divergence(cur_items, self.ref_items)}
        if cur_cen is not None and self.ref_centroid is not None:
            vals["centroid"] = 1.0 - float(cur_cen @ self.ref_centroid)
        # the first checks after the reference, on windows disjoint from it, measure the
        # distance between two windows of one regime: the noise the alarm is set against
        calibrating = len(self.dist["popularity"].noise) < cfg.calibration_checks
        for name, v in vals.items():
            if name not in cfg.signals:
                continue
            self.values[name] = v
            d = self.dist[name]
            if calibrating:
                # drift-free by assumption: the distance of windows of the same regime
                d.noise.append(v)
                continue
            d.above = d.above + 1 if v > d.level else 0
            if d.above >= cfg.persist and self.n >= cfg.min_events and \
                    self.n - d.last_fire >= cfg.cooldown:
                d.last_fire = self.n
                d.above = 0
                self._schedule_refresh()
                out.append(Signal(self.p, name, f"threshold {d.k:g}×noise", v, d.level,
                                  cfg.window, self.n, stream_index, now))
        return out

    def _schedule_refresh(self) -> None:
        # the new regime's reference: a full window after the alarm
        self.pending_refresh = self.n + self.cfg.window


class DriftMonitor:
    """All platforms. Feed every interaction (and its prequential hit when ranked).

    Besides one monitor per platform, the hit signal of all platforms together goes to an
    ``all`` monitor: a change that hits every platform (tastes moving) is seen three times
    sooner in the pooled stream than in any one platform's."""

    def __init__(self, cfg: DriftConfig | None = None) -> None:
        from dataclasses import replace

        self.cfg = cfg or DriftConfig()
        self.platforms: dict[str, PlatformMonitor] = {}
        self.overall = PlatformMonitor("all", replace(self.cfg, signals=("hit",)))
        self.n = 0
        self.signals: list[Signal] = []

    def observe(self, platform: str, item: str, label: int, vec: np.ndarray | None = None,
                hit: int | None = None, now: float = 0.0) -> list[Signal]:
        self.n += 1
        pm = self.platforms.get(platform)
        if pm is None:
            pm = self.platforms[platform] = PlatformMonitor(platform, self.cfg)
        out = pm.observe(item, label, vec, hit, self.n, now)
        if hit is not None and "hit" in self.cfg.signals:
            self.overall.n += 1
            out += self.overall._adwin_update("hit", float(hit), self.n, now)
        self.signals += out
        return out

    def values(self) -> dict[str, dict[str, float]]:
        return {p: {k: round(v, 6) for k, v in pm.values.items() if math.isfinite(v)}
                for p, pm in [*self.platforms.items(), ("all", self.overall)] if pm.values}


@dataclass
class ReactionConfig:
    """What the trainer does when drift is detected on a platform (per platform, in its
    config file's ``drift:`` block; ``enabled: false`` is the off switch)."""

    enabled: bool = True
    lr_factor: float = 3.0  # learning rate × this ...
    boost_examples: int = 3000  # ... for this many training examples
    forget_replay: bool = True  # drop replayed examples of the old regime
    reanchor_ema: bool = True  # the slow EMA the weights are pulled to restarts from now
    reset_optimizer: bool = False  # forget Adam's moments (measured: slows recovery here)
    #: users' histories before the alarm stop counting (the served model reads only what
    #: came after), for this many seconds of event time; 0 = off
    history_horizon_s: float = 86400.0
    # not labels by default: a changed positive rate is no reason to forget what was learned
    # (measured: reacting to it made recovery 6× slower)
    signals: tuple[str, ...] = ("hit", "popularity", "centroid")
    #: which reaction answers which signal: a hit-rate drop means users now act unlike their
    #: history (→ history horizon); a moved item distribution means the weights must move
    #: (→ learning-rate boost, replay flush, EMA re-anchor)
    horizon_signals: tuple[str, ...] = ("hit",)
    weight_signals: tuple[str, ...] = ("popularity", "centroid")


class Reactions:
    """Applies reactions to an :class:`models.trainer.OnlineTrainer`; one code path for the
    worker's train agent and the benchmark."""

    def __init__(self, trainer: Any, cfg: dict[str, ReactionConfig] | None = None,
                 default: ReactionConfig | None = None,
                 horizon: Any = None) -> None:
        self.trainer = trainer
        self.horizon = horizon  # callable(platform, seconds) for the history horizon
        self.cfg = cfg or {}
        self.default = default or ReactionConfig()
        self.base_lr = trainer.cfg.lr
        self.boost_left = 0
        self.log: list[dict[str, Any]] = []

    def for_platform(self, p: str) -> ReactionConfig:
        return self.cfg.get(p, self.default)

    def react(self, platform: str, signal: str) -> dict[str, Any] | None:
        rc = self.for_platform(platform)
        if not rc.enabled or signal not in rc.signals:
            return None
        done = []
        if signal in rc.horizon_signals and rc.history_horizon_s > 0 and \
                self.horizon is not None:
            self.horizon(platform, rc.history_horizon_s)
            done.append(f"histories from now on only, for {rc.history_horizon_s:g} s")
        if signal not in rc.weight_signals:
            return self._log(platform, signal, done)
        if rc.lr_factor != 1.0 and rc.boost_examples > 0:
            self.trainer.set_lr(self.base_lr * rc.lr_factor)
            self.boost_left = rc.boost_examples
            done.append(f"lr×{rc.lr_factor:g} for {rc.boost_examples} examples")
        if rc.forget_replay:
            n = self.trainer.forget_replay()
            done.append(f"replay buffer cleared ({n} old examples)")
        if rc.reanchor_ema:
            self.trainer.reanchor_ema()
            done.append("EMA re-anchored")
        if rc.reset_optimizer:
            self.trainer.reset_optimizer()
            done.append("optimizer reset")
        return self._log(platform, signal, done)

    def _log(self, platform: str, signal: str, done: list[str]) -> dict[str, Any] | None:
        if not done:
            return None
        entry = {"platform": platform, "signal": signal, "actions": done}
        self.log.append(entry)
        return entry

    def tick(self, examples: int) -> bool:
        """After learning ``examples``: end the boost when it ran out. True when it ended."""
        if self.boost_left <= 0:
            return False
        self.boost_left -= examples
        if self.boost_left <= 0:
            self.trainer.set_lr(self.base_lr)
            return True
        return False
