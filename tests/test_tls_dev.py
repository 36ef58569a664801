"""``xrec dev --once --tls``: the whole loop with the broker (behind the TLS + SASL/PLAIN
front, :mod:`xrec.tlsfront`) and Redis 7 (TLS, an ACL user) both encrypted and
authenticated, certificates and passwords generated in the working folder: every valid
event applied, recommendations published, the same JSON summary as without ``--tls``, and
neither generated password in anything it prints or logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xrec.stack import tls_redis_binary

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None or tls_redis_binary() is None,
                       reason="--tls needs `apt-get install redis-server openssl`"),
]

#: `xrec dev --json`'s summary keys (xrec/dev.py run_dev): --tls must not change them
SUMMARY_KEYS = {
    "events", "valid_events", "users", "users_simulated", "recommendations", "users_with_recs",
    "deadlettered", "deadlettered_expected", "deadletter_by_code", "applied", "duplicates",
    "latency_ms_p50", "latency_ms_p99", "catalog_items", "items_encoded", "replay_rate",
    "replay_s", "elapsed_s", "drained", "head_versions", "head_swaps", "head_used_after_s_p50",
    "head_used_after_s_max", "quality", "drift_signals", "drift_reactions", "drift_expected"}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XREC_", "KAFKA_", "REDIS_"))}
    env.update(extra)
    return env


def _client_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            k, _, v = line[len("export "):].partition("=")
            out[k] = v.strip("'")
    return out


def test_dev_once_tls_whole_loop_no_password_shown(tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "xrec", "dev", "--once", "--tls", "--events",
                        "1500", "--rate", "400", "--json", "--workdir", str(tmp_path)],
                       env=_clean_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(summary) == SUMMARY_KEYS
    assert summary["drained"] and summary["applied"] == summary["valid_events"] > 0, summary
    assert summary["deadlettered"] == summary["deadlettered_expected"] > 0
    assert summary["users_with_recs"] >= 0.95 * summary["users"] > 0
    assert summary["recommendations"] > 0 and summary["latency_ms_p99"] >= \
        summary["latency_ms_p50"] > 0
    assert "behind the TLS + SASL/PLAIN front" in p.stderr and "rediss://" in p.stderr

    # what a client needs, in one file only its owner reads; keys likewise
    cfile = tmp_path / "tls" / "client.env"
    env = _client_env(cfile)
    assert env["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and env["REDIS_URL"].startswith(
        "rediss://")
    for f in (cfile, tmp_path / "tls" / "ca.key", tmp_path / "tls" / "server.key",
              tmp_path / "redis-auth.conf", tmp_path / "tlsfront-users.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    secrets = [env["KAFKA_SASL_PASSWORD"], env["REDIS_PASSWORD"]]
    assert all(len(s) >= 16 for s in secrets)

    # no password in stdout, stderr, any log or the report
    texts = {"stdout": p.stdout, "stderr": p.stderr}
    for f in [*tmp_path.rglob("*.log"), tmp_path / "report.html"]:
        texts[str(f.relative_to(tmp_path))] = f.read_text(errors="replace")
    assert "report.html" in texts and any(k.startswith("worker") for k in texts), list(texts)
    for name, text in texts.items():
        for s in secrets:
            assert s not in text, f"a generated password appears in {name}"

    # broker, front, Redis and the three workers: all stopped
    pids = [int(x) for x in re.findall(r"pid (\d+)", p.stderr)]
    assert len(pids) == 6, p.stderr[-2000:]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"pid {pid} still running"
    print(f"xrec dev --once --tls --events 1500: {took:.1f}s wall")


def test_tls_refuses_external_services_and_names_what_to_install(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "xrec", "dev", "--once", "--tls", "--workdir",
                        str(tmp_path)], env=_clean_env(REDIS_URL="redis://127.0.0.1:1/0"),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "unset KAFKA_BOOTSTRAP_SERVERS and REDIS_URL" in p.stderr, \
        p.stderr
    # no openssl on PATH: one clear line naming the packages, before anything starts
    p = subprocess.run([sys.executable, "-m", "xrec", "dev", "--once", "--tls", "--workdir",
                        str(tmp_path)], env=_clean_env(PATH=str(tmp_path / "nothing")),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "apt-get install redis-server openssl" in p.stderr, p.stderr
    assert not (tmp_path / "sim").exists()
