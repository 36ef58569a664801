"""The learned model: a shared user tower and small per-platform heads over frozen text vectors.

::

    item  e(p, i) = norm( (A + A_p) · text(i) + ID_p[hash(i)] )     A_p: per-platform adapter
                    (text centred on its platform's mean; A shared, A_p starts at zero)
                    (+ bias_p[hash(i)] added to the score)           ID_p: hashed id rows
    user  tokens  = [start_p] + last L interactions on ALL platforms:
                    e(p_j, i_j) + platform_j + label_j + position_j + time-gap bucket_j
          u       = attention pooling with a per-platform query c_p, then MLP (shared)
          q_p(u)  = norm( u + Q_p · u )                               Q_p: query projection
    score(u,p,i)  = τ · <q_p(u), e(p,i)> + bias_p[hash(i)]

*Heads* are the per-platform parameters (A_p, Q_p, c_p, start_p, ID_p with bias_p as its
last column): they are
what is fine-tuned online; the language model never is. The user tower and the platform,
label, position and gap embeddings are shared by all platforms (joint training), which is
what carries a user's music history into video and shop rankings. A platform that appears
later gets heads initialised from the average of the existing ones.

Items are addressed by a global row (gid) in :class:`ItemTable`, which holds every known
item's text vector (zeros for items without text) and id-hash bucket.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "ItemTable", "HeadsModel", "History", "ServingTower", "gap_bucket",
           "stable_bucket",
           "save_model", "load_model", "pick_device"]


@dataclass
class ModelConfig:
    text_dim: int = 384
    dim: int = 64
    hist_len: int = 50
    buckets: int = 1 << 15  # hashed id rows per platform
    gap_buckets: int = 16  # log2 time-gap buckets (seconds)
    max_platforms: int = 32
    platform_attention: bool = True  # attention query per target platform (else shared)
    seed: int = 0


def pick_device(want: str = "auto") -> torch.device:
    if want == "cpu":
        return torch.device("cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def stable_bucket(item: str, buckets: int) -> int:
    """Process-independent hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(),
                          "little") % buckets


def gap_bucket(gap_s: np.ndarray | float, n: int) -> np.ndarray:
    """0 for gaps under 2 s, then one bucket per doubling, capped at n - 1."""
    g = np.maximum(np.asarray(gap_s, dtype=np.float64), 1.0)
    return np.minimum(np.log2(g).astype(np.int64), n - 1)


