"""Online fine-tuning of the heads: a few optimizer steps per micro-batch of examples.

Loss: sampled softmax per platform. The candidates of a positive example are the batch's
other positives of the same platform (in-batch negatives) plus ``uniform_negatives`` items
drawn uniformly from the platform catalog (mixed negative sampling, so fresh and unpopular
items are seen as negatives too). Each candidate's logit is corrected by log Q, its expected
count in the candidate set (batch size × streaming popularity + uniform share), so the
model learns full-softmax scores rather than the sampling distribution.

Every step: AdamW (no decay on embeddings), gradient clipping, then a pull of the weights
toward a slow exponential moving average (``ema_pull``), so a burst of odd traffic cannot
drag the model far from what it knew. A step whose loss or gradient is not finite is
skipped and counted. A replay buffer of recent examples is mixed into each step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from models.heads import HeadsModel, History, ItemTable

__all__ = ["TrainConfig", "Example", "OnlineTrainer"]


@dataclass
class TrainConfig:
    lr: float = 3e-3
    weight_decay: float = 1e-4
    steps: int = 2  # optimizer steps per micro-batch
    replay: int = 8192  # recent examples kept for replay
    replay_share: float = 1.0  # replayed rows per new row in each step
    uniform_negatives: int = 128
    clip: float = 1.0
    ema_decay: float = 0.01  # ema ← ema + decay · (w − ema) after each step
    ema_pull: float = 0.002  # w ← w + pull · (ema − w) after each step
    pop_half_life: float = 20000.0  # examples; streaming popularity for log Q
    seed: int = 0


@dataclass
class Example:
    """One positive interaction with the user's history before it (newest first)."""

    platform: str
    gid: int  # target item (global row)
    history: list[tuple[int, int, float]]  # (gid, label, time)
    time: float
    weight: float = 1.0


@dataclass
class TrainStats:
    steps: int = 0
    skipped_nonfinite: int = 0
    examples: int = 0
    last_loss: float = float("nan")
    step_ms: list[float] = field(default_factory=list)


class OnlineTrainer:
    def __init__(self, model: HeadsModel, table: ItemTable, cfg: TrainConfig | None = None
                 ) -> None:
        self.model = model
        self.table = table
        self.cfg = cfg or TrainConfig()
        self.rng = random.Random(self.cfg.seed)
        self.nprng = np.random.default_rng(self.cfg.seed)
        self.buffer: list[Example] = []
        self.stats = TrainStats()
        self._pop: dict[int, float] = {}
        self._pop_total = 0.0
        self._opt: torch.optim.Optimizer | None = None
        self._opt_params: set[int] = set()
        self._ema: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    def _optimizer(self) -> torch.optim.Optimizer:
        """(Re)built when platforms were added; state of existing parameters is kept."""
        params = dict(self.model.named_parameters())
        if self._opt is not None and {id(p) for p in params.values()} == self._opt_params:
            return self._opt
        old = self._opt
        decay = [p for n, p in params.items() if not n.startswith(("ids.", "bias."))
                 and p.dim() > 1]
        plain = [p for n, p in params.items() if n.startswith(("ids.", "bias.")) or p.dim() <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                 {"params": plain, "weight_decay": 0.0}], lr=self.cfg.lr)
        if old is not None:
            for p in params.values():
                if p in old.state:
                    opt.state[p] = old.state[p]
        self._opt = opt
        self._opt_params = {id(p) for p in params.values()}
        for n, p in params.items():
            if n not in self._ema:
                self._ema[n] = p.detach().clone()
        return opt

    def reset_optimizer(self) -> None:
        self._opt = None
        self._opt_params = set()

    def set_lr(self, lr: float) -> None:
        self.cfg.lr = lr
        if self._opt is not None:
            for g in self._opt.param_groups:
                g["lr"] = lr

    # --------------------------------------------------------------- training
    def _observe(self, ex: list[Example]) -> None:
        f = 2.0 ** (-len(ex) / self.cfg.pop_half_life)
        if f < 1.0:
            self._pop_total *= f
            for k in self._pop:
                self._pop[k] *= f
        for e in ex:
            self._pop[e.gid] = self._pop.get(e.gid, 0.0) + 1.0
            self._pop_total += 1.0

    def learn(self, examples: list[Example]) -> int:
        """Run the configured steps on these examples (+ replay). Returns steps taken."""
        if not examples:
            return 0
        for e in examples:
            self.model.add_platform(e.platform)
        self._observe(examples)
        taken = 0
        for _ in range(self.cfg.steps):
            n_replay = min(len(self.buffer), int(len(examples) * self.cfg.replay_share))
            batch = examples + (self.rng.sample(self.buffer, n_replay) if n_replay else [])
            taken += self.step(batch)
        self.buffer.extend(examples)
        if len(self.buffer) > self.cfg.replay:
            del self.buffer[: len(self.buffer) - self.cfg.replay]
        self.stats.examples += len(examples)
        return taken

    def loss(self, batch: list[Example]) -> torch.Tensor:
        m, table, cfg = self.model, self.table, self.cfg
        dev = m.log_tau.device
        hist = History.build([e.history for e in batch], [e.time for e in batch],
                             [table.platform_index(e.platform) for e in batch],
                             m.cfg.hist_len, m.cfg.gap_buckets)
        q = m.user(table, hist)
        total = torch.zeros((), device=dev)
        weight = 0.0
        by_plat: dict[str, list[int]] = {}
        for i, e in enumerate(batch):
            by_plat.setdefault(e.platform, []).append(i)
        for p, idx in by_plat.items():
            rows = table.rows(p)
            pos = np.asarray([batch[i].gid for i in idx], dtype=np.int64)
            n_uni = min(cfg.uniform_negatives, len(rows))
            uni = rows[self.nprng.integers(0, len(rows), size=n_uni)] if n_uni else pos[:0]
            cand, inv = np.unique(np.concatenate([pos, uni]), return_inverse=True)
            e, bias = m.item_emb(table, cand)
            logits = m.scores(q[torch.as_tensor(idx, device=dev)], e, bias)
            total_pop = max(self._pop_total, 1.0)
            pop = np.asarray([self._pop.get(int(g), 0.0) for g in cand]) / total_pop
            expected = len(pos) * pop + n_uni / max(len(rows), 1)
            logits = logits - torch.as_tensor(np.log(np.maximum(expected, 1e-9)),
                                              dtype=logits.dtype, device=dev)[None]
            target = torch.as_tensor(inv[: len(pos)], device=dev)
            total = total + F.cross_entropy(logits, target, reduction="sum")
            weight += len(idx)
        return total / max(weight, 1.0)

    def step(self, batch: list[Example]) -> int:
        t0 = time.perf_counter()
        self.model.train()
        opt = self._optimizer()
        opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            self.stats.skipped_nonfinite += 1
            return 0
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        if not torch.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            self.stats.skipped_nonfinite += 1
            return 0
        opt.step()
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                ema = self._ema[n]
                if self.cfg.ema_pull:
                    p.lerp_(ema, self.cfg.ema_pull)
                ema.lerp_(p, self.cfg.ema_decay)
        self.model.eval()
        self.stats.steps += 1
        self.stats.last_loss = float(loss.detach())
        self.stats.step_ms.append((time.perf_counter() - t0) * 1000)
        if len(self.stats.step_ms) > 1000:
            del self.stats.step_ms[:500]
        return 1
