"""Rustic AI's own launch paths on a fleet (docs/rustic-ai.md): bootstrap and the API server.

Real agent-host processes, a private redis-server, real gRPC, a SQLite-file metastore.
``GuildBuilder.from_spec(spec).bootstrap(metastore_url, org)`` with K8sExecutionEngine
puts the GuildManagerAgent on a host; the manager's own engine, built inside its agent
process from the host's environment, puts the guild's agents on the hosts. The guild's
agents are ledger agents (support.ledger_agents): every process ever built for one of
them is in its ledger with pid and start time, so "nothing left" is read from /proc, not
from the registry alone.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import weakref
from pathlib import Path

import pytest
from rustic_ai.core.agents.system.models import StopGuildRequest
from rustic_ai.core.guild.builders import GuildBuilder, GuildHelper
from rustic_ai.core.guild.dsl import GuildTopics
from rustic_ai.core.guild.metastore.models import GuildModel, GuildStatus
from sqlmodel import Session, SQLModel, create_engine
from support.certs import TestCA
from support.eventually import eventually_sync
from support.exactly_once import Ledgers, copy_alive
from support.hosts import TESTS_DIR, HostProcess, pid_alive, start_hosts
from support.ledger_agents import LEDGER_DIR_ENV
from support.ledger_fleet import FAST_ENV, LEASE_S, ledger_spec
from support.probe import Probe, redis_messaging
from support.redis_server import free_port

from rustic_ai.k8s import AgentLaunchError, AgentState, EngineSettings, K8sExecutionEngine

ENGINE = "rustic_ai.k8s.K8sExecutionEngine"
AGENTS = ["a1", "a2"]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ledgers")


@pytest.fixture(scope="module")
def fleet(redis_url, key_prefix, ledger_dir):
    """Three hosts shared by the module (the last test SIGKILLs one). Hosts carry nothing
    for Rustic AI beyond what every host has: the registry's RUSTIC_K8S_* settings, which
    the engines built inside their agent processes read too."""
    hosts = start_hosts(redis_url, key_prefix, ["ra-1", "ra-2", "ra-3"], env={**FAST_ENV, LEDGER_DIR_ENV: str(ledger_dir)})
    yield hosts
    for host in hosts:
        host.close()


@pytest.fixture
def launcher_env(monkeypatch, redis_url, key_prefix):
    """The launcher's K8sExecutionEngine is built by rusticai-core from the environment."""
    monkeypatch.setenv("RUSTIC_K8S_REDIS_URL", redis_url)
    monkeypatch.setenv("RUSTIC_K8S_KEY_PREFIX", key_prefix)


@pytest.fixture
def reader(redis_url, key_prefix) -> EngineSettings:
    """Settings for the tests' own registry reader."""
    return EngineSettings.from_env({}, redis_url=redis_url, key_prefix=key_prefix)


def metastore(directory: Path) -> str:
    """A SQLite-file metastore with its tables created, as it must be before the first bootstrap."""
    url = f"sqlite:///{directory / 'metastore.db'}"
    engine = create_engine(url)
    SQLModel.metadata.create_all(engine)  # the rusticai-core models are imported above
    engine.dispose()
    return url


def spec_of(guild_id: str, redis_port: int):
    builder = GuildBuilder(guild_id, "Rustic AI guild", "bootstrapped on the fleet").set_execution_engine(ENGINE)
    messaging = redis_messaging(redis_port)
    builder.set_messaging(messaging.backend_module, messaging.backend_class, messaging.backend_config)
    for agent_id in AGENTS:
        builder.add_agent_spec(ledger_spec(agent_id))
    return builder.build_spec()


def guild_status(url: str, guild_id: str) -> str | None:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            model = GuildModel.get_by_id(session, guild_id)
            return model.status if model else None
    finally:
        engine.dispose()


