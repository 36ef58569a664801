"""Differentially private head updates (``XREC_DP_EPSILON``): DP-SGD on a stream.

What is protected: **one training example** (one positive interaction as the train topic
carries it, with the history sent along with it), under add/remove-one adjacency. Not a
user: a user's many examples each spend their own budget, so a user with n examples is
protected only at about n·ε (group privacy). An interaction is also a history feature of
the user's next ``hist_len`` examples, which makes its own guarantee weaker than ε in the
same way. User-level privacy needs per-user contribution bounds over the whole stream;
it is not provided.

How a step is privatised (Abadi et al. 2016)::

    g_i   = ∇ loss_i                       per example, torch.func vmap(grad)
    g̃_i   = g_i · min(1, C / ‖g_i‖)        ‖·‖ over every trained weight at once
    G     = (Σ g̃_i + N(0, σ²C² I)) / B̄      noise on every dense weight of every platform
    AdamW(G); EMA pull                     (post-processing: free)

* Each example's loss sees only its own candidates (its positive + ``uniform_negatives``
  uniform draws; no in-batch negatives, no streaming-popularity log Q correction: both
  would let one example's data shape another's gradient, past the clip).
* The hashed id tables are frozen while DP is on: noise would have to go on every row of
  every table each step (which rows a step touches is itself private), 2^14-2^15 × 65
  coordinates per platform that the signal could not cross. The model learns through the
  text adapters and the user tower; ids learnt before DP was switched on stay as they are.
* B̄ is the expected batch size (new examples + replay rate × buffer), as Opacus divides
  by for Poisson sampling; the number of new examples per micro-batch is taken as public
  (the stream's rate shows in the broker anyway).

Accounting (per example, not per step count): a stream is one pass, so an example's
privacy loss comes only from the steps that can see it (adaptive composition: the other
steps are the same mechanism with or without it). Each example is

1. in all ``k`` steps of its own micro-batch (sampling rate 1: no amplification), then
2. in the replay buffer for at most ``R`` steps (``XREC_DP_REPLAY_STEPS``), in each drawn
   independently with probability ``q`` (``XREC_DP_REPLAY_RATE``: Poisson sampling, the
   subsampled Gaussian mechanism), then retired from the buffer for good.

Its Rényi DP is ``k·RDP(1, σ) + R·RDP(q, σ)`` (Mironov et al. 2019), converted to
(ε, δ) by Balle et al. 2020; Opacus's analysis (``opacus.accountants.analysis.rdp``) does
both. σ is chosen once (:func:`noise_multiplier`) so that a fully used example spends
exactly ε: every example's ε is bounded by the target however long the stream runs, and
the budget running out means the example leaves the replay buffer (:class:`DPLedger`),
not that the model stops learning. ``epsilon_spent`` per platform is the accountant's ε
of the most-used example of that platform so far (ε after its fresh steps, growing to the
target as it is replayed).

Not covered: the noise comes from torch's generator seeded from ``os.urandom`` (not a
CSPRNG; Opacus's ``secure_mode`` needs torchcsprng), floating-point attacks on the Gaussian
sampler (Mironov 2012) are not mitigated, an example redelivered after a crash
(at-least-once) is trained twice, and what the worker serves beside the model (popularity,
co-occurrence, the text prior) learns from the same events without noise.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from models.heads import HeadsModel, History, ItemTable

if TYPE_CHECKING:
    from models.trainer import Example

__all__ = ["DPConfig", "DPLedger", "ORDERS", "epsilon", "noise_multiplier", "from_settings",
           "per_example_grads", "clip_and_sum"]

#: Rényi orders: Opacus's defaults and a few larger ones (small ε at small δ wants them)
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)]
                                  + list(range(12, 64)) + [80, 128, 256, 512])


@dataclass
class DPConfig:
    """DP-SGD on the heads: per-example clipping to ``clip``, noise σ·clip per step."""

    epsilon: float  # target ε per example (fresh steps + its whole replay budget)
    delta: float = 1e-6  # keep it below 1 / (examples the model will ever train on)
    clip: float = 1.0  # C: per-example gradient norm bound
    replay_rate: float = 1 / 64  # q: each buffered example's chance to be in a step
    replay_steps: int = 128  # R: steps an example stays eligible for replay
    seed: int | None = None  # noise and replay sampling; None = os.urandom (eval sets one)
    #: σ for ``steps`` fresh steps per example; filled by :meth:`calibrate`
    sigma: float = field(default=float("nan"))
    steps: int = 0

    def calibrate(self, steps: int) -> DPConfig:
        """Choose σ for ``steps`` optimizer steps per micro-batch (the trainer's)."""
        if self.steps != steps or not math.isfinite(self.sigma):
            self.steps = steps
            self.sigma = noise_multiplier(self.epsilon, self.delta, steps, self.replay_rate,
                                          self.replay_steps)
        return self


# ---------------------------------------------------------------------------- accountant
@lru_cache(maxsize=4096)
def _rdp(q: float, sigma: float, steps: int) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    if steps <= 0 or q <= 0:
        return (0.0,) * len(ORDERS)
    return tuple(float(x) for x in compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                 orders=list(ORDERS)))


