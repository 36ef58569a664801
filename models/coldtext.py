"""Cross-platform cold start from item texts: what a user liked elsewhere, read as a prior.

When a user arrives on a platform with no history there but positives on other platforms,
the learned model ranks from a few foreign items. The frozen language model already puts
a telescope, a space film and a synthwave album near each other (texts centred on their
platform's mean, :meth:`models.heads.ItemTable.centered`), so each positive ``h`` elsewhere
can be read as a distribution over the target catalog::

    K(h, ·)  = softmax_j( β · cos(h, j) )                   over platform p's items j
    m(j)     = mean over the user's last ``hist`` positives h on other platforms of K(h, j)
    prior(j) = log( α / N + m(j) ) + log( pop(j) / max pop + ε )

``α`` is the share of mass spread uniformly (how little one foreign positive says), the
popularity term makes it "popular items of the themes you like". One code path for the
baseline ``textpop`` (every ask, :class:`models.baselines.TextPop`), the evaluated xrec and
the worker (cold asks only, mixed into the served hybrid: ``models.baselines.Hybrid``,
``streams.heads.ModelServer``).

How much the prior should weigh depends on the catalog: on the simulator's stream, where
tastes are themes that the texts name, it should lead; on MovieLens split by genre, where
a title says little about the films one likes next, it should stay small (measured:
README, Quality). So the weight is not a constant: :class:`ColdWeight` keeps, for each
weight of a small grid, the discounted NDCG@10 that the cold asks' targets would have had
with it, and serves the best so far (test-then-learn: an ask counts after it was ranked).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["text_prior", "kernel_mean", "unit_rows", "ColdWeight", "POP_EPS"]

POP_EPS = 1e-3  # ε: items nobody liked yet keep a finite score


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def kernel_mean(hist: Sequence[np.ndarray], cat: np.ndarray, beta: float) -> np.ndarray:
    """[len(hist), N]: m(j) of every ask (zeros for an ask without positives)."""
    n = cat.shape[0]
    m = np.zeros((len(hist), n), dtype=np.float64)
    lens = np.fromiter((len(h) for h in hist), dtype=np.int64, count=len(hist))
    if n and lens.sum():
        stacked = np.concatenate([h for h in hist if len(h)]).astype(np.float32)
        k = beta * (stacked @ cat.T)  # one product for every ask's positives
        k -= k.max(axis=1, keepdims=True)
        np.exp(k, out=k)
        k /= k.sum(axis=1, keepdims=True)
        has = lens > 0  # the asks' rows are contiguous in ``stacked``: one reduceat
        starts = np.concatenate([[0], np.cumsum(lens[has])[:-1]])
        m[has] = np.add.reduceat(k, starts, axis=0) / lens[has][:, None]
    return m


def text_prior(hist: Sequence[np.ndarray], cat: np.ndarray, pop: np.ndarray | None,
               beta: float, alpha: float, m: np.ndarray | None = None) -> np.ndarray:
    """[len(hist), N] prior scores (higher is better).

    ``hist[b]``: [h_b, D] unit vectors of ask b's positives elsewhere (may be empty: its
    row is then the popularity term alone); ``cat``: [N, D] unit vectors of the target
    catalog; ``pop``: [N] popularity (None: no popularity term); ``m``: the asks'
    :func:`kernel_mean` when the caller has it already (same ``hist``, ``cat``, β)."""
    n = cat.shape[0]
    out = np.zeros((len(hist), n), dtype=np.float64)
    if n:
        out += np.log(alpha / n + (kernel_mean(hist, cat, beta) if m is None else m))
    if pop is not None and n:
        pop = np.asarray(pop, dtype=np.float64)
        top = pop.max()
        out += np.log((pop / top if top > 0 else pop) + POP_EPS)[None, :]
    return out


class ColdWeight:
    """The text prior's weight, chosen online among ``grid`` (ascending).

    :meth:`learn` takes the cold asks of a batch after they were ranked: their scores
    without the prior, the standardised prior, and the target columns; every candidate
    weight's NDCG@10 of those targets is added to a sum that halves every ``half_life``
    asks. :attr:`weight` is ``start`` until ``min_asks`` were seen, then the best
    candidate (the smaller weight on a tie)."""

    def __init__(self, grid: Sequence[float], start: float, half_life: float = 500.0,
                 min_asks: int = 30) -> None:
        self.grid = np.asarray(sorted(set(float(g) for g in grid) | {float(start)}))
        self.start = float(start)
        self.gain = np.zeros(len(self.grid))
        self.asks = 0
        self.keep = 2.0 ** (-1.0 / half_life)
        self.min_asks = min_asks

    @property
    def weight(self) -> float:
        if self.asks < self.min_asks or len(self.grid) == 1:
            return self.start
        return float(self.grid[int(np.argmax(self.gain))])

    def learn(self, base: np.ndarray, prior: np.ndarray, targets: Sequence[int]) -> None:
        """``base`` [B, N] the asks' scores without the prior (excluded columns -inf),
        ``prior`` [B, N] the standardised prior, ``targets`` [B] their target columns
        (-1: not in the catalog, skipped)."""
        tc = np.asarray(targets, dtype=np.int64)
        ok = tc >= 0
        if not ok.any():
            return
        base, prior, tc = base[ok], prior[ok], tc[ok]
        r = np.arange(len(tc))
        # [K, B, N]: every candidate weight's scores at once (cold asks are few)
        s = base[None] + self.grid[:, None, None] * prior[None]
        st = s[:, r, tc][:, :, None]
        rank = (s > st).sum(2) + 0.5 * ((s == st).sum(2) - 1)
        gain = np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)
        for g in gain.T:  # in order, so older asks fade
            self.gain = self.gain * self.keep + g
        self.asks += len(tc)