class Watch:
    """What a test sees of one guild from outside: the registry, the ledgers and /proc."""

    def __init__(self, guild_id: str, ledger_dir: Path, settings: EngineSettings) -> None:
        self.guild_id = guild_id
        # A reader of its own: the launcher's engine is under test (and shut down by some tests).
        self.engine = K8sExecutionEngine(guild_id, "watch", settings)
        self.ledgers = Ledgers(ledger_dir, guild_id)
        self.manager_id = GuildHelper.get_manager_agent_id(guild_id)
        self.manager_pids: set[int] = set()

    def running(self) -> dict[str, tuple[str, int]]:
        """agent id -> (host, pid) of the guild's running agents, as the registry lists them."""
        found = {r.agent_id: (r.host, r.pid) for r in self.engine.list_agents(self.guild_id)
                 if r.state == AgentState.RUNNING}
        if self.manager_id in found:
            self.manager_pids.add(found[self.manager_id][1])
        return found

    def live_copies(self) -> dict[str, int]:
        """agent id -> live processes built for it (ledger + /proc), for the ledger agents."""
        self.ledgers.refresh()
        return {a: sum(copy_alive(c) for c in entry.copies) for a, entry in self.ledgers.agents.items()}

    def all_running(self) -> bool:
        running, copies = self.running(), self.live_copies()
        assert set(running) == {self.manager_id, *AGENTS}, f"running: {running}"
        assert copies == dict.fromkeys(AGENTS, 1), f"live copies: {copies}"
        return True

    def nothing_left(self) -> bool:
        return (self.engine.list_agents(self.guild_id) == []
                and self.engine.get_agents_in_guild(self.guild_id) == {}
                and set(self.live_copies().values()) <= {0}
                and not any(pid_alive(p) for p in self.manager_pids))

    def close(self) -> None:
        self.engine.shutdown()


def answered(probe: Probe, agent_ids: list[str], timeout: float = 20.0) -> None:
    """Says hello until every agent acknowledged (the first hello may race a subscription)."""
    probe.clear()

    def all_acked() -> bool:
        missing = [a for a in agent_ids if not probe.acks_from(a)]
        if missing:
            probe.hello()
        return not missing

    eventually_sync(all_acked, timeout=timeout, interval=0.3, what=f"{agent_ids} answering")


def test_launcher_shutdown_stops_the_whole_guild(fleet, launcher_env, reader, redis_server, ledger_dir, tmp_path):
    """guild.shutdown() on the launcher's bootstrapped guild stops the guild: the manager it
    launched and every agent the manager launched, not the manager alone."""
    url = metastore(tmp_path)
    guild = GuildBuilder.from_spec(spec_of(f"rs-{uuid.uuid4().hex[:6]}", redis_server.port)).bootstrap(url, "org")
    watch = Watch(guild.id, ledger_dir, reader)
    try:
        eventually_sync(watch.all_running, timeout=30, interval=0.1, what="the manager and its agents running")
        guild.shutdown()
        eventually_sync(watch.nothing_left, timeout=15, interval=0.1, what="nothing of the guild left")
    finally:
        watch.close()



def test_a_dropped_guild_leaves_its_agents_running_and_its_facade_is_freed(
        fleet, launcher_env, reader, redis_server, ledger_dir):
    """rusticai-api keeps no Guild it creates: its engine is garbage, not shut down. Dropping is
    not stopping (the guild runs on), and nothing keeps the facade alive; its connections are the
    process's shared engine's (engine/shared.py), so dropped guilds add none
    (test_sync_engine.py counts them)."""
    guild_id = f"rd-{uuid.uuid4().hex[:6]}"
    guild = GuildHelper.shallow_guild_from_spec(spec_of(guild_id, redis_server.port), "org")
    guild.launch_agent(ledger_spec("a1"))
    facade = weakref.ref(guild.execution_engine)
    del guild
    gc.collect()
    assert facade() is None
    watch = Watch(guild_id, ledger_dir, reader)
    try:
        assert "a1" in watch.running() and watch.live_copies() == {"a1": 1}
        watch.engine.stop_agent(guild_id, "a1")
        eventually_sync(lambda: watch.live_copies() == {"a1": 0}, timeout=10, what="a1 stopped")
    finally:
        watch.close()



def test_the_facade_runs_an_agent_that_already_runs_without_an_error(fleet, launcher_env, reader, redis_server,
                                                                      ledger_dir):
    """rusticai-core's run_agent means "make sure it runs": a second launch of a running agent
    (another host claimed it between the Guild's is_agent_running and its launch) returns,
    and there is still one copy."""
    guild_id = f"rr-{uuid.uuid4().hex[:6]}"
    guild = GuildHelper.shallow_guild_from_spec(spec_of(guild_id, redis_server.port), "org")
    watch = Watch(guild_id, ledger_dir, reader)
    try:
        for _ in range(2):  # straight to the engine: Guild.launch_agent would skip the second
            guild.execution_engine.run_agent(guild.to_spec(), ledger_spec("a1"), guild.messaging, machine_id=1)
        eventually_sync(lambda: watch.live_copies() == {"a1": 1}, timeout=10, what="one copy of a1")
    finally:
        guild.shutdown()
        watch.close()


