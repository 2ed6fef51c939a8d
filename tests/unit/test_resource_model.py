"""Resources as pure logic: requests, inventories, GPU environment, policies, fit and order."""

from __future__ import annotations

import pytest

from rustic_ai.k8s import ConfigError, EngineSettings, HostSettings, InvalidSpecError
from rustic_ai.k8s.base.models import HostRecord, HostState, LaunchRequest
from rustic_ai.k8s.base.resources import (
    Allocation,
    HostInventory,
    PlacementPolicy,
    ResourceRequest,
    Usage,
    device_env,
    resolve_policy,
    selector_matches,
)
from rustic_ai.k8s.host.inventory import cgroup_cpus, cgroup_memory_mb, detect_gpus, gpus_from_setting
from rustic_ai.k8s.placement import BinPacking, LeastLoaded, RoundRobin, explain_no_fit, with_affinity


def req(resources=None, placement=None, guild_props=None) -> LaunchRequest:
    return LaunchRequest(guild_spec={"id": "g", "properties": guild_props or {}},
                         agent_spec={"id": "a", "name": "agent-a", "resources": resources or {}},
                         messaging_config={}, placement=placement or {})


def host(address, *, gpus=(), used_gpus=None, cpu=8000, used_cpu=0, labels=None, agents=0, capacity=10,
         state=HostState.SERVING) -> HostRecord:
    return HostRecord(address, capacity=capacity, agents=agents, state=state,
                      inventory=HostInventory(cpu=cpu, mem=4096, gpus=tuple(gpus)),
                      usage=Usage(cpu=used_cpu, gpus=used_gpus or {}), labels=labels or {})


def test_requests_are_read_from_the_agent_spec_and_bad_ones_are_refused():
    r = ResourceRequest.from_agent_spec({"resources": {"num_cpus": 1.5, "num_gpus": 0.25,
                                                       "custom_resources": {"license": 2, "memory_mb": 100.5}}})
    assert (r.cpu, r.gpu, r.mem, dict(r.custom)) == (1500, 250, 101, {"license": 2000})
    assert ResourceRequest.from_agent_spec({"resources": {"num_cpus": None, "num_gpus": None}}).empty
    assert ResourceRequest.from_agent_spec({}).to_json() == ""
    with pytest.raises(InvalidSpecError, match="whole number of GPUs"):
        ResourceRequest.from_agent_spec({"resources": {"num_gpus": 1.5}})
    with pytest.raises(InvalidSpecError, match="num_cpus must be a finite number >= 0"):
        ResourceRequest.from_agent_spec({"resources": {"num_cpus": -1}})
    with pytest.raises(InvalidSpecError, match="at most"):
        ResourceRequest.from_agent_spec({"resources": {"num_cpus": 1e308}})
    with pytest.raises(InvalidSpecError, match="must be a number"):
        ResourceRequest.from_agent_spec({"resources": {"custom_resources": {"x": "lots"}}})


def test_device_env_names_granted_devices_and_hides_the_rest():
    uuids = HostInventory(gpus=("GPU-aaa", "GPU-bbb"))
    assert device_env(Allocation(gpus={"GPU-bbb": 500}), uuids) == {
        "CUDA_VISIBLE_DEVICES": "GPU-bbb", "NVIDIA_VISIBLE_DEVICES": "GPU-bbb"}
    # Indexes as the device plugin writes them: CUDA numbers the container's devices from 0.
    indexes = HostInventory(gpus=("2", "3"))
    assert device_env(Allocation(gpus={"3": 1000}), indexes) == {
        "CUDA_VISIBLE_DEVICES": "1", "NVIDIA_VISIBLE_DEVICES": "3"}
    assert device_env(Allocation(), indexes) == {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}


def test_selectors_match_equality_negation_and_existence():
    labels = {"pool": "gpu", "zone": "a"}
    assert selector_matches({}, labels) and selector_matches({"pool": "gpu"}, labels)
    assert not selector_matches({"pool": "cpu"}, labels)
    assert selector_matches({"zone": "!b"}, labels) and not selector_matches({"zone": "!a"}, labels)
    assert selector_matches({"zone": "*"}, labels) and not selector_matches({"rack": "*"}, labels)


