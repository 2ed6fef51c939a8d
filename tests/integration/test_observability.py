"""Metrics, structured logs and trace context, observed from outside like an operator would.

One host with its metrics endpoint on, JSON logs and a memory limit. The tests make a
launch, a launch failure, a crash with a restart and a final failure happen, then scrape
``/metrics`` over HTTP, read the host's JSON log lines, and look for the engine's trace
id in the agent process's own output.
"""

from __future__ import annotations

import json
import uuid

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.k8s import AgentLaunchError, AgentState
from rustic_ai.k8s.base.restart import RestartPolicy
from support.eventually import eventually
from support.failing_agents import FailsOnInit
from support.hosts import HostProcess
from support.memory_agents import GrowsPastItsLimit
from support.probe import guild_spec, responder
from support.redis_server import free_port


@pytest.fixture(scope="module")
def host(redis_url, key_prefix):
    port = free_port()
    h = HostProcess(redis_url, key_prefix, name="observed-host", env={
        "RUSTIC_AGENT_HOST_METRICS_LISTEN": f"127.0.0.1:{port}",
        "RUSTIC_AGENT_HOST_LOG_FORMAT": "json",
        "RUSTIC_AGENT_HOST_AGENT_MEMORY_MB": "250",
        "RUSTIC_AGENT_HOST_MEMORY_CHECK_S": "0.2",
    })
    h.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield h
    h.close()


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from one GET of the endpoint."""
    async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def spec(cls, agent_id: str):
    return AgentBuilder(cls).set_id(agent_id).set_name(agent_id).set_description("observed").build_spec()


async def test_the_metrics_endpoint_reports_launches_restarts_and_failures(host, engine, messaging):
    before = await scrape(host.metrics_url)
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    ok = await engine.run_agent(g, responder("r"), messaging)
    with pytest.raises(AgentLaunchError):
        await engine.run_agent(g, spec(FailsOnInit, "broken"), messaging)
    await engine.run_agent(g, spec(GrowsPastItsLimit, "hog"), messaging,
                           restart=RestartPolicy(max_restarts=1, backoff_initial_s=0.1))

    async def hog_failed():
        return (await engine.agent_info(g.id, "hog")).state == AgentState.FAILED

    await eventually(hog_failed, timeout=30, what="the hog restarted once, then failed")
    after = await scrape(host.metrics_url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    p = "rustic_agent_host_"
    assert delta(p + "launches_total", result="ok") == 2  # the responder and the hog
    assert delta(p + "launches_total", result="failed") == 1
    assert delta(p + "restarts_total") == 1
    assert delta(p + "crashes_total", cause="memory") == 2
    assert delta(p + "failures_total") == 1
    assert delta(p + "launch_duration_seconds_count") == 2
    assert delta(p + "grpc_requests_total", method="CreateAgent", code="OK") == 2
    assert delta(p + "grpc_requests_total", method="CreateAgent", code="FAILED_PRECONDITION") == 1
    assert value(after, p + "agents", state="running") >= 1
    assert value(after, p + "agents", state="failed") >= 1
    assert value(after, p + "capacity") == 100
    assert 0 <= value(after, p + "heartbeat_lag_seconds") < 5
    assert value(after, p + "agent_memory_limit_bytes") == 250 * 1024 * 1024
    assert value(after, p + "agent_resident_memory_bytes", guild_id=g.id, agent_id="r") > 10 * 1024 * 1024
    assert ("rustic_agent_host_agent_cpu_seconds_total", (("agent_id", "r"), ("guild_id", g.id))) in after
    assert ok.pid
    # The engine's own registry counted its side.
    engine_samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(
        generate_latest(engine.metrics.registry).decode()) for s in f.samples}
    e = "rustic_k8s_engine_"
    assert value(engine_samples, e + "launches_total", result="ok") == 2
    assert value(engine_samples, e + "launches_total", result="AgentLaunchError") == 1
    assert value(engine_samples, e + "placements_total", host=host.address) == 2  # successful launches only
    assert value(engine_samples, e + "host_calls_total", method="CreateAgent", code="OK") == 2


def json_lines(host: HostProcess) -> list[dict]:
    out = []
    host.log.flush()
    for line in host.log_path.read_text(errors="replace").splitlines():  # all of it: logs() is only the tail
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_json_log_lines_about_an_agent_carry_guild_agent_host_and_pid(host, engine, messaging):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    record = await engine.run_agent(g, responder("logged"), messaging)
    await engine.stop_agent(g.id, "logged")
    key = f"{g.id}/logged"
    about = await eventually(lambda: [r for r in json_lines(host) if key in r["msg"]], what="log lines")
    for fragment in ("ready, pid", "running on", "stopped ("):  # process manager, host, host
        assert any(fragment in r["msg"] for r in about), (fragment, about)
    for r in about:
        assert (r["guild_id"], r["agent_id"], r["host"], r["pid"]) == (g.id, "logged", host.address, record.pid), r
        assert {"ts", "level", "logger", "msg"} <= set(r)
    # Lines about no agent say which host wrote them, and nothing else.
    [serving] = [r for r in json_lines(host) if "serving on" in r["msg"]]
    assert serving["host"] == host.address and "agent_id" not in serving and "pid" not in serving


@pytest.fixture(scope="module")
def spans():
    """An OpenTelemetry SDK in this (the engine's) process, keeping spans in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


async def test_the_agent_process_builds_under_the_engines_trace(host, engine, messaging, spans):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("guild start") as root:
        await engine.run_agent(g, responder("traced"), messaging)
    trace_id = root.get_span_context().trace_id
    launch = [s for s in spans.get_finished_spans() if s.name == "rk8s.engine.launch"]
    assert launch and launch[-1].context.trace_id == trace_id
    assert launch[-1].parent.span_id == root.get_span_context().span_id
    # The agent process (no SDK there) logs the trace it built in; its output is in GetAgentInfo.
    info = await engine.agent_info(g.id, "traced", output_lines=200)
    assert f"in trace {trace_id:032x}" in "\n".join(info.output), info.output
