"""The agent side of a warm launch, step by step: ``python -m benchmarks.launch_steps [N]``.

Run by ``python -m benchmarks.profile`` (steps mode) in a fresh interpreter, because it must
start with exactly what a fork server has imported: ``forkserver.preload()``'s modules and
nothing else. It forks N children one after the other, each doing what an agent process
does between fork and "ready" (``child.prepare``, then rusticai-core's
``AgentWrapper.initialize_agent`` steps) with a timestamp after each step: the first launch
of an agent class on a host. Then it imports the agent's own module, as a fork server does
once it has learned the class (adaptive preload) or was told to (``RUSTIC_AGENT_HOST_PRELOAD``),
and forks N more: every later launch of that class. Launch requests are built in another subprocess, since building a spec
imports the agent's class. Redis: a private ``redis-server`` on a free loopback port.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

AGENT_MODULE = "rustic_ai.testing.execution.integration_agents"
STEPS = ["prepare (validate; imports the agent class)", "AgentWrapper()", "MessagingInterface()",
         "build_agent_from_spec", "subscribe_agent_with_messaging", "_notify_ready"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median(values: list[float]) -> float:
    data = sorted(values)
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def _redis() -> tuple[subprocess.Popen, int, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="rk8s-steps-")
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return proc, port, tmp
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def _requests(n: int, port: int) -> list[bytes]:
    code = (
        "import sys\n"
        "from benchmarks.common import guild_spec, responder, redis_messaging\n"
        "from rustic_ai.k8s.base.specs import launch_request_from_models\n"
        "n, port, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]\n"
        "for i in range(n):\n"
        "    r = launch_request_from_models(guild_spec(f'steps-{tag}-{i}'), responder(f'agent-{i}'),\n"
        "                                   redis_messaging(port), machine_id=i + 1, organization_id='bench-org')\n"
        "    print(r.model_dump_json())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(n), str(port), uuid.uuid4().hex[:6]],
                         capture_output=True, check=True, cwd=ROOT)
    return [line.encode() for line in out.stdout.decode().splitlines() if line.strip()]


def _child(raw: bytes, write_fd: int) -> None:
    from rustic_ai.core.guild.execution.utils import build_agent_from_spec, subscribe_agent_with_messaging
    from rustic_ai.core.messaging import MessagingInterface
    from rustic_ai.k8s.process import child

    marks = [time.perf_counter()]
    parsed, client_type = child.prepare(raw)
    marks.append(time.perf_counter())
    req = parsed.request
    wrapper = child.ProcessAgentWrapper(
        guild_spec=parsed.guild_spec, agent_spec=parsed.agent_spec, messaging_config=parsed.messaging_config,
        machine_id=req.machine_id, client_type=client_type, client_properties=dict(req.client_properties),
        organization_id=req.organization_id or None)
    marks.append(time.perf_counter())
    messaging = MessagingInterface(parsed.guild_spec.id, parsed.messaging_config)
    marks.append(time.perf_counter())
    agent = build_agent_from_spec(agent_spec=parsed.agent_spec, guild_spec=parsed.guild_spec,
                                  dependencies=wrapper.dependencies, client_class=client_type,
                                  client_props=dict(req.client_properties), machine_id=req.machine_id,
                                  organization_id=req.organization_id or None)
    marks.append(time.perf_counter())
    subscribe_agent_with_messaging(agent, messaging, req.organization_id or None)
    marks.append(time.perf_counter())
    agent._notify_ready()
    marks.append(time.perf_counter())
    os.write(write_fd, json.dumps([b - a for a, b in zip(marks, marks[1:], strict=False)]).encode())


def _series(requests: list[bytes]) -> list[list[float]]:
    rows = []
    for raw in requests:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                _child(raw, w)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)  # no teardown: the messaging threads die with the process
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        if data:
            rows.append(json.loads(data))
    return rows


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    redis, port, tmp = _redis()
    try:
        requests = _requests(2 * n, port)
        from rustic_ai.k8s.process import forkserver

        forkserver.preload([])  # exactly what a fork server imports before it forks
        gc.collect()
        gc.freeze()
        before = len(sys.modules)
        series = {"class not yet learned": _series(requests[:n])}
        __import__(AGENT_MODULE)
        gc.collect()
        gc.freeze()
        added = len(sys.modules) - before
        series["class module learned"] = _series(requests[n:])
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"agent side of a warm launch: median ms over {n} forked children per column "
          f"(the agent's module adds {added} modules)")
    names = list(series)
    print(f"  {'step':48s}" + "".join(f"{name:>28s}" for name in names))
    for i, step in enumerate(STEPS):
        print(f"  {step:48s}" + "".join(f"{_median([row[i] * 1000 for row in series[k]]):28.1f}" for k in names))
    print(f"  {'total':48s}" + "".join(f"{_median([sum(row) * 1000 for row in series[k]]):28.1f}" for k in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