def epsilon(sigma: float, delta: float, steps: int, replay_rate: float = 0.0,
            replay_steps: int = 0) -> float:
    """ε of one example: ``steps`` Gaussian steps at sampling rate 1, then
    ``replay_steps`` steps of the subsampled Gaussian at ``replay_rate`` (RDP, Opacus)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = np.asarray(_rdp(1.0, sigma, steps)) + np.asarray(
        _rdp(replay_rate, sigma, replay_steps))
    if not rdp.any():
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": ε is still valid
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=list(rdp), delta=delta)
    return float(eps)


def noise_multiplier(target: float, delta: float, steps: int, replay_rate: float,
                     replay_steps: int, tol: float = 1e-3) -> float:
    """The smallest σ (to ``tol`` relative) whose fully used example spends ≤ ``target``."""
    if not target > 0:
        raise ValueError(f"DP target ε must be > 0, got {target}")

    def eps(s: float) -> float:
        return epsilon(s, delta, steps, replay_rate, replay_steps)

    lo, hi = 0.05, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError(f"no noise multiplier reaches ε={target} at δ={delta}")
    while hi / lo > 1 + tol:  # eps is decreasing in σ: bisect on a log scale
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


# -------------------------------------------------------------------------------- ledger
class DPLedger:
    """Each buffered example's replay budget, and ε spent per platform.

    ``used[i]``: the steps ``buffer[i]`` has been eligible for replay in (each one is
    charged whether or not the Poisson draw picked it: that is what the accountant
    composes). At ``replay_steps`` the example is retired."""

    def __init__(self, cfg: DPConfig, steps: int) -> None:
        self.cfg = cfg.calibrate(steps)
        seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
        self.nprng = np.random.default_rng(seed)
        self.seed = seed
        self.used: list[int] = []
        self.most_used: dict[str, int] = {}  # platform → replay steps of its most-used example
        self.examples: dict[str, int] = {}  # platform → examples trained on
        self.retired = 0
        self.noise_elems = 0
        self._gen: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        g = self._gen.get(str(device))
        if g is None:
            g = self._gen[str(device)] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    def sync(self, buffer: Sequence[Example]) -> None:
        """The buffer was replaced under us (``forget_replay``): start its ledger over."""
        if len(self.used) != len(buffer):
            self.used = [self.cfg.replay_steps] * len(buffer)  # unknown: count them spent

    def eligible(self) -> int:
        """Buffered examples with replay budget left (those the next step may draw)."""
        r = self.cfg.replay_steps
        return sum(u < r for u in self.used)

    def draw(self, buffer: Sequence[Example]) -> list[int]:
        """Poisson sampling: each buffered example with budget left, independently with
        probability q."""
        if not buffer:
            return []
        hit = self.nprng.random(len(buffer)) < self.cfg.replay_rate
        r = self.cfg.replay_steps
        return [int(i) for i in np.nonzero(hit)[0] if self.used[i] < r]

    def charge(self, buffer: Sequence[Example]) -> None:
        """One step was taken: every example with budget left was eligible for it."""
        r = self.cfg.replay_steps
        self.used = [u + 1 if u < r else u for u in self.used]
        for e, u in zip(buffer, self.used, strict=True):
            if u > self.most_used.get(e.platform, 0):
                self.most_used[e.platform] = u

    def admit(self, examples: Sequence[Example]) -> None:
        for e in examples:
            self.examples[e.platform] = self.examples.get(e.platform, 0) + 1
            self.most_used.setdefault(e.platform, 0)
        self.used.extend([0] * len(examples))

    def keep(self) -> list[bool]:
        """Which buffered examples still have replay budget; retired ones are counted."""
        keep = [u < self.cfg.replay_steps for u in self.used]
        self.retired += keep.count(False)
        self.used = [u for u, k in zip(self.used, keep, strict=True) if k]
        return keep

    def epsilon_spent(self) -> dict[str, float]:
        """platform → ε of its most-used example (0 before it has trained on any)."""
        c = self.cfg
        return {p: epsilon(c.sigma, c.delta, c.steps, c.replay_rate, r) if self.examples.get(p)
                else 0.0 for p, r in self.most_used.items()}

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        return {"epsilon": c.epsilon, "delta": c.delta, "clip": c.clip,
                "noise_multiplier": round(c.sigma, 4), "replay_rate": c.replay_rate,
                "replay_steps": c.replay_steps, "steps_per_batch": c.steps,
                "epsilon_spent": {p: round(v, 4) for p, v in self.epsilon_spent().items()},
                "retired_from_replay": self.retired}


# ------------------------------------------------------------------ per-example gradients
@dataclass
class _Inputs:
    txt: torch.Tensor  # [B, L+1+K, T] centred text of history items, then candidates
    iplat: torch.Tensor  # [B, L+1+K, P] one-hot head of each item
    idrow: torch.Tensor  # [B, L+1+K, d+1] frozen id rows (embedding, bias)
    hplat: torch.Tensor  # [B, L] table platform of each history item (plat_emb)
    valid: torch.Tensor  # [B, L] bool
    label: torch.Tensor  # [B, L]
    gap: torch.Tensor  # [B, L]
    tgt: torch.Tensor  # [B, P] one-hot target head
    same: torch.Tensor  # [B, 1+K] bool: a uniform draw that is the positive itself


def _inputs(model: HeadsModel, table: ItemTable, batch: Sequence[Example], negatives: int,
            rng: np.random.Generator) -> tuple[_Inputs, list[str]]:
    m, dev = model, model.log_tau.device
    h = History.build([e.history for e in batch], [e.time for e in batch],
                      [table.platform_index(e.platform) for e in batch], m.cfg.hist_len,
                      m.cfg.gap_buckets)
    b, seq = h.gid.shape
    plat_of = np.asarray(table.plat, dtype=np.int64)
    pos = np.asarray([e.gid for e in batch], dtype=np.int64)
    cand = np.empty((b, 1 + negatives), dtype=np.int64)
    cand[:, 0] = pos
    for p in {e.platform for e in batch}:  # each example's own uniform negatives
        sel = np.asarray([i for i, e in enumerate(batch) if e.platform == p])
        rows = table.rows(p)
        cand[sel, 1:] = rows[rng.integers(0, len(rows), size=(len(sel), negatives))]
    valid = h.gid >= 0
    hg = np.where(valid, h.gid, pos[:, None])  # padding: any real row, masked out below
    allg = np.concatenate([hg, cand], axis=1)  # [B, N]
    names = [table.platforms[int(i)] for i in np.unique(plat_of[allg])]
    for n in names:
        m.add_platform(n)
    local = np.full(len(table.platforms), -1, dtype=np.int64)
    local[[table.platforms.index(n) for n in names]] = np.arange(len(names))
    ip = local[plat_of[allg]]
    flat = allg.reshape(-1)
    txt = torch.from_numpy(table.centered(flat).reshape(b, allg.shape[1], -1)).to(dev)
    bucket = np.asarray(table.bucket, dtype=np.int64)[flat]
    idrow = torch.zeros(len(flat), m.cfg.dim + 1, device=dev)
    with torch.no_grad():
        for j, n in enumerate(names):
            s = np.nonzero(ip.reshape(-1) == j)[0]
            idrow[torch.from_numpy(s).to(dev)] = m.ids[n][torch.from_numpy(bucket[s]).to(dev)]
    tgt = local[h.target_plat]
    x = _Inputs(txt=txt, iplat=F.one_hot(torch.from_numpy(ip), len(names)).float().to(dev),
                idrow=idrow.reshape(b, allg.shape[1], -1),
                hplat=torch.from_numpy(plat_of[hg]).to(dev),
                valid=torch.from_numpy(valid).to(dev), label=torch.from_numpy(h.label).to(dev),
                gap=torch.from_numpy(h.gap).to(dev),
                tgt=F.one_hot(torch.from_numpy(tgt), len(names)).float().to(dev),
                same=torch.from_numpy((cand == pos[:, None]) & (np.arange(cand.shape[1]) > 0)
                                      ).to(dev))
    return x, names


def _forward_one(model: HeadsModel, names: list[str], params: dict[str, torch.Tensor],
                 txt: torch.Tensor, iplat: torch.Tensor, idrow: torch.Tensor,
                 hplat: torch.Tensor, valid: torch.Tensor, label: torch.Tensor,
                 gap: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """One example, as :meth:`HeadsModel.user` and :meth:`HeadsModel.item_emb` compute it
    (tested equal), written without data-dependent shapes so that vmap can batch it:
    per-platform weights are stacked and picked by one-hot vectors. Returns (query [d],
    candidate embeddings [1+K, d], candidate score bias [1+K])."""
    p, cfg = params, model.cfg
    seq = valid.shape[0]
    aw = torch.stack([p[f"adapter.{n}.weight"] for n in names])  # [P, d, T]
    ab = torch.stack([p[f"adapter.{n}.bias"] for n in names])  # [P, d]
    e = txt @ p["text_adapter.weight"].T + p["text_adapter.bias"]
    e = e + torch.einsum("np,npd->nd", iplat, torch.einsum("nt,pdt->npd", txt, aw) + ab)
    e = F.normalize(e + idrow[:, :-1], dim=-1)
    hist, cand, bias = e[:seq], e[seq:], idrow[seq:, -1]
    tok = (hist + F.embedding(hplat, p["plat_emb.weight"])) * valid[:, None]
    tok = tok + F.embedding(label, p["label_emb.weight"]) + p["pos_emb.weight"][1:seq + 1] \
        + F.embedding(gap, p["gap_emb.weight"])
    start = tgt @ torch.stack([p[f"start.{n}"] for n in names]) + p["pos_emb.weight"][0]
    ctx = tgt @ torch.stack([p[f"ctx.{n}"] for n in names]) if cfg.platform_attention \
        else p[f"ctx.{model.platforms[0]}"]
    tok = torch.cat([start[None], tok])
    mask = torch.cat([torch.ones_like(valid[:1]), valid])
    att = ((tok @ p["key.weight"].T + p["key.bias"]) @ ctx) / math.sqrt(cfg.dim)
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=0)
    u = att @ (tok @ p["value.weight"].T + p["value.bias"])
    hid = F.gelu(u @ p["mlp.0.weight"].T + p["mlp.0.bias"])
    u = u + hid @ p["mlp.2.weight"].T + p["mlp.2.bias"]
    qw = torch.stack([p[f"query.{n}.weight"] for n in names])  # [P, d, d]
    qb = torch.stack([p[f"query.{n}.bias"] for n in names])
    q = F.normalize(u + tgt @ (torch.einsum("pde,e->pd", qw, u) + qb), dim=-1)
    return q, cand, bias


def _params(model: HeadsModel, names: list[str]) -> dict[str, torch.Tensor]:
    """The dense weights a batch over heads ``names`` reads (not the frozen id tables)."""
    heads = tuple(f"{k}.{n}" for k in ("adapter", "query", "ctx", "start") for n in names)
    return {k: v.detach() for k, v in model.named_parameters()
            if not k.startswith(("ids.", "adapter.", "query.", "ctx.", "start."))
            or k.startswith(heads)}


def per_example_grads(model: HeadsModel, table: ItemTable, batch: Sequence[Example],
                      negatives: int, rng: np.random.Generator
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({weight name: per-example gradients [B, *shape]}, per-example losses [B]).

    Each example's sampled softmax over its positive and ``negatives`` uniform draws from
    its platform's catalog (a draw that is the positive itself is masked out). Uniform
    draws have the same log Q, so no correction is needed."""
    from torch.func import grad_and_value, vmap

    x, names = _inputs(model, table, batch, negatives, rng)
    params = _params(model, names)

    def loss_one(ps: dict[str, torch.Tensor], txt: torch.Tensor, iplat: torch.Tensor,
                 idrow: torch.Tensor, hplat: torch.Tensor, valid: torch.Tensor,
                 label: torch.Tensor, gap: torch.Tensor, tgt: torch.Tensor,
                 same: torch.Tensor) -> torch.Tensor:
        q, cand, bias = _forward_one(model, names, ps, txt, iplat, idrow, hplat, valid,
                                     label, gap, tgt)
        tau = ps["log_tau"].clamp(0.0, 4.0).exp()
        logits = (tau * (cand @ q) + bias).masked_fill(same, float("-inf"))
        return -logits.log_softmax(dim=0)[0]

    g, loss = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0, 0, 0, 0, 0, 0, 0, 0))(
        params, x.txt, x.iplat, x.idrow, x.hplat, x.valid, x.label, x.gap, x.tgt, x.same)
    return g, loss


