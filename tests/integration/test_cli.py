"""The operator CLI and the local-cluster demo, against real hosts, agents and Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest

from support.eventually import eventually
from support.fleet import processes_with_env
from support.hosts import TESTS_DIR, pid_alive
from support.probe import guild_spec, responder


def cli(redis_url: str, prefix: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR))
    return subprocess.run(
        [sys.executable, "-m", "rustic_ai.k8s.cli.main", *args, "--redis-url", redis_url, "--key-prefix", prefix],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


@pytest.fixture
async def fleet(two_hosts, engine, messaging):
    g = guild_spec(f"cli-{uuid.uuid4().hex[:6]}")
    records = [await engine.run_agent(g, responder(f"c{i}"), messaging) for i in range(2)]
    return g, records


async def test_hosts_lists_every_host_as_a_table_and_as_json(fleet, two_hosts, redis_url, key_prefix):
    table = cli(redis_url, key_prefix, "hosts")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["ADDRESS", "NAME", "STATE", "AGENTS", "UPTIME", "VERSION"]
    for h in two_hosts:
        assert re.search(rf"{re.escape(h.address)}\s+{h.name}\s+serving\s+\d+/100", table.stdout)
    rows = json.loads(cli(redis_url, key_prefix, "hosts", "-o", "json").stdout)
    assert {r["address"] for r in rows} == {h.address for h in two_hosts}


async def test_agents_lists_where_each_agent_runs(fleet, redis_url, key_prefix):
    g, records = fleet
    out = cli(redis_url, key_prefix, "agents", "--guild", g.id, "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = {r["agent_id"]: r for r in json.loads(out.stdout)}
    assert {a: (r["host"], r["pid"], r["state"]) for a, r in rows.items()} == {
        r.agent_id: (r.host, r.pid, "running") for r in records
    }
    table = cli(redis_url, key_prefix, "agents", "--guild", g.id).stdout
    assert "ResponderProbeAgent" in table and str(records[0].pid) in table


async def test_agent_shows_recent_output(fleet, redis_url, key_prefix):
    g, records = fleet
    out = cli(redis_url, key_prefix, "agent", g.id, "c0", "--lines", "20")
    assert out.returncode == 0, out.stderr
    assert f"pid:       {records[0].pid}" in out.stdout
    assert "--- last" in out.stdout and len(out.stdout.split("--- last", 1)[1].splitlines()) > 1


async def test_stop_stops_an_agent(fleet, engine, redis_url, key_prefix):
    g, records = fleet
    out = cli(redis_url, key_prefix, "stop", g.id, "c1")
    assert out.returncode == 0 and f"stopped {g.id}/c1" in out.stdout
    assert not await engine.is_agent_running(g.id, "c1")
    assert not pid_alive(records[1].pid)
    missing = cli(redis_url, key_prefix, "stop", g.id, "c1")
    assert missing.returncode == 1 and "not registered" in missing.stderr


async def test_drain_moves_agents_off_a_host(start_host, engine, engine_settings, messaging, redis_url,
                                            key_prefix):
    import dataclasses

    from rustic_ai.k8s import AsyncK8sEngine

    a = start_host("drain-a")
    g = guild_spec(f"cli-{uuid.uuid4().hex[:6]}")
    only_a = dataclasses.replace(engine_settings, discovery="static", hosts=(a.address,))
    async with AsyncK8sEngine(only_a, stop_agents_on_shutdown=False) as pinned:
        rec = await pinned.run_agent(g, responder("mover"), messaging)
    b = start_host("drain-b")
    out = cli(redis_url, key_prefix, "drain", a.address)
    assert out.returncode == 0, out.stderr
    assert "drained and left the fleet" in out.stdout
    assert a.proc.wait(10) == 0

    async def moved():
        now = await engine.registry.get_agent(rec.key)
        return now is not None and now.host != rec.host and now.state == "running"

    await eventually(moved, timeout=15, what="agent moved off the drained host")
    assert b.proc.poll() is None


def test_unreachable_redis_is_a_clear_error(key_prefix):
    out = cli("redis://127.0.0.1:1/0", key_prefix, "hosts", timeout=30)
    assert out.returncode == 1
    assert "Redis unreachable" in out.stderr and "Traceback" not in out.stderr


def test_local_demo_runs_a_guild_across_hosts_and_stops_cleanly():
    out = subprocess.run([sys.executable, "-m", "rustic_ai.k8s.cli.main", "local", "--exit"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the baton crossed 2 hosts and 4 processes" in out.stdout
    assert "stopped; no process left behind" in out.stdout


def test_ctrl_c_stops_the_local_cluster_and_leaves_no_process():
    proc = subprocess.Popen([sys.executable, "-m", "rustic_ai.k8s.cli.main", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    text = "".join(lines)
    prefix = re.search(r"--key-prefix (\S+)", text).group(1)
    assert processes_with_env(f"RUSTIC_K8S_KEY_PREFIX={prefix}"), "the cluster's processes are running"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, text + rest
    assert "no process left behind" in rest
    assert processes_with_env(f"RUSTIC_K8S_KEY_PREFIX={prefix}") == []
