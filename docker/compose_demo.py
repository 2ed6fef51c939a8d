"""The compose `demo` service: one guild whose agents run on the compose agent hosts.

An unchanged rusticai-core `Guild` builds `rustic_ai.k8s.K8sExecutionEngine` from its
class path; the engine reads its settings from the environment. In compose.yaml that is
RUSTIC_K8S_DISCOVERY=dns and RUSTIC_K8S_DNS_NAME=agent-host: Docker's embedded DNS
answers the service name with the address of every replica, so each replica is a
host. Relay agents (rustic_ai.k8s.demo.agents) pass a baton around a ring over the
Redis messaging backend and stamp host and pid at each hop; a local observer agent
starts the baton and prints its path. Exits 0 when the baton came back, 1 otherwise.

Environment: RUSTIC_K8S_* (engine settings; RUSTIC_K8S_REDIS_URL, _USERNAME and
_PASSWORD also locate and open the messaging Redis), DEMO_AGENTS (relay agents, default
3), DEMO_HOSTS (hosts to wait for, default 1), DEMO_WAIT_S (seconds to wait for hosts
and for the baton, default 60). The image copies this file to /opt/rustic/compose_demo.py.
rusticai-core's Guild API is synchronous, so this is a plain synchronous script.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from urllib.parse import urlsplit

from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.core.guild.guild import Guild
from rustic_ai.core.messaging import MessagingConfig

from rustic_ai.k8s.demo.agents import ObserverAgent, RelayAgent


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def messaging_from_env() -> MessagingConfig:
    url = urlsplit(os.environ.get("RUSTIC_K8S_REDIS_URL", "redis://redis:6379/0"))
    client: dict[str, object] = {"host": url.hostname or "redis", "port": url.port or 6379}
    # The same precedence as the engine's settings: the variables over the URL's user:password.
    username = os.environ.get("RUSTIC_K8S_REDIS_USERNAME") or url.username
    password = os.environ.get("RUSTIC_K8S_REDIS_PASSWORD") or url.password
    if username:
        client["username"] = username
    if password:
        client["password"] = password
    if url.scheme == "rediss":
        client["ssl"] = True
    return MessagingConfig(
        backend_module="rustic_ai.redis.messaging.backend",
        backend_class="RedisMessagingBackend",
        backend_config={"redis_client": client},
    )


def wait_until(check, wait_s: float, interval_s: float = 0.5):
    """Polls ``check()`` until truthy or the deadline; returns its last value."""
    deadline = time.monotonic() + wait_s
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def main() -> int:
    n_agents = int(os.environ.get("DEMO_AGENTS", "3"))
    want_hosts = int(os.environ.get("DEMO_HOSTS", "1"))
    wait_s = float(os.environ.get("DEMO_WAIT_S", "60"))
    guild = Guild(
        id=f"compose-demo-{uuid.uuid4().hex[:6]}",
        name="Relay demo",
        description="a baton passed around agents on several hosts",
        messaging_config=messaging_from_env(),
        execution_engine_clz="rustic_ai.k8s.K8sExecutionEngine",
        organization_id="demo-org",
    )
    engine = guild._get_execution_engine()
    try:
        # Replicas may still be starting: wait for the discovery source to list them.
        hosts = wait_until(lambda: [h for h in engine.hosts() if h.accepts_agents], wait_s)  # type: ignore[attr-defined]
        if len(hosts) < want_hosts:
            say(f"only {len(hosts)} of {want_hosts} agent hosts found within {wait_s:.0f} s")
            if not hosts:
                return 1
        names = {h.address: h.name or "?" for h in hosts}
        say(f"agent hosts: {', '.join(f'{names[a]} ({a})' for a in sorted(names))}")
        for i in range(n_agents):
            spec = (
                AgentBuilder(RelayAgent)
                .set_id(f"relay-{i}")
                .set_name(f"Relay {i}")
                .set_description("passes the baton")
                .set_properties({"index": i, "ring_size": n_agents})
                .build_spec()
            )
            t0 = time.perf_counter()
            guild.launch_agent(spec)
            say(f"launched relay-{i} in {(time.perf_counter() - t0) * 1000:.0f} ms")
        observer_spec = (
            AgentBuilder(ObserverAgent).set_id("observer").set_name("Observer").set_description("local observer")
            .build_spec()
        )
        observer: ObserverAgent = guild._add_local_agent(observer_spec)  # type: ignore[assignment]

        records = sorted(engine.list_agents(guild.id), key=lambda r: r.agent_id)  # type: ignore[attr-defined]
        placed = {r.agent_id: r.host for r in records}
        print(f"\n{'AGENT':<10} {'HOST':<16} {'ADDRESS':<24} {'PID':>7}  STATE")
        for r in records:
            print(f"{r.agent_id:<10} {names.get(r.host, '?'):<16} {r.host:<24} {r.pid:>7}  {r.state}")
        print(flush=True)

        hops = n_agents * 2
        observer.start_baton(hops)
        say(f"baton sent; waiting for {hops} hops")
        if not wait_until(lambda: observer.finished, wait_s, 0.05):
            say(f"the baton did not come back within {wait_s:.0f} s")
            return 1
        path = observer.finished[0]
        for stamp in path:
            # The agent stamps its host when the host tells it its address; else the registry knows.
            if stamp.get("host") in (None, "", "?"):
                stamp["host"] = placed.get(stamp["agent"], "?")
        for hop, stamp in enumerate(path, 1):
            host = stamp["host"]
            print(f"  hop {hop:>2}: {stamp['agent']:<10} on {names.get(host, '?')} ({host}) pid {stamp['pid']}")
        say(f"the baton came back: {len({s['host'] for s in path})} hosts, {len({s['pid'] for s in path})} processes")
        return 0
    finally:
        say("stopping the guild's agents")
        guild.shutdown()


if __name__ == "__main__":
    sys.exit(main())
