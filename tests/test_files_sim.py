"""Reading JSONL / CSV / gzip logs, and the simulator's determinism and ground truth."""

import gzip
import json
from collections import Counter

import pytest

from producers.files import read_records
from producers.replay import Source, _interleave
from producers.simulate import PLATFORMS, SimConfig, simulate
from streams.errors import InputFileError
from streams.normalize import Normalizer
from streams.platforms import load_platforms
from streams.records import Interaction
from streams.settings import Settings


def test_jsonl_csv_gzip(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"x": 1}\n\n{bad\n')
    assert list(read_records(tmp_path / "a.jsonl")) == [b'{"x": 1}', b"{bad"]
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write("sku,price,brand\ns1,9.5,\ns2,,Acme\n")
    rows = [json.loads(r) for r in read_records(tmp_path / "b.csv.gz")]
    assert rows == [{"sku": "s1", "price": "9.5"}, {"sku": "s2", "brand": "Acme"}]
    with pytest.raises(InputFileError, match="unknown format"):
        list(read_records(tmp_path / "c.txt"))
    with pytest.raises(InputFileError, match="no such file"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_interleave_by_relative_position(tmp_path):
    (tmp_path / "a.jsonl").write_text("a1\na2\na3\na4\n")
    (tmp_path / "b.jsonl").write_text("b1\nb2\n")
    srcs = [Source(tmp_path / "a.jsonl", "A"), Source(tmp_path / "b.jsonl", "B")]
    got = [raw.decode() for _, raw in _interleave(srcs, [4, 2])]
    # record i of n sits at (i + ½)/n: a at ⅛ ⅜ ⅝ ⅞, b at ¼ ¾
    assert got == ["a1", "b1", "a2", "a3", "b2", "a4"]


def test_simulator_is_deterministic_and_its_ground_truth_holds(tmp_path):
    cfg = SimConfig(events=1500, users=80, malformed=0.05, ingest_events=20, seed=3,
                    end_time=1_750_000_000.0)
    m1 = simulate(cfg, tmp_path / "one")
    m2 = simulate(cfg, tmp_path / "two")
    for p in PLATFORMS:
        assert (tmp_path / "one" / f"{p}.events.jsonl").read_bytes() == \
            (tmp_path / "two" / f"{p}.events.jsonl").read_bytes()
    assert m1 == m2
    n = Normalizer(Settings(env="dev"), load_platforms(), clock=lambda: 1_750_000_100.0)
    ok, codes = 0, Counter()
    users_per_account: dict[str, set[str]] = {}
    for p in [*PLATFORMS, None]:
        f = tmp_path / "one" / (f"{p}.events.jsonl" if p else "ingest.events.jsonl")
        for i, raw in enumerate(read_records(f)):
            out = n.normalize(raw, topic="t", partition=0, offset=i, timestamp_ms=None,
                              platform=p)
            if isinstance(out, Interaction):
                ok += 1
                obj = json.loads(raw)
                if "account_id" in obj:
                    users_per_account.setdefault(obj["account_id"], set()).add(out.user)
            else:
                codes[out.code] += 1
    assert ok == m1["valid_events"] + m1["duplicates"]  # duplicates are valid, applied once
    assert m1["duplicates"] > 0
    assert codes == Counter(m1["deadletter_expected"])
    # one person, one user key, on every platform
    assert users_per_account and all(len(v) == 1 for v in users_per_account.values())
    texts = [json.loads(x) for x in (tmp_path / "one" / "video.catalog.jsonl").read_text()
             .splitlines()]
    assert any("space" in t["genres"] or "science fiction" in t["genres"] for t in texts)


def test_replay_raises_when_a_record_is_not_delivered(stack, tmp_path):
    """kafka-python reports a failed delivery only through the send's future: the Replayer
    checks every one and raises (after the rest was sent) instead of dropping records."""
    from kafka.errors import KafkaTimeoutError
    from kafka.future import Future

    from producers.replay import DeliveryError, Replayer, Source

    f = tmp_path / "ev.jsonl"
    f.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(10)))
    rep = Replayer(stack.bootstrap)
    real = rep.producer.send
    sent: list[bytes] = []
    failing = [True]

    def send(topic, value=None, key=None):  # noqa: ANN001, ANN202
        if failing[0] and json.loads(value)["n"] == 4:  # the broker does not take this one
            fut = Future()
            fut.failure(KafkaTimeoutError("Batch expired"))
            return fut
        sent.append(value)
        return real(topic, value=value, key=key)

    rep.producer.send = send
    with pytest.raises(DeliveryError, match=r"1 record\(s\) were not delivered.*Batch expired"):
        rep.replay([Source(f, "t-replay")])
    assert len(sent) == 9 and rep.failed == 1 and rep.sent == 10
    failing[0] = False
    assert rep.replay([Source(f, "t-replay")]) == 10  # a failure is reported once
    rep.producer.send = real
    rep.close()