def test_policy_precedence_run_agent_over_guild_agent_entry_over_guild_over_engine():
    default = PlacementPolicy(selector={"pool": "cpu"}, affinity="spread", wait_s=1.0)
    guild = {"id": "g", "properties": {"rustic_k8s_placement": {
        "affinity": "pack", "agents": {"agent-a": {"selector": {"pool": "gpu"}}}}}}
    p = resolve_policy(guild, {"id": "a", "name": "agent-a"}, None, default)
    assert (dict(p.selector), p.affinity, p.wait_s) == ({"pool": "gpu"}, "pack", 1.0)
    other = resolve_policy(guild, {"id": "b", "name": "b"}, None, default)
    assert (dict(other.selector), other.affinity) == ({"pool": "cpu"}, "pack")
    explicit = resolve_policy(guild, {"id": "a"}, PlacementPolicy(affinity="strict_spread", wait_s=0), default)
    assert (explicit.affinity, explicit.wait_s) == ("strict_spread", 0)
    with pytest.raises(InvalidSpecError, match="affinity 'tight'"):
        resolve_policy({"properties": {"rustic_k8s_placement": {"affinity": "tight"}}}, {}, None, default)
    with pytest.raises(InvalidSpecError, match="unknown keys"):
        PlacementPolicy.from_dict({"selctor": {"pool": "gpu"}})


def test_only_hosts_that_fit_are_candidates_for_every_strategy():
    hosts = [host("cpu:1"), host("gpu:1", gpus=("0",), used_gpus={"0": 600}), host("gpu:2", gpus=("0", "1")),
             host("drain:1", gpus=("0",), state=HostState.DRAINING), host("full:1", gpus=("0",), agents=10)]
    half = req({"num_gpus": 0.5})
    for strategy in (LeastLoaded(), BinPacking(), RoundRobin()):
        assert [h.address for h in strategy.order(hosts, half)] == ["gpu:2"]
    tiny = req({"num_gpus": 0.25})
    assert {h.address for h in LeastLoaded().order(hosts, tiny)} == {"gpu:1", "gpu:2"}
    assert BinPacking().order(hosts, tiny)[0].address == "gpu:1"  # the fuller one first
    assert LeastLoaded().order(hosts, tiny)[0].address == "gpu:2"
    assert [h.address for h in LeastLoaded().order(hosts, req(placement={"selector": {"pool": "x"}}))] == []


def test_bin_packing_fills_one_host_before_the_next_and_least_loaded_spreads():
    hosts = [host("a:1", cpu=8000, used_cpu=4000), host("b:1", cpu=8000, used_cpu=1000), host("c:1", cpu=8000)]
    one_cpu = req({"num_cpus": 1})
    assert [h.address for h in BinPacking().order(hosts, one_cpu)] == ["a:1", "b:1", "c:1"]
    assert [h.address for h in LeastLoaded().order(hosts, one_cpu)] == ["c:1", "b:1", "a:1"]


def test_affinity_reorders_or_filters_a_strategy_s_order():
    order = [host("a:1"), host("b:1"), host("c:1")]
    load = {"b:1": 2, "c:1": 1}
    names = lambda hs: [h.address for h in hs]
    assert names(with_affinity(order, "pack", load)) == ["b:1", "c:1", "a:1"]
    assert names(with_affinity(order, "spread", load)) == ["a:1", "c:1", "b:1"]
    assert names(with_affinity(order, "strict_pack", load)) == ["b:1", "c:1"]
    assert names(with_affinity(order, "strict_pack", {})) == ["a:1", "b:1", "c:1"]  # a first agent goes anywhere
    assert names(with_affinity(order, "strict_spread", load)) == ["a:1"]


def test_the_no_fit_explanation_names_the_largest_free_amount():
    hosts = [host("a:1", gpus=("0",), used_gpus={"0": 500}), host("b:1", gpus=("0", "1"), used_gpus={"0": 800,
                                                                                                   "1": 1000}),
             host("c:1", labels={"pool": "cpu"})]
    why = explain_no_fit(hosts, req({"num_gpus": 1}))
    assert why.startswith("needs 1 GPU; largest free 0.5") and "over 3 hosts" in why
    why = explain_no_fit(hosts, req({"num_gpus": 1}, placement={"selector": {"pool": "gpu"}}))
    assert "3 of 3 hosts do not match the selector pool=gpu" in why


