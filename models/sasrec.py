"""SASRec (Kang & McAuley, 2018) as a baseline of the prequential harness: a small
self-attentive sequential model over item ids, trained online test-then-train.

What it sees is what xrec sees (:class:`models.baselines.Query`): the user's history on
every platform as of the event, newest first, with each entry's label; nothing else (no
item text). The sequence, oldest to newest, is

    [item₁ + label₁ + pos, …, itemₙ + labelₙ + pos, platform token + pos]

where the last token asks "what next on this platform?" and its output, after ``blocks``
pre-norm Transformer blocks (single-head by default, as in the paper), is the user vector.
An item's score is that vector's dot product with the item's input embedding (shared, as in
SASRec). Items are the harness's global item rows, so sequences cross platforms.

Training: per micro-batch, after it is ranked, the same budget as xrec's trainer
(:class:`models.trainer.TrainConfig`): ``steps`` optimizer steps, each on the batch's
positives plus as many replayed earlier examples (``replay_share``, buffer ``replay``);
loss = full softmax over the target platform's catalog (no negative sampling), Adam.
The learning rate is one of the few settings chosen on the warm-up (``models.baselines.Tuned``).

Departures from the paper, for the stream: the label of each history entry is added to
its embedding (xrec sees labels too); the next-item question is a platform token, not the
last item's position; the loss is over the target platform's full catalog rather than
one sampled negative; dropout is applied to the embeddings only (on this CPU, dropout
inside the blocks cost ~40% of a step).

Its own random generator (initialisation, dropout, replay sampling), so adding it to a run
changes no other method's figures.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.baselines import Method, Query
from models.heads import ItemTable

__all__ = ["SASRecConfig", "SASRec"]


@dataclass
class SASRecConfig:
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 50  # history entries fed (newest), besides the platform token
    dropout: float = 0.2
    lr: float = 1e-3
    capacity: int = 12000  # item rows; later items share one "unknown" row
    max_platforms: int = 16
    steps: int = 2  # optimizer steps per micro-batch (xrec's TrainConfig.steps)
    replay: int = 8192  # xrec's TrainConfig.replay
    replay_share: float = 1.0  # xrec's TrainConfig.replay_share
    seed: int = 0


class _Net(nn.Module):
    PAD, UNK = 0, 1  # item rows 0 and 1; item gid g is row g + 2

    def __init__(self, c: SASRecConfig) -> None:
        super().__init__()
        self.c = c
        self.item = nn.Embedding(c.capacity + 2, c.dim, padding_idx=self.PAD)
        self.label = nn.Embedding(3, c.dim)  # 0: padding / platform token, 1: neg, 2: pos
        self.plat = nn.Embedding(c.max_platforms, c.dim)
        self.pos = nn.Embedding(c.max_len + 1, c.dim)  # distance from the platform token
        # dropout on the embeddings only: inside the blocks it cost ~40% of a CPU step
        # (Bernoulli masks on [batch, 51, 64] and [batch, 51, 51]); SASRec drops out both
        layer = nn.TransformerEncoderLayer(c.dim, c.heads, dim_feedforward=c.dim,
                                           dropout=0.0, activation="relu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.drop = nn.Dropout(c.dropout)
        nn.init.normal_(self.item.weight, std=c.dim ** -0.5)
        with torch.no_grad():
            self.item.weight[self.PAD].zero_()

    def rows(self, gids: np.ndarray) -> np.ndarray:
        r = gids.astype(np.int64) + 2
        r[r >= self.c.capacity + 2] = self.UNK
        return r

    def user(self, items: torch.Tensor, labels: torch.Tensor, plat: torch.Tensor
             ) -> torch.Tensor:
        """items, labels: [B, L] (left-padded, newest last); plat: [B] → [B, dim]."""
        b, n = items.shape
        x = torch.cat([self.item(items) + self.label(labels),
                       self.plat(plat)[:, None, :]], dim=1)
        dist = torch.arange(n, -1, -1, device=items.device)  # the platform token: 0
        x = self.drop(x * self.c.dim ** 0.5 + self.pos(dist)[None])
        pad = torch.cat([items == self.PAD, torch.zeros(b, 1, dtype=torch.bool,
                                                        device=items.device)], dim=1)
        h = self.blocks(x, src_key_padding_mask=pad)
        return self.norm(h[:, -1])  # type: ignore[no-any-return]


@dataclass
class _Example:
    platform: str
    gid: int
    history: list[tuple[int, int, float]]


class SASRec(Method):
    name = "sasrec"

    def __init__(self, table: ItemTable, cfg: SASRecConfig | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.t, self.c = table, cfg or SASRecConfig()
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.c.seed)
            self.net = _Net(self.c).to(self.device)
            self._rng_state = torch.get_rng_state()
        self.net.eval()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.c.lr)
        self.rng = random.Random(self.c.seed)
        self.buffer: list[_Example] = []
        self.steps = 0
        self.step_ms: list[float] = []

    def params(self) -> dict[str, object]:
        c = self.c
        return {"lr": c.lr, "dim": c.dim, "blocks": c.blocks, "max_len": c.max_len,
                "steps_per_batch": c.steps}

    def _plat(self, p: str) -> int:
        i = self.t.platform_index(p)
        if i >= self.c.max_platforms:
            raise ValueError(f"sasrec: more than {self.c.max_platforms} platforms")
        return i

    def _encode(self, hists: Sequence[list[tuple[int, int, float]]], plats: Sequence[str]
                ) -> torch.Tensor:
        n = self.c.max_len
        gids = np.full((len(hists), n), -2, dtype=np.int64)  # -2 → row 0 (padding)
        labels = np.zeros((len(hists), n), dtype=np.int64)
        for r, h in enumerate(hists):
            h = h[:n]  # newest first
            k = len(h)
            if k:
                gids[r, n - k:] = [g for g, _, _ in reversed(h)]
                labels[r, n - k:] = [2 if lab else 1 for _, lab, _ in reversed(h)]
        rows = np.where(gids < 0, _Net.PAD, self.net.rows(np.maximum(gids, 0)))
        dev = self.device
        return self.net.user(torch.as_tensor(rows, device=dev),
                             torch.as_tensor(labels, device=dev),
                             torch.as_tensor([self._plat(p) for p in plats], device=dev))

    def _item_emb(self, p: str) -> tuple[np.ndarray, torch.Tensor]:
        gids = self.t.rows(p)
        rows = torch.as_tensor(self.net.rows(np.asarray(gids)), device=self.device)
        return gids, self.net.item(rows)

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        with torch.inference_mode():
            u = self._encode([q.history for q in qs], [p] * len(qs))
            _, e = self._item_emb(p)
            return (u @ e.T).float().cpu().numpy()  # type: ignore[no-any-return]

    def learn(self, qs: list[Query], batch: Sequence[object]) -> None:
        new = [_Example(q.platform, q.gid, q.history) for q in qs if q.label]
        if not new:
            return
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            for _ in range(self.c.steps):
                k = min(len(self.buffer), int(len(new) * self.c.replay_share))
                self._step(new + (self.rng.sample(self.buffer, k) if k else []))
            self._rng_state = torch.get_rng_state()
        self.buffer.extend(new)
        if len(self.buffer) > self.c.replay:
            del self.buffer[: len(self.buffer) - self.c.replay]

    def _step(self, ex: list[_Example]) -> None:
        t0 = time.perf_counter()
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        u = self._encode([e.history for e in ex], [e.platform for e in ex])
        by_plat: dict[str, list[int]] = {}
        for i, e in enumerate(ex):
            by_plat.setdefault(e.platform, []).append(i)
        loss = torch.zeros((), device=self.device)
        for p, idx in by_plat.items():
            _, emb = self._item_emb(p)  # columns in the platform's local order
            target = torch.as_tensor([int(self.t.local[ex[i].gid]) for i in idx],
                                     device=self.device)
            logits = u[torch.as_tensor(idx, device=self.device)] @ emb.T
            loss = loss + F.cross_entropy(logits, target, reduction="sum")
        loss = loss / len(ex)
        if torch.isfinite(loss):
            loss.backward()
            nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            self.steps += 1
        self.net.eval()
        self.step_ms.append((time.perf_counter() - t0) * 1000)
        if len(self.step_ms) > 1000:
            del self.step_ms[:500]
