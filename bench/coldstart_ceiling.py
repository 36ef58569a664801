"""How much cross-platform cold-start recall@10 is there to get on the synthetic stream?

Runs the prequential harness of ``xrec eval --dataset synthetic`` (same stream, same cohort:
a user's first event on a platform while having history on another) with:

* ``popularity``   the baseline of the issue target (time-decayed popularity)
* ``xrec``         the learned model, online
* ``oracle``       cheats on purpose: knows every item's TRUE theme from the simulator and
                   ranks by P(theme | the user's past positive themes) × popularity. No
                   method that learns from the past can expect to beat it by much; it shows
                   the ceiling of this stream, not a method to ship.

Last stdout line (``--json``): {"events", "coldstart_n", "popularity", "xrec", "oracle",
"oracle_over_popularity", "xrec_over_popularity"} (recall@10 of the cohort).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from pydantic import SecretStr  # noqa: E402

import models.prequential as P  # noqa: E402
from streams.platforms import load_platforms  # noqa: E402
from streams.settings import Settings  # noqa: E402
from xrec.evaluate import run_eval  # noqa: E402

PER_THEME = 30  # SimConfig.items_per_theme: item number // 30 is its theme


class Oracle(P.Method):
    name = "text_zero_shot"  # reuses a result slot; reported as "oracle"

    def __init__(self, table, pop: P.Popularity, themes: int = 12, alpha: float = 0.5):  # type: ignore[no-untyped-def]
        self.t, self.pop, self.themes, self.alpha = table, pop, themes, alpha

    def theme(self, g: int) -> int:
        return int(self.t.ids[g].split("-")[1]) // PER_THEME

    def scores(self, qs, p):  # type: ignore[no-untyped-def]
        rows = self.t.rows(p)
        th = np.array([self.theme(int(g)) for g in rows])
        pv = self.pop.scores(qs, p)
        out = np.zeros((len(qs), len(rows)))
        for r, q in enumerate(qs):
            c = np.full(self.themes, self.alpha)
            for g, label, _ in q.history:
                if label:
                    c[self.theme(g)] += 1
            out[r] = (c / c.sum())[th] * (pv[r] + 1e-3)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    build = P.Prequential._build

    def with_oracle(self, total):  # type: ignore[no-untyped-def]
        build(self, total)
        pop = next(m for m in self.methods if isinstance(m, P.Popularity))
        self.methods.append(Oracle(self.table, pop))

    P.Prequential._build = with_oracle  # type: ignore[method-assign]
    cfg = P.EvalConfig(methods=("xrec", "popularity"))
    cfg.train.seed = cfg.model.seed = a.seed
    s = Settings(pseudonym_secret=SecretStr("bench-" + "x" * 26))
    rep = run_eval(s, load_platforms(""), dataset="synthetic", sim_events=a.events,
                   seed=a.seed, cfg=cfg, say=lambda m: print(m, file=sys.stderr))
    res = rep["results"]
    cold = {m: res[m]["coldstart"] for m in ("xrec", "popularity", "text_zero_shot")}
    out = {"events": rep["events"], "coldstart_n": cold["popularity"]["n"],
           "popularity": cold["popularity"]["recall@10"], "xrec": cold["xrec"]["recall@10"],
           "oracle": cold["text_zero_shot"]["recall@10"]}
    out["oracle_over_popularity"] = round(out["oracle"] / out["popularity"], 3)
    out["xrec_over_popularity"] = round(out["xrec"] / out["popularity"], 3)
    print(f"cold-start recall@10 over {out['coldstart_n']} events: popularity "
          f"{out['popularity']}, xrec {out['xrec']} ({out['xrec_over_popularity']}×), oracle "
          f"with true themes {out['oracle']} ({out['oracle_over_popularity']}×)")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