def test_inventory_detection_reads_cgroup_limits_and_the_device_plugin(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    (tmp_path / "memory.max").write_text(str(3 * 1024**3) + "\n")
    assert cgroup_cpus(tmp_path) == 2.5 and cgroup_memory_mb(tmp_path) == 3072
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_cpus(tmp_path) is None and cgroup_memory_mb(tmp_path) is None
    assert gpus_from_setting("") is None and gpus_from_setting("none") == ()
    assert gpus_from_setting("2") == ("0", "1") and gpus_from_setting("GPU-a, GPU-b") == ("GPU-a", "GPU-b")
    with pytest.raises(ConfigError, match="named twice"):
        gpus_from_setting("0,0")


async def test_gpus_come_from_nvidia_visible_devices_else_nvidia_smi():
    async def smi():
        return ["GPU-x", "GPU-y"]

    assert await detect_gpus({"NVIDIA_VISIBLE_DEVICES": "GPU-1,GPU-2"}, smi) == ("GPU-1", "GPU-2")
    assert await detect_gpus({"NVIDIA_VISIBLE_DEVICES": "all"}, smi) == ("GPU-x", "GPU-y")
    assert await detect_gpus({"NVIDIA_VISIBLE_DEVICES": "void"}, smi) == ()
    assert await detect_gpus({}, smi) == ("GPU-x", "GPU-y")


def test_bad_resource_settings_name_their_variable():
    with pytest.raises(ConfigError, match="RUSTIC_AGENT_HOST_RESOURCES"):
        HostSettings.from_env({"RUSTIC_AGENT_HOST_RESOURCES": "[1, 2]"})
    with pytest.raises(ConfigError, match="RUSTIC_AGENT_HOST_RESOURCES"):
        HostSettings.from_env({"RUSTIC_AGENT_HOST_RESOURCES": '{"license": -1}'})
    with pytest.raises(ConfigError, match="RUSTIC_AGENT_HOST_LABELS"):
        HostSettings.from_env({"RUSTIC_AGENT_HOST_LABELS": "pool"})
    with pytest.raises(ConfigError, match="RUSTIC_K8S_AFFINITY"):
        EngineSettings.from_env({"RUSTIC_K8S_AFFINITY": "close"})
    with pytest.raises(ConfigError, match="RUSTIC_K8S_PLACEMENT"):
        EngineSettings.from_env({"RUSTIC_K8S_PLACEMENT": "random"})
    assert HostSettings.from_env({"RUSTIC_AGENT_HOST_RESOURCES": '{"license": 2}'}).custom_resources() == {
        "license": 2}


def test_host_metrics_export_totals_use_and_each_gpu_s_share():
    from prometheus_client.parser import text_string_to_metric_families

    from rustic_ai.k8s.host.metrics import HostMetrics, HostView

    metrics = HostMetrics()
    metrics.view = lambda: HostView(agents=[], capacity=3, draining=False, heartbeat_lag_s=0.1,
                                    inventory=HostInventory(cpu=4000, mem=2048, gpus=("0", "1"),
                                                            custom={"license": 2000}),
                                    usage=Usage(cpu=1500, mem=512, gpus={"0": 500}, custom={"license": 1000}))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}
    capacity, used = "rustic_agent_host_resource_capacity", "rustic_agent_host_resource_used"
    assert samples[(capacity, (("resource", "gpu"),))] == 2 and samples[(used, (("resource", "gpu"),))] == 0.5
    assert samples[(capacity, (("resource", "cpu"),))] == 4 and samples[(used, (("resource", "cpu"),))] == 1.5
    assert samples[(used, (("resource", "memory_mb"),))] == 512
    assert samples[(used, (("resource", "custom:license"),))] == 1
    assert samples[("rustic_agent_host_gpu_used", (("device", "0"),))] == 0.5
    assert samples[("rustic_agent_host_gpu_used", (("device", "1"),))] == 0
