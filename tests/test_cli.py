"""The command line: help that teaches, clear errors, and the commands against the real stack."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests.conftest import DATA, ROOT, create_all_topics, make_settings, settings_env
from tests.kafka_util import read_all
from xrec.cli import cli

COMMANDS = ["dev", "worker", "topics", "platforms", "simulate", "replay", "catalog", "tail",
            "recs", "serve", "report", "health"]


def invoke(args, env=None):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def test_top_level_help_lists_every_command():
    out = invoke(["--help"]).output
    for c in COMMANDS:
        assert re.search(rf"^\s+{c}\b", out, re.M), c
    assert "xrec dev --once --events 20000 --json" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    res = invoke([command, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output and len(res.output) > 200


def test_platforms_json_includes_config_only_platforms():
    rows = json.loads(invoke(["platforms", "--json"],
                             env={"XREC_PLATFORMS_PATH": str(DATA / "podcast.yaml")}).output)
    names = {r["platform"] for r in rows}
    assert names == {"shop", "video", "music", "podcast"}
    pod = next(r for r in rows if r["platform"] == "podcast")
    assert pod["events_topic"] == "xrec.events.podcast" and pod["event_fields"]["at"] == \
        "timestamp"


def test_missing_services_say_what_to_do():
    res = CliRunner().invoke(cli, ["replay", "x.jsonl", "--platform", "shop"],
                             env={"KAFKA_BOOTSTRAP_SERVERS": ""})
    assert res.exit_code == 2 and "xrec dev" in res.output


def test_unknown_platform_is_a_clear_error(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text("{}\n")
    res = CliRunner().invoke(cli, ["replay", str(f), "--platform", "fax"],
                             env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert res.exit_code != 0
    assert "unknown platform 'fax'" in str(res.exception) + res.output


def test_worker_refuses_to_run_without_a_secret():
    env = {k: v for k, v in os.environ.items() if not k.startswith("XREC_")}
    env.update(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", REDIS_URL="redis://127.0.0.1:1")
    p = subprocess.run([sys.executable, "-m", "xrec", "worker"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "XREC_PSEUDONYM_SECRET is not set" in p.stderr


def test_simulate_replay_csv_gz_and_catalog(stack, ns, tmp_path):
    s = make_settings(stack, ns)
    create_all_topics(s)
    env = settings_env(s)
    res = invoke(["simulate", "--out", str(tmp_path / "sim"), "--events", "300", "--json"])
    man = json.loads(res.output)
    assert man["valid_events"] == 300 and (tmp_path / "sim" / "manifest.json").is_file()
    csv_path = tmp_path / "shop.csv.gz"
    with gzip.open(csv_path, "wt") as f:
        f.write("event_id,customer_id,sku,action,ts\n")
        for i in range(25):
            f.write(f"e{i},c{i % 4},sku-{i % 5:05d},view,1750000000\n")
    res = invoke(["replay", str(csv_path), "--platform", "shop", "--rate", "500"], env=env)
    assert res.exit_code == 0, res.output
    got = read_all(stack.bootstrap, f"{ns}.events.shop")
    assert len(got) == 25 and json.loads(got[0][1])["action"] == "view"
    res = invoke(["catalog", str(tmp_path / "sim" / "shop.catalog.jsonl"), "--platform", "shop"],
                 env=env)
    assert res.exit_code == 0
    assert len(read_all(stack.bootstrap, f"{ns}.catalog.shop")) == man["items"]["shop"]


def test_dev_once_json_contract(tmp_path):
    """`xrec dev --once --events N --json` starts its own broker and Redis, runs the loop,
    prints the JSON summary last, and stops everything it started."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL") and not k.startswith("XREC_")}
    p = subprocess.run([sys.executable, "-m", "xrec", "dev", "--once", "--events", "1500",
                        "--rate", "400", "--json", "--workdir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("events", "users", "recommendations", "users_with_recs", "deadlettered",
                "latency_ms_p50", "latency_ms_p99"):
        assert key in summary, key
    assert summary["deadlettered"] == summary["deadlettered_expected"] > 0
    assert summary["users_with_recs"] >= 0.95 * summary["users"] > 0
    assert summary["recommendations"] > 0 and summary["latency_ms_p99"] >= \
        summary["latency_ms_p50"] > 0
    pids = [int(x) for x in re.findall(r"pid (\d+)", p.stderr)]
    assert len(pids) == 5  # broker, Redis, and the three workers (recommend, normalize, train)
    assert re.search(r"recommend worker pid|worker pid \d+ ready \(\d+ partitions, agents "
                     r"recommend\)", p.stderr), p.stderr[-2000:]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"pid {pid} still running"


def test_recs_derives_keys_from_raw_ids_locally(stack, ns):
    import redis as redis_sync

    from streams.normalize import Pseudonymizer
    from streams.platforms import load_platforms
    from streams.records import RecItem, Recommendations
    from streams.settings import DEV_SECRET

    video = load_platforms()["video"]
    pseudo = Pseudonymizer(DEV_SECRET.encode())
    by_account = pseudo.user_key(video, {"viewer_id": "v-raw-1", "account_id": "acct-1"})
    local = pseudo.user_key(video, {"viewer_id": "v-raw-2"})
    r = redis_sync.Redis.from_url(stack.redis_url)
    for user, item in ((by_account, "vid-a"), (local, "vid-b")):
        rec = Recommendations(user=user, platform="video", items=[RecItem(item=item, score=1.0)],
                              scorer="popco-1", event_time=1.0, produced_at=1.0,
                              published_at=2.0, events=1)
        r.set(f"{ns}:recs:video:{user}", rec.model_dump_json())
    env = {"REDIS_URL": stack.redis_url, "XREC_REDIS_PREFIX": f"{ns}:", "XREC_ENV": "dev"}
    out = invoke(["recs", "acct-1", "--account-id", "--platform", "video"], env=env).output
    assert "vid-a" in out
    out = invoke(["recs", "v-raw-2", "--raw-id", "--platform", "video", "--json"], env=env).output
    assert json.loads(out)["items"][0]["item"] == "vid-b"
    res = CliRunner().invoke(cli, ["recs", "nobody", "--platform", "video"], env=env)
    assert res.exit_code == 1 and "no cached recommendations" in res.output


def test_recs_explain_says_why_in_words(stack, ns):
    import redis as redis_sync

    from streams.explain import why_json
    from streams.state import RecsOut

    r = redis_sync.Redis.from_url(stack.redis_url)
    r.hset(f"{ns}:item:music:trk-7", "text", "Midnight Blues. A slow jazz track")
    rec = RecsOut("u-explain", "video", [("vid-1", 2.5), ("vid-2", 1.0), ("vid-3", 0.5)],
                  "xrec-heads-v3", 1.0, 1.0, 2.0, 1,
                  [why_json("history", [("music", "trk-7", 0.58)]),
                   why_json("popular", platform="video")])
    r.set(f"{ns}:recs:video:u-explain", rec.model_dump_json())
    env = {"REDIS_URL": stack.redis_url, "XREC_REDIS_PREFIX": f"{ns}:", "XREC_ENV": "dev"}
    out = invoke(["recs", "u-explain", "--platform", "video", "--explain"], env=env).output
    lines = out.splitlines()
    at = next(n for n, ln in enumerate(lines) if "vid-1" in ln)
    assert lines[at + 1].strip() == ("because of trk-7 “Midnight Blues” on music (58%) "
                                     "in your history")
    assert "popular on video" in lines[at + 3]
    assert "because" not in out.split("vid-3")[1]  # the third item carries no reason
    plain = invoke(["recs", "u-explain", "--platform", "video"], env=env).output
    assert "because" not in plain and "popular on" not in plain


def test_tail_prints_recommendations_and_dead_letters(stack, ns):
    from streams.records import DeadLetter, RecItem, Recommendations
    from tests.kafka_util import produce

    s = make_settings(stack, ns)
    create_all_topics(s)
    env = settings_env(s)
    recs = [Recommendations(user=u * 32, platform="video", items=[RecItem(item="vid-1",
                            score=0.5)], scorer="popco-1", event_time=1.0, produced_at=1.0,
                            published_at=1.05, events=1) for u in "ab"]
    produce(stack.bootstrap, f"{ns}.recs.video", [r.model_dump_json().encode() for r in recs])
    dl = DeadLetter(src_topic="x", src_partition=0, src_offset=7, platform="video", code="schema",
                    message="duration: Input should be greater than 0", excerpt="{}", size=2,
                    at=1.0)
    produce(stack.bootstrap, f"{ns}.deadletter", [dl.model_dump_json().encode()])
    out = invoke(["tail", "video", "--from-beginning", "--json", "--user", "b" * 32,
                  "--idle-exit", "3"], env=env).output
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["user"] for x in lines] == ["b" * 32]
    env.pop("REDIS_URL")
    out = invoke(["tail", "video", "--from-beginning", "--limit", "2"], env=env).output
    assert out.count("vid-1") == 2 and "50 ms" in out
    out = invoke(["tail", "deadletter", "--from-beginning", "--limit", "1"], env=env).output
    assert "schema" in out and "x[0]@7" in out