class ItemTable:
    """Every item the model knows, all platforms, in one table of global rows (gid)."""

    def __init__(self, text_dim: int, buckets: int) -> None:
        self.text_dim = text_dim
        self.buckets = buckets
        self.platforms: list[str] = []
        self.gid: dict[tuple[str, str], int] = {}
        self.ids: list[str] = []
        self.plat: list[int] = []
        self.bucket: list[int] = []
        self.has_text: list[bool] = []
        self.local: list[int] = []  # position of the row within its platform's catalog
        self._text = np.zeros((0, text_dim), dtype=np.float32)
        self._rows_by_plat: dict[int, list[int]] = {}
        self._cache: dict[int, np.ndarray] = {}
        self._cols: dict[int, dict[str, int]] = {}
        self._means: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def platform_index(self, p: str) -> int:
        if p not in self.platforms:
            self.platforms.append(p)
        return self.platforms.index(p)

    def ensure(self, p: str, item: str) -> int:
        key = (p, item)
        g = self.gid.get(key)
        if g is not None:
            return g
        g = len(self.ids)
        pi = self.platform_index(p)
        if g >= self._text.shape[0]:
            grown = np.zeros((max(256, 2 * self._text.shape[0]), self.text_dim), np.float32)
            grown[:g] = self._text[:g]
            self._text = grown
        self.gid[key] = g
        self.ids.append(item)
        self.plat.append(pi)
        self.bucket.append(stable_bucket(item, self.buckets))
        self.has_text.append(False)
        rows = self._rows_by_plat.setdefault(pi, [])
        self.local.append(len(rows))
        rows.append(g)
        self._cache.pop(pi, None)
        self._cols.pop(pi, None)
        return g

    def set_text(self, p: str, items: Sequence[str], vecs: np.ndarray) -> None:
        vecs = np.asarray(vecs, dtype=np.float32).reshape(len(items), self.text_dim)
        for item, v in zip(items, vecs, strict=True):
            g = self.ensure(p, item)
            self._text[g] = v
            self.has_text[g] = True
        self._means.pop(self.platform_index(p), None)

    @property
    def text(self) -> np.ndarray:
        return self._text[: len(self.ids)]

    def centered(self, gids: np.ndarray) -> np.ndarray:
        """Text vectors minus their platform's mean text vector (zeros for items without text).

        Every platform's texts share a style (all track titles look alike to a language
        model); removing the platform mean leaves what tells items apart, so a space film
        lands nearer space music than near other films.
        """
        gids = np.asarray(gids, dtype=np.int64)
        out = self.text[gids].copy()
        plat = np.asarray(self.plat, dtype=np.int64)[gids]
        has = np.asarray(self.has_text, dtype=bool)[gids]
        for pi in np.unique(plat):
            m = self._means.get(int(pi))
            if m is None:
                rows = np.asarray(self._rows_by_plat.get(int(pi), []), dtype=np.int64)
                ht = rows[np.asarray(self.has_text, dtype=bool)[rows]] if len(rows) else rows
                m = self.text[ht].mean(0) if len(ht) else np.zeros(self.text_dim, np.float32)
                self._means[int(pi)] = m
            sel = (plat == pi) & has
            out[sel] -= m
        return out

    def snapshot(self) -> ItemTable:
        """The rows so far, for reading in another thread while this table keeps growing.

        Rows are only ever appended, so the text matrix is shared, not copied; a row whose
        text :meth:`set_text` replaces later is the caller's to notice (by its own stamp).
        """
        s = ItemTable.__new__(ItemTable)
        s.text_dim, s.buckets = self.text_dim, self.buckets
        n = len(self.ids)
        s.platforms = list(self.platforms)
        s.gid = {}
        s.ids, s.plat, s.bucket = self.ids[:n], self.plat[:n], self.bucket[:n]
        s.has_text, s.local = self.has_text[:n], self.local[:n]
        s._text = self._text
        s._rows_by_plat = {k: list(v) for k, v in self._rows_by_plat.items()}
        s._cache, s._means, s._cols = {}, {}, {}
        return s

    def columns(self, p: str) -> dict[str, int]:
        """item id → its column in the platform's catalog (:meth:`rows` order; cached
        until an item is added)."""
        pi = self.platform_index(p)
        hit = self._cols.get(pi)
        if hit is None:
            ids = self.ids
            hit = self._cols[pi] = {ids[g]: c for c, g in enumerate(
                self._rows_by_plat.get(pi, []))}
        return hit

    def rows(self, p: str) -> np.ndarray:
        """The platform's catalog as global rows (cached until an item is added)."""
        pi = self.platform_index(p)
        hit = self._cache.get(pi)
        if hit is None:
            hit = np.asarray(self._rows_by_plat.get(pi, []), dtype=np.int64)
            self._cache[pi] = hit
        return hit