class ApiServer:
    """rusticai-api's own app (rustic_ai.api_server.main:app) under uvicorn, as a process on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("wb")
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
                    "RUSTIC_LOGGING_LEVEL": "WARNING", **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "rustic_ai.api_server.main:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            env=full_env, cwd=log_path.parent, stdout=self.log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_ready(self) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"the API server exited with {self.proc.returncode}"
            try:
                return self.request("GET", "/__health")[0] == 200
            except OSError:
                return False

        eventually_sync(healthy, timeout=60, interval=0.2, what="the API server answering /__health")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def test_api_server_creates_a_guild_on_the_hosts(fleet, reader, redis_server, redis_url, key_prefix, ledger_dir,
                                                 tmp_path):
    """POST /api/guilds on rusticai-api with this engine: the guild's manager and agents run on the hosts.

    The spec names no engine and no messaging: the server fills both in from its
    environment (RUSTIC_AI_EXECUTION_ENGINE, RUSTIC_AI_MESSAGING_*), as a deployment would.
    The server creates the metastore's tables itself (RUSTIC_METASTORE) when it starts.
    """
    messaging = redis_messaging(redis_server.port)
    server = ApiServer({
        "RUSTIC_METASTORE": f"sqlite:///{tmp_path / 'api.db'}",
        "RUSTIC_AI_EXECUTION_ENGINE": ENGINE,
        "RUSTIC_AI_MESSAGING_MODULE": messaging.backend_module,
        "RUSTIC_AI_MESSAGING_CLASS": messaging.backend_class,
        "RUSTIC_AI_MESSAGING_BACKEND_CONFIG": json.dumps(messaging.backend_config),
        "RUSTIC_K8S_REDIS_URL": redis_url,
        "RUSTIC_K8S_KEY_PREFIX": key_prefix,
    }, tmp_path / "api-server.log")
    guild_id = f"ra-{uuid.uuid4().hex[:6]}"
    builder = GuildBuilder(guild_id, "API guild", "created through the REST API")
    for agent_id in AGENTS:
        builder.add_agent_spec(ledger_spec(agent_id))
    spec = builder.build_spec()
    watch = probe = None
    try:
        server.wait_ready()
        status, body = server.request("POST", "/api/guilds", {"spec": spec.model_dump(mode="json"), "org_id": "org"})
        assert (status, body) == (201, {"id": guild_id}), (status, body)

        watch = Watch(guild_id, ledger_dir, reader)
        eventually_sync(watch.all_running, timeout=30, interval=0.1, what="the manager and its agents running")
        assert {host for host, _ in watch.running().values()} <= {h.address for h in fleet}
        status, body = server.request("GET", f"/api/guilds/{guild_id}")
        assert status == 200 and body["properties"]["execution_engine"] == ENGINE, (status, body)
        probe = Probe(guild_id, messaging)
        answered(probe, AGENTS)

        probe.agent.publish(GuildTopics.SYSTEM_TOPIC, StopGuildRequest(guild_id=guild_id, user_id="test"))
        eventually_sync(watch.nothing_left, timeout=20, interval=0.1, what="nothing of the guild left")
    except BaseException:
        print((tmp_path / "api-server.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        if probe is not None:
            probe.close()
        if watch is not None:
            watch.close()
        server.close()


def test_bootstrap_answers_survives_the_managers_host_and_stops_on_request(
        fleet: list[HostProcess], launcher_env, reader, redis_server, ledger_dir, tmp_path):
    url = metastore(tmp_path)
    guild_id = f"rb-{uuid.uuid4().hex[:6]}"
    guild = GuildBuilder.from_spec(spec_of(guild_id, redis_server.port)).bootstrap(url, "org")
    watch = Watch(guild.id, ledger_dir, reader)
    probe = Probe(guild_id, redis_messaging(redis_server.port))
    try:
        # The manager runs on a host and has launched the guild's agents on the hosts.
        eventually_sync(watch.all_running, timeout=30, interval=0.1, what="the manager and its agents running")
        running = watch.running()
        assert {host for host, _ in running.values()} <= {h.address for h in fleet}
        assert guild_status(url, guild_id) in (GuildStatus.STARTING, GuildStatus.RUNNING)
        answered(probe, AGENTS)

        # The manager's host dies: another host adopts the manager (and whatever else ran
        # there) and the guild keeps answering, one copy of each agent.
        manager_host, manager_pid = running[watch.manager_id]
        victim = next(h for h in fleet if h.address == manager_host)
        killed_at = time.monotonic()
        victim.kill()

        def recovered() -> bool:
            now = watch.running()
            moved = now.get(watch.manager_id, (manager_host, 0))[0] != manager_host
            return moved and watch.all_running() and not pid_alive(manager_pid)

        eventually_sync(recovered, timeout=LEASE_S + 20, interval=0.1, what="the manager adopted elsewhere")
        answered(probe, AGENTS)
        print(f"manager's host SIGKILLed -> manager adopted and guild answering after "
              f"{time.monotonic() - killed_at:.2f} s")

        # StopGuildRequest on the system topic: the (adopted) manager stops every agent of
        # the guild, then itself; nothing is left in the registry or in /proc.
        probe.agent.publish(GuildTopics.SYSTEM_TOPIC, StopGuildRequest(guild_id=guild_id, user_id="test"))
        eventually_sync(watch.nothing_left, timeout=20, interval=0.1, what="nothing of the guild left")
        assert guild_status(url, guild_id) == GuildStatus.STOPPED
        assert all(h.proc.poll() is None for h in fleet if h is not victim), "the other hosts keep serving"
    finally:
        probe.close()
        guild.shutdown()
        watch.close()


def test_bootstrap_without_the_metastores_tables_fails_with_the_reason(fleet, launcher_env, redis_server, tmp_path):
    """The manager writes the metastore while it is built: without tables, bootstrap says so."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    spec = spec_of(f"rt-{uuid.uuid4().hex[:6]}", redis_server.port)
    with pytest.raises(AgentLaunchError, match="no such table"):
        GuildBuilder.from_spec(spec).bootstrap(url, "org")


