"""docker/grafana-dashboard.json charts metrics that exist, under the names the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rustic_ai.k8s.base.resources import HostInventory, Usage
from rustic_ai.k8s.engine.metrics import EngineMetrics
from rustic_ai.k8s.host.metrics import AgentView, HostMetrics, HostView

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana-dashboard.json"


def exported_samples() -> set[str]:
    host = HostMetrics()
    host.view = lambda: HostView(agents=[AgentView("g", "a", "running", pid=1)], capacity=3, draining=False,
                                 heartbeat_lag_s=0.1, memory_limit_bytes=1,
                                 inventory=HostInventory(cpu=2000, gpus=("0",)), usage=Usage(gpus={"0": 500}))
    host.launched(None, 0.2)
    host.observe_call("CreateAgent", "OK", 0.1)
    engine = EngineMetrics()
    engine.observe_call("h:1", "CreateAgent", "OK", 0.1)
    engine.launch_seconds.observe(0.1)
    engine.launches.labels("ok").inc()
    engine.retries.labels("HostFullError").inc()
    engine.placements.labels("h:1").inc()
    text = (generate_latest(host.registry) + generate_latest(engine.registry)).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_panel_queries_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\brustic_[a-z0-9_]+", e)}
    missing = used - exported_samples()
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
    # Every family the host exports is charted somewhere.
    host_families = {n.removesuffix("_total").removesuffix("_bucket") for n in exported_samples()
                     if n.startswith("rustic_agent_host_") and not n.endswith(("_created", "_sum", "_count"))}
    charted = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    assert host_families <= charted, host_families - charted


def test_panels_use_the_datasource_variable_and_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "instance"}
    cells = set()
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