@dataclass
class History:
    """A batch of users' histories (newest first), padded to L, as numpy arrays."""

    gid: np.ndarray  # [B, L] int64, -1 = padding
    label: np.ndarray  # [B, L] int64
    gap: np.ndarray  # [B, L] int64 (bucket of now - t_j)
    target_plat: np.ndarray  # [B] int64

    @staticmethod
    def build(rows: Sequence[Sequence[tuple[int, int, float]]], now: Sequence[float],
              target_plat: Sequence[int], hist_len: int, gap_buckets: int) -> History:
        """rows[b] = [(gid, label, time), ...] newest first (one array pass, no row loop)."""
        b = len(rows)
        gid = np.full((b, hist_len), -1, dtype=np.int64)
        label = np.zeros((b, hist_len), dtype=np.int64)
        t = np.zeros((b, hist_len), dtype=np.float64)
        lens = np.fromiter((min(len(h), hist_len) for h in rows), dtype=np.int64, count=b)
        total = int(lens.sum())
        if total:
            flat = np.asarray(list(chain.from_iterable(h[:hist_len] for h in rows)),
                              dtype=np.float64).reshape(total, 3)
            r = np.repeat(np.arange(b), lens)
            c = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
            gid[r, c] = flat[:, 0].astype(np.int64)
            label[r, c] = flat[:, 1].astype(np.int64)
            t[r, c] = flat[:, 2]
        gap = gap_bucket(np.asarray(now, dtype=np.float64)[:, None] - t, gap_buckets)
        return History(gid, label, gap, np.asarray(target_plat, dtype=np.int64))