def test_dev_stays_up_then_stops_everything_on_ctrl_c(tmp_path):
    """`xrec dev` without --once keeps the stack up; SIGINT (Ctrl-C) stops all it started,
    even when a shell started it in the background with SIGINT ignored."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL") and not k.startswith("XREC_")}
    out = tmp_path / "out.txt"
    with open(out, "wb") as fh:
        p = subprocess.Popen([sys.executable, "-m", "xrec", "dev", "--events", "600", "--rate",
                              "0", "--workdir", str(tmp_path / "wd")], env=env, stdout=fh,
                             stderr=subprocess.STDOUT, cwd=ROOT,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        pids: list[int] = []
        try:
            deadline = time.monotonic() + 180
            while b"stays up" not in out.read_bytes():
                assert p.poll() is None, out.read_text()[-2000:]
                assert time.monotonic() < deadline, out.read_text()[-2000:]
                time.sleep(0.5)
            text = out.read_text()
            assert "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:" in text
            pids = [int(x) for x in re.findall(r"pid (\d+)", text)]
            assert len(pids) == 5  # broker, Redis, three workers
            p.send_signal(signal.SIGINT)
            assert p.wait(60) == 130
        finally:
            if p.poll() is None:  # the test failed: clean up by PID anyway
                p.kill()
                for pid in pids or [int(x) for x in re.findall(r"pid (\d+)", out.read_text())]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"pid {pid} still running"


def test_dev_status_line_off_a_terminal_prints_changes_only(monkeypatch, capsys):
    """Piped, `xrec dev` prints its status line when it changed (at most every
    PIPE_STATUS_EVERY_S), never the same line again and again while the stack idles."""
    import threading
    import time as _time

    from xrec import dev

    monkeypatch.setattr(dev, "PIPE_STATUS_EVERY_S", 0.1)
    applied = [10]

    class Cache:
        def stats(self):
            return {"events_applied": applied[0]}

    class Col:
        def snapshot(self):
            return {"recommendations": 5, "users_with_recs": 2, "deadlettered": 0,
                    "latency_ms_p50": 1.0, "latency_ms_p99": 2.0}

    stop = threading.Event()
    th = threading.Thread(target=dev._live, args=(print, False, Col(), Cache(), {}, [10],
                                                  {"events": 10}, stop))
    th.start()
    _time.sleep(0.8)  # idle: one line
    applied[0] = 11
    _time.sleep(0.8)  # one change: one more line
    stop.set()
    th.join(3)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sent ")]
    assert len(lines) == 2, lines
    assert "applied 10 " in lines[0] and "applied 11 " in lines[1]
