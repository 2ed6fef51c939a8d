"""The module allow-list on raw request dicts, and its enforcement inside the agent process."""

from __future__ import annotations

import json
import re
import sys

import pytest

from rustic_ai.k8s import ForbiddenModuleError, InvalidSpecError
from rustic_ai.k8s.base.allowlist import ALLOWED_MODULES_ENV, ModuleAllowList
from rustic_ai.k8s.base.specs import launch_request_from_models
from rustic_ai.k8s.process import child
from support.probe import guild_spec, redis_messaging, responder

MARKER = "support.marker_module"


def raw_request(**changes) -> dict:
    req = launch_request_from_models(guild_spec("g"), responder("a"), redis_messaging(1))
    data = json.loads(req.model_dump_json())
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    return data


def check(allowed: ModuleAllowList, data: dict) -> None:
    allowed.check_request(guild_spec=data["guild_spec"], agent_spec=data["agent_spec"],
                          messaging_config=data["messaging_config"], client_type=data["client_type"],
                          client_properties=data["client_properties"])


def test_prefixes_cover_a_package_and_what_is_below_it_only():
    allowed = ModuleAllowList(["rustic_ai.", "support.agents", " "])
    assert allowed.allows("rustic_ai") and allowed.allows("rustic_ai.core.guild")
    assert allowed.allows("support.agents") and not allowed.allows("support.agents_evil")
    assert not allowed.allows("rustic_ai_evil.x") and not allowed.allows("support")
    assert not allowed.allows("os")
    assert ModuleAllowList(["*"]).allows("anything.at.all")
    assert allowed.to_env() == "rustic_ai.,support.agents."


def test_the_default_request_of_the_engine_is_allowed_by_default():
    check(ModuleAllowList.from_env({}), raw_request())


@pytest.mark.parametrize("path, value, where", [
    ("agent_spec.class_name", f"{MARKER}.MarkerAgent", "agent_spec.class_name"),
    ("client_type", f"{MARKER}.MarkerClient", "client_type"),
    ("client_properties", {"tracking_store_class": f"{MARKER}.MarkerResolver"}, "client_properties"),
    ("messaging_config.backend_module", MARKER, "messaging_config.backend_module"),
    ("guild_spec.dependency_map", {"db": {"class_name": f"{MARKER}.MarkerResolver"}}, "guild_spec.dependency_map"),
    ("agent_spec.dependency_map", {"db": {"class_name": f"{MARKER}.MarkerResolver"}}, "agent_spec.dependency_map"),
    ("guild_spec.agents", [{"class_name": f"{MARKER}.MarkerAgent"}], "guild_spec.agents[0].class_name"),
])
def test_every_place_a_request_names_a_module_is_checked(path, value, where):
    with pytest.raises(ForbiddenModuleError, match=re.escape(where) + f".*'{MARKER}'"):
        check(ModuleAllowList(["rustic_ai."]), raw_request(**{path: value}))


@pytest.mark.parametrize("name", ["NoDots", ".relative.Agent", "rustic_ai..core.Agent", "rustic_ai.core/x.Agent",
                                  "rustic_ai.core.", 5])
def test_names_that_are_not_module_paths_are_invalid(name):
    with pytest.raises(InvalidSpecError):
        check(ModuleAllowList(["*"]), raw_request(**{"agent_spec.class_name": name}))


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "imported"
    monkeypatch.setenv("RK8S_TEST_IMPORT_MARKER", str(path))
    monkeypatch.delitem(sys.modules, MARKER, raising=False)
    yield path
    sys.modules.pop(MARKER, None)


def test_the_agent_process_refuses_before_importing_even_if_the_host_did_not_check(marker, monkeypatch):
    """child.prepare() is what an agent process runs first; no host check stands in front of it here."""
    monkeypatch.setenv(ALLOWED_MODULES_ENV, "rustic_ai.")
    raw = json.dumps(raw_request(**{"agent_spec.class_name": f"{MARKER}.MarkerAgent"})).encode()
    with pytest.raises(ForbiddenModuleError, match=MARKER):
        child.prepare(raw)
    assert not marker.exists() and MARKER not in sys.modules
    # Control: allowed, the same request imports the module (so the marker does work).
    child.prepare(raw, allowed=ModuleAllowList(["rustic_ai.", "support."]))
    assert marker.read_text().startswith(f"{MARKER} imported")


def test_without_the_hosts_list_an_agent_process_applies_the_secure_default(monkeypatch):
    monkeypatch.delenv(ALLOWED_MODULES_ENV, raising=False)
    assert ModuleAllowList.from_env().to_env() == "rustic_ai."