class HeadsModel(nn.Module):
    def __init__(self, cfg: ModelConfig, platforms: Iterable[str] = ()) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        d = cfg.dim
        self.platforms: list[str] = []
        # heads (per platform)
        self.adapter = nn.ModuleDict()
        self.query = nn.ModuleDict()
        self.ctx = nn.ParameterDict()
        self.start = nn.ParameterDict()
        self.ids = nn.ParameterDict()  # [buckets, dim + 1]: embedding, then the score bias
        # shared: the text adapter every platform starts from (its head adds a residual)
        self.text_adapter = nn.Linear(cfg.text_dim, d)
        # shared user tower
        self.plat_emb = nn.Embedding(cfg.max_platforms, d)
        self.label_emb = nn.Embedding(2, d)
        self.pos_emb = nn.Embedding(cfg.hist_len + 1, d)
        self.gap_emb = nn.Embedding(cfg.gap_buckets, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.log_tau = nn.Parameter(torch.tensor(math.log(10.0)))
        for m in (self.plat_emb, self.label_emb, self.pos_emb, self.gap_emb):
            nn.init.normal_(m.weight, std=0.02)
        # start as "the user is the mean of their items": value = identity, MLP residual = 0,
        # so an untrained model already ranks by text similarity (+ learned popularity bias)
        nn.init.eye_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        for p in platforms:
            self.add_platform(p)

    # ------------------------------------------------------------------ heads
    def add_platform(self, p: str) -> None:
        """New heads, initialised from the average of the existing ones (cold start)."""
        if p in self.platforms:
            return
        if len(self.platforms) >= self.cfg.max_platforms:
            raise ValueError(f"more than {self.cfg.max_platforms} platforms")
        d, cfg = self.cfg.dim, self.cfg
        dev = self.log_tau.device
        adapter, query = nn.Linear(cfg.text_dim, d), nn.Linear(d, d)
        nn.init.zeros_(adapter.weight)  # residual on the shared adapter: starts at zero
        nn.init.zeros_(adapter.bias)
        nn.init.normal_(query.weight, std=0.02)
        nn.init.zeros_(query.bias)
        ctx = torch.randn(d) * 0.02
        start = torch.randn(d) * 0.02
        if self.platforms:
            with torch.no_grad():
                for name, mod in (("adapter", adapter), ("query", query)):
                    peers = [getattr(self, name)[q] for q in self.platforms]
                    mod.weight.copy_(torch.stack([m.weight for m in peers]).mean(0))
                    mod.bias.copy_(torch.stack([m.bias for m in peers]).mean(0))
                ctx = torch.stack([self.ctx[q] for q in self.platforms]).mean(0).cpu()
                start = torch.stack([self.start[q] for q in self.platforms]).mean(0).cpu()
        self.adapter[p] = adapter.to(dev)
        self.query[p] = query.to(dev)
        self.ctx[p] = nn.Parameter(ctx.to(dev))
        self.start[p] = nn.Parameter(start.to(dev))
        self.ids[p] = nn.Parameter(torch.zeros(cfg.buckets, d + 1, device=dev))
        self.platforms.append(p)

    def head_parameters(self, p: str) -> list[nn.Parameter]:
        return [*self.adapter[p].parameters(), *self.query[p].parameters(), self.ctx[p],
                self.start[p], self.ids[p]]

    # ------------------------------------------------------------------ items
    def item_emb(self, table: ItemTable, gids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised embeddings [n, d], score bias [n]) of global rows ``gids``."""
        dev = self.log_tau.device
        gids = np.asarray(gids, dtype=np.int64)
        out = torch.zeros(len(gids), self.cfg.dim, device=dev)
        bias = torch.zeros(len(gids), device=dev)
        plat = np.asarray(table.plat, dtype=np.int64)[gids] if len(gids) else gids
        bucket = np.asarray(table.bucket, dtype=np.int64)
        for pi in np.unique(plat):
            name = table.platforms[int(pi)]
            sel = np.nonzero(plat == pi)[0]
            g = gids[sel]
            txt = torch.from_numpy(table.centered(g)).to(dev)
            b = torch.from_numpy(bucket[g]).to(dev)
            # sparse gradients: an optimizer step touches only the rows in the batch
            row = F.embedding(b, self.ids[name], sparse=True)
            e = self.text_adapter(txt) + self.adapter[name](txt) + row[:, :-1]
            idx = torch.from_numpy(sel).to(dev)
            out = out.index_copy(0, idx, e)
            bias = bias.index_copy(0, idx, row[:, -1])
        return F.normalize(out, dim=-1), bias

    # ------------------------------------------------------------------ users
    def user(self, table: ItemTable, h: History, items: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Normalised platform-specific query vectors [B, d] (target platform per row).

        ``items``: every table row's embedding, precomputed (serving, no gradients).
        """
        dev = self.log_tau.device
        b, seq = h.gid.shape
        valid = h.gid >= 0
        flat = h.gid[valid]
        tok = torch.zeros(b, seq, self.cfg.dim, device=dev)
        if flat.size:
            uniq, inv = np.unique(flat, return_inverse=True)
            if items is not None and int(uniq[-1]) < items.shape[0]:
                e = items[torch.from_numpy(uniq).to(dev)]
            else:
                e, _ = self.item_emb(table, uniq)
            hp = np.asarray(table.plat, dtype=np.int64)[uniq]
            e = e + self.plat_emb(torch.from_numpy(hp).to(dev))
            mask = torch.from_numpy(valid).to(dev)
            tok[mask] = e[torch.from_numpy(inv).to(dev)]
        pos = torch.arange(1, seq + 1, device=dev)
        tok = tok + self.label_emb(torch.from_numpy(h.label).to(dev)) + self.pos_emb(pos)[None] \
            + self.gap_emb(torch.from_numpy(h.gap).to(dev))
        # per-row target heads: gather from the heads present in this batch only (a head
        # that is not in the batch gets no gradient, not a zero one: AdamW would move it)
        uniq_t, inv_t = np.unique(h.target_plat, return_inverse=True)
        names = [table.platforms[int(i)] for i in uniq_t]
        row_head = torch.from_numpy(inv_t.reshape(-1)).to(dev)
        start = torch.stack([self.start[n] for n in names])[row_head] + self.pos_emb.weight[0]
        ctx = torch.stack([self.ctx[n] for n in names])[row_head] \
            if self.cfg.platform_attention else self.ctx[self.platforms[0]].expand(b, -1)
        tok = torch.cat([start[:, None], tok], dim=1)  # [B, 1+L, d]
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev),
                          torch.from_numpy(valid).to(dev)], dim=1)
        att = (self.key(tok) * ctx[:, None]).sum(-1) / math.sqrt(self.cfg.dim)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=1)
        u = (att[..., None] * self.value(tok)).sum(1)
        u = u + self.mlp(u)
        if len(names) == 1:
            return F.normalize(u + self.query[names[0]](u), dim=-1)
        out = torch.empty_like(u)
        for j, n in enumerate(names):
            sel = torch.from_numpy(np.nonzero(inv_t.reshape(-1) == j)[0]).to(dev)
            out[sel] = u[sel] + self.query[n](u[sel])
        return F.normalize(out, dim=-1)

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.clamp(0.0, 4.0).exp()

    def scores(self, q: torch.Tensor, e: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.tau * (q @ e.T) + bias[None]


class ServingTower:
    """:meth:`HeadsModel.user` for serving, folded once per head version (no gradients).

    The user tower is linear up to the attention softmax, so its per-token work can be
    done once per item instead of once per token of every request::

        tok_j     = E'[g_j] + L[l_j] + Pos[j] + G[gap_j]      E'[g] = e(g) + plat_emb[plat g]
        logit_j   = ((W_k tok_j + b_k) · c_p) / √d  =  (tok_j · w_p + b_k · c_p) / √d,
                    w_p = W_kᵀ c_p: a scalar per item and per target platform (``att``),
                    plus small tables for labels, positions and gap buckets
        u         = Σ_j a_j (W_v tok_j + b_v)  =  W_v (Σ_j a_j tok_j) + b_v      (Σ a_j = 1)

    so a request costs gathers of scalars, one softmax, one attention-weighted sum of its
    items' vectors and one value projection, instead of two [L, d] × [d, d] products.
    Equal to :meth:`HeadsModel.user` up to float rounding (tested). Rows added to the
    table later are folded incrementally (:meth:`grow`); a new platform refolds all.
    """

    def __init__(self, model: HeadsModel, table: ItemTable) -> None:
        self.model = model
        for p in table.platforms:  # before the per-platform tables below are built
            model.add_platform(p)
        self.heads = list(model.platforms)  # column order of the per-platform tables
        with torch.inference_mode():
            m, d = model, model.cfg.dim
            self.scale = 1.0 / math.sqrt(d)
            ctx = torch.stack([m.ctx[p] for p in self.heads]) if m.cfg.platform_attention \
                else m.ctx[self.heads[0]].expand(len(self.heads), -1)
            self.w = m.key.weight.T @ ctx.T  # [d, P]
            self.b = ctx @ m.key.bias  # [P]
            self.label_s = m.label_emb.weight @ self.w  # [2, P]
            self.pos_s = m.pos_emb.weight @ self.w  # [L+1, P]
            self.gap_s = m.gap_emb.weight @ self.w  # [G, P]
            self.start = torch.stack([m.start[p] for p in self.heads]) + m.pos_emb.weight[0]
            self.start_s = (self.start * self.w.T).sum(-1)  # [P]
        dev = model.log_tau.device
        self.emb = torch.zeros(0, model.cfg.dim, device=dev)
        self.bias = torch.zeros(0, device=dev)
        self.tok = torch.zeros(0, model.cfg.dim, device=dev)
        self.att = torch.zeros(0, len(self.heads), device=dev)
        self.grow(table)

    def __len__(self) -> int:
        return int(self.emb.shape[0])

    def grow(self, table: ItemTable) -> None:
        """Fold the table rows added since (all of them the first time)."""
        n0, n = len(self), len(table)
        if n <= n0:
            return
        m = self.model
        new = [p for p in table.platforms if p not in self.heads]
        if new:
            raise ValueError(f"new platform(s) {new}: build a new ServingTower")
        with torch.inference_mode():
            e, b = m.item_emb(table, np.arange(n0, n))
            plat = torch.from_numpy(np.asarray(table.plat[n0:n], dtype=np.int64)).to(e.device)
            tok = e + m.plat_emb(plat)
            self.emb, self.bias = torch.cat([self.emb, e]), torch.cat([self.bias, b])
            self.tok = torch.cat([self.tok, tok])
            self.att = torch.cat([self.att, tok @ self.w])

    def user(self, table: ItemTable, h: History, attention: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised query vectors [B, d], as :meth:`HeadsModel.user`; with
        ``attention`` also the attention weights on the history positions [B, L]
        (what explanations weigh the history by: :mod:`streams.explain`)."""
        m = self.model
        dev = self.emb.device
        b, seq = h.gid.shape
        heads = {p: i for i, p in enumerate(self.heads)}
        uniq_t, inv_t = np.unique(h.target_plat, return_inverse=True)
        names = [table.platforms[int(i)] for i in uniq_t]
        col = np.asarray([heads[n] for n in names], dtype=np.int64)[inv_t.reshape(-1)]
        tok, att = self.tok, self.att
        if not len(self):  # no items at all: every history is empty (masked)
            tok = torch.zeros(1, m.cfg.dim, device=dev)
            att = torch.zeros(1, len(self.heads), device=dev)
        with torch.inference_mode():
            c = torch.from_numpy(col).to(dev)  # [B] target head per row
            valid = torch.from_numpy(h.gid >= 0).to(dev)
            g = torch.from_numpy(np.maximum(h.gid, 0)).to(dev)
            lab = torch.from_numpy(h.label).to(dev)
            gap = torch.from_numpy(h.gap).to(dev)
            cc = c[:, None].expand(b, seq)
            logit = (att[g, cc] + self.label_s[lab, cc] + self.gap_s[gap, cc]
                     + self.pos_s[1:seq + 1].T[c])
            logit0 = self.start_s[c]
            logits = torch.cat([logit0[:, None], logit], dim=1) + self.b[c][:, None]
            logits = (logits * self.scale).masked_fill(
                ~torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), valid], 1),
                float("-inf"))
            a = logits.softmax(dim=1)
            a0, aj = a[:, 0], a[:, 1:]
            pooled = a0[:, None] * self.start[c] + torch.bmm(aj[:, None], tok[g])[:, 0]
            pooled = pooled + aj @ m.pos_emb.weight[1:seq + 1]
            lab_w = torch.zeros(b, 2, device=dev).scatter_add_(1, lab, aj)
            gap_w = torch.zeros(b, m.cfg.gap_buckets, device=dev).scatter_add_(1, gap, aj)
            pooled = pooled + lab_w @ m.label_emb.weight + gap_w @ m.gap_emb.weight
            u = m.value(pooled)
            u = u + m.mlp(u)
            out = torch.empty_like(u)
            for j, n in enumerate(names):
                sel = torch.from_numpy(np.nonzero(inv_t.reshape(-1) == j)[0]).to(dev)
                us = u[sel]
                out[sel] = us + m.query[n](us)
            q = F.normalize(out, dim=-1)
            return (q, aj) if attention else q


def save_model(model: HeadsModel, compact: bool = False) -> bytes:
    """Weights + config + platform order, as bytes.

    ``compact`` (what goes to Redis for recommenders): float16, and the hashed id tables
    sparse (only rows that ever learned anything are non-zero, a few thousand of 2^14 per
    platform): ~20× fewer bytes. Otherwise exact float32 (checkpoints, tests).
    """
    buf = io.BytesIO()
    state: dict[str, Any] = {}
    sparse: dict[str, Any] = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if compact and k.startswith("ids."):
            nz = (v != 0).reshape(v.shape[0], -1).any(dim=1).nonzero().flatten()
            sparse[k] = (list(v.shape), nz.to(torch.int32), v[nz].to(torch.float16))
        elif compact and v.is_floating_point():
            state[k] = v.to(torch.float16)
        else:
            state[k] = v
    torch.save({"cfg": asdict(model.cfg), "platforms": list(model.platforms), "state": state,
                "sparse": sparse}, buf)
    return buf.getvalue()


def load_model(blob: bytes, device: torch.device | None = None) -> HeadsModel:
    """Either format of :func:`save_model`; returns the model in eval mode."""
    obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    m = HeadsModel(ModelConfig(**obj["cfg"]), obj["platforms"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in obj["state"].items()}
    for k, (shape, nz, rows) in obj.get("sparse", {}).items():
        full = torch.zeros(shape)
        full[nz.long()] = rows.float()
        state[k] = full
    m.load_state_dict(state)
    m.eval()
    return m.to(device or torch.device("cpu"))
