"""GPU check for the item encoder: is CUDA really used, and how fast is it?

Where a GPU is present: runs the ONNX (fp32) encoder with the CUDA execution provider,
verifies from the session that CUDA is the provider actually used (not merely listed: the
onnxruntime-gpu package lists CUDA on CPU-only machines too), checks its vectors against
the CPU session's, and reports items/s for ONNX-CUDA, torch-CUDA and ONNX-CPU on the same
texts. Where none is present it says so plainly and exits 0.

Last stdout line (``--json``): {"gpu": bool, "skipped": reason | null, "onnx_cuda_provider_used",
"onnx_cuda_items_per_s", "torch_cuda_items_per_s", "onnx_cpu_items_per_s", "cosine_min",
"train_device", "train_step_ms_cuda", "train_step_ms_cpu"}: the heads' online training
step (512 examples, history 50, 3 platforms) timed on CUDA and on the CPU in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.encoder import catalog_texts  # noqa: E402
from models.encoder import EncoderConfig, cuda_usable_for_onnx, load_encoder  # noqa: E402


def rate(enc, texts):  # type: ignore[no-untyped-def]
    enc.encode(texts[:256])
    t = time.perf_counter()
    v = enc.encode(texts)
    return v, round(len(texts) / (time.perf_counter() - t), 1)


def train_steps(n: int = 20, devices: tuple[str, ...] = ("cuda", "cpu")) -> dict[str, object]:
    """Median optimizer-step time of the online trainer on cuda and on cpu."""
    import torch

    from models.heads import HeadsModel, ItemTable, ModelConfig
    from models.trainer import Example, OnlineTrainer, TrainConfig

    rng = np.random.default_rng(0)
    table = ItemTable(384, 1 << 14)
    for p in ("shop", "video", "music"):
        v = rng.normal(size=(5000, 384)).astype(np.float32)
        table.set_text(p, [f"{p}{i}" for i in range(5000)], v)
    plats = ["shop", "video", "music"]
    batch = []
    for j in range(512):
        hist = [(int(rng.integers(0, 15000)), 1, float(j - k)) for k in range(50)]
        batch.append(Example(plats[j % 3], int(rng.integers(0, 15000)), hist, float(j)))
    out: dict[str, object] = {}
    for dev in devices:
        m = HeadsModel(ModelConfig(buckets=1 << 14), plats).to(dev)
        tr = OnlineTrainer(m, table, TrainConfig(steps=1, replay=0))
        tr.learn(batch[:64])  # warm-up
        times = []
        for _ in range(n if dev == "cuda" else 5):
            tr.learn(batch)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(tr.stats.step_ms[-1])
        out[f"train_step_ms_{dev}"] = round(float(np.median(times)), 2)
        if dev == "cuda":
            out["train_device"] = str(next(m.parameters()).device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch

    out: dict[str, object] = {"gpu": False, "skipped": None}
    if not (torch.cuda.is_available() or cuda_usable_for_onnx()):
        out["skipped"] = "no usable GPU here (torch.cuda.is_available() is False and the " \
                         "NVIDIA driver library does not load); nothing to check"
        print(f"SKIPPED: {out['skipped']}")
    else:
        out["gpu"] = True
        out["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        texts = catalog_texts(a.items)
        cuda = load_encoder(EncoderConfig(backend="onnx-fp32", device="cuda",
                                          batch_size=a.batch_size))
        used = cuda.session.get_providers()  # type: ignore[attr-defined]
        out["onnx_providers"] = used
        out["onnx_cuda_provider_used"] = bool(used) and used[0] == "CUDAExecutionProvider"
        v_cuda, out["onnx_cuda_items_per_s"] = rate(cuda, texts)
        cpu = load_encoder(EncoderConfig(backend="onnx-fp32", device="cpu",
                                         batch_size=a.batch_size))
        v_cpu, out["onnx_cpu_items_per_s"] = rate(cpu, texts[:1000])
        out["cosine_min"] = round(float(np.min(np.sum(v_cuda[:1000] * v_cpu, axis=1))), 5)
        if torch.cuda.is_available():
            tch = load_encoder(EncoderConfig(backend="torch", device="cuda",
                                             batch_size=a.batch_size))
            _, out["torch_cuda_items_per_s"] = rate(tch, texts)
        out.update(train_steps())
        print(f"training step: {out['train_step_ms_cuda']} ms on {out['train_device']}, "
              f"{out['train_step_ms_cpu']} ms on cpu")
        print(f"CUDA provider used: {out['onnx_cuda_provider_used']} ({used}); ONNX CUDA "
              f"{out['onnx_cuda_items_per_s']} items/s, torch CUDA "
              f"{out.get('torch_cuda_items_per_s')} items/s, ONNX CPU "
              f"{out['onnx_cpu_items_per_s']} items/s; cosine min {out['cosine_min']}")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