def test_a_guild_bootstraps_on_hosts_that_require_client_certificates(
        monkeypatch, redis_url, redis_server, ledger_dir, tmp_path):
    """With mutual TLS the manager's engine needs a client certificate of its own: the hosts carry
    one in RUSTIC_K8S_TLS_* (beside their server certificate), and the guild runs and stops."""
    ca = TestCA(tmp_path, "fleet")
    server, client = ca.issue("host"), ca.issue("engine")
    engine_tls = {"RUSTIC_K8S_TLS_CERT_FILE": str(client.cert), "RUSTIC_K8S_TLS_KEY_FILE": str(client.key),
                  "RUSTIC_K8S_TLS_CA_FILE": str(ca.ca_file)}
    prefix = f"tls{uuid.uuid4().hex[:6]}"  # a fleet of its own: the module's hosts speak plain text
    [host] = start_hosts(redis_url, prefix, ["tls-1"], env={
        **FAST_ENV, LEDGER_DIR_ENV: str(ledger_dir), **engine_tls,
        "RUSTIC_AGENT_HOST_TLS_CERT_FILE": str(server.cert), "RUSTIC_AGENT_HOST_TLS_KEY_FILE": str(server.key),
        "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": str(ca.ca_file), "RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT": "false"})
    for name, value in {"RUSTIC_K8S_REDIS_URL": redis_url, "RUSTIC_K8S_KEY_PREFIX": prefix, **engine_tls}.items():
        monkeypatch.setenv(name, value)
    guild_id = f"rt-{uuid.uuid4().hex[:6]}"
    guild = GuildBuilder.from_spec(spec_of(guild_id, redis_server.port)).bootstrap(metastore(tmp_path), "org")
    watch = Watch(guild_id, ledger_dir, EngineSettings.from_env())
    probe = Probe(guild_id, redis_messaging(redis_server.port))
    try:
        eventually_sync(watch.all_running, timeout=30, interval=0.1, what="the manager and its agents running")
        assert {h for h, _ in watch.running().values()} == {host.address}
        answered(probe, AGENTS)
        probe.agent.publish(GuildTopics.SYSTEM_TOPIC, StopGuildRequest(guild_id=guild_id, user_id="test"))
        eventually_sync(watch.nothing_left, timeout=20, interval=0.1, what="nothing of the guild left")
    finally:
        probe.close()
        guild.shutdown()
        watch.close()
        host.close()