def clip_and_sum(grads: dict[str, torch.Tensor], clip: float
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Σ_i g_i · min(1, C / ‖g_i‖), the norm over all weights of example i at once.

    An example whose gradient is not finite contributes nothing (a choice that depends on
    that example alone). Returns (sums, per-example norms before clipping, dropped)."""
    flat = [v.reshape(v.shape[0], -1) for v in grads.values()]
    norms = torch.cat(flat, dim=1).norm(dim=1)
    ok = torch.isfinite(norms)
    scale = torch.where(ok, (clip / (norms + 1e-6)).clamp(max=1.0), torch.zeros_like(norms))
    sums = {k: torch.einsum("b,b...->...", scale, torch.nan_to_num(v) * ok.view(
        -1, *([1] * (v.dim() - 1)))) for k, v in grads.items()}
    return sums, norms, int((~ok).sum())


def from_settings(s: Any, epsilon: float | None = None, seed: int | None = None
                  ) -> DPConfig | None:
    """The DP configuration of ``XREC_DP_*`` settings (``epsilon`` overrides
    ``XREC_DP_EPSILON``); None when DP is off."""
    eps = epsilon if epsilon is not None else s.dp_epsilon
    if eps is None:
        return None
    return DPConfig(epsilon=float(eps), delta=s.dp_delta, clip=s.dp_clip,
                    replay_rate=s.dp_replay_rate, replay_steps=s.dp_replay_steps, seed=seed)
